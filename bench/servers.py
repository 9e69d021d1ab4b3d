"""The processes of a run: the backend, and the three proxies under test with equivalent settings.

Every process starts in its own session under `taskset`, logs to a file in the run's work
directory, and is stopped (SIGTERM to its process group, then SIGKILL) when its context exits, also
on Ctrl-C or an exception. A proxy that fails to start raises `ProxyUnavailable` with the tail of
its log, so the run goes on and the report shows why that column is empty.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bench.certs import SERVER_NAME, CertSet, KeyType
from bench.machine import BOTH_CPUS, GENERATOR_CPUS, PROXY_CPUS, free_port

SMALL_PATH = "/"
SMALL_BODY = b"ok"
LARGE_PATH = "/1m"
LARGE_BODY_SIZE = 1024 * 1024
START_TIMEOUT_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 5.0
# Well above what any row opens (2,000 idle connections + generator connections); HAProxy needs
# two descriptors per connection and the hard RLIMIT_NOFILE here is 20,000.
MAX_CONNECTIONS = 8000
# Idle connections must outlive the idle-RSS row; keep-alive connections the longest row.
IDLE_TIMEOUT_SECONDS = 120
REPO = Path(__file__).resolve().parent.parent
FIXTURE_ENGINE_SOURCE = REPO / "tests" / "engine" / "async_engine" / "async_engine.c"
FIXTURE_ENGINE_ID = "asyncfixture"
FIXTURE_PROVIDER_SOURCE = REPO / "tests" / "engine" / "async_provider" / "async_provider.c"
FIXTURE_PROVIDER_NAME = "testoffload"
FIXTURE_POOL_HEADER = REPO / "tests" / "engine" / "offload_pool.h"  # the worker pool both sources include
# How each fixture is told where to run its worker threads (see their C sources).
WORKER_CPU_VARIABLES = {"engine": "ASYNCFIXTURE_WORKER_CPU", "provider": "TESTOFFLOAD_WORKER_CPU"}
Offload = Literal["engine", "provider"]


class ProxyUnavailable(Exception):
    """The proxy did not start or did not answer correctly; the message says why."""


class ProxyStartTimeout(ProxyUnavailable):
    """The proxy kept running but never became ready: not worth waiting for again this run."""


@dataclass(frozen=True)
class ProxySettings:
    key_type: KeyType
    resumption: bool  # False: server-side session cache and tickets off where the proxy allows it
    workers: int  # threads (HAProxy), worker processes (nginx), --workers (ingress-proxy)
    # Private-key operations through the async fixture engine or provider, with `tls.async: true`;
    # their worker threads on `accelerator_cpus` (None: inherit the proxy's pinning).
    offload: Offload | None = None
    accelerator_cpus: str | None = None
    # How the proxy reaches the backend: http, https (verified TLS), grpc (h2c), or split-writes
    # (bench/split_writes_backend.py: head and body in two sends with Nagle on).
    upstream: str = "http"
    route_policy: bool = False  # the same per-route work in each proxy: source allowlist, regex rewrite, a set header

    @property
    def cpus(self) -> str:
        return PROXY_CPUS if self.workers == 1 else BOTH_CPUS


@dataclass(frozen=True)
class BackendPorts:
    """The backend nginx three ways (HTTP/1.1, HTTP/1.1 over TLS for SERVER_NAME with the bench CA,
    h2c) and bench/split_writes_backend.py."""

    http: int
    https: int
    grpc: int
    split_writes: int


@dataclass(frozen=True)
class RunContext:
    workdir: Path
    certs: CertSet
    backends: BackendPorts

    @property
    def backend_port(self) -> int:
        return self.backends.http


@dataclass(frozen=True)
class RunningProxy:
    name: str
    pid: int
    port: int
    notes: tuple[str, ...]  # settings that differ from the row's intent, shown in the report
    admin_port: int | None = None  # ingress-proxy's /metrics


@contextlib.contextmanager
def launch(
    name: str, argv: list[str], cpus: str, workdir: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        try:
            process = subprocess.Popen(
                ["taskset", "-c", cpus, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        except OSError as error:
            raise ProxyUnavailable(f"{name}: cannot run {argv[0]}: {error}") from error
    try:
        yield process, log_path
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    for stop_signal in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, stop_signal)
        try:
            process.wait(STOP_TIMEOUT_SECONDS)
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(log_path: Path, lines: int = 3) -> str:
    text = log_path.read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:]) if text else "(empty log)"


def wait_until(
    not_ready: Callable[[], str | None], process: subprocess.Popen[bytes], log_path: Path, what: str
) -> None:
    """Poll `not_ready` (None = ready, else why not) until ready, the process exits or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    reason = "not probed yet"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ProxyUnavailable(
                f"{what} exited with status {process.returncode}: {log_tail(log_path)}"
            )
        probe = not_ready()
        if probe is None:
            return
        reason = probe
        time.sleep(0.05)
    raise ProxyStartTimeout(
        f"{what} not ready after {START_TIMEOUT_SECONDS:.0f} s (last check: {reason}); "
        f"log: {log_tail(log_path)}"
    )


class _BenchHTTPSConnection(http.client.HTTPConnection):
    """HTTPS to 127.0.0.1 with SNI and certificate verification for SERVER_NAME."""

    def __init__(self, port: int, ca: Path) -> None:
        super().__init__("127.0.0.1", port, timeout=5)
        self._tls_context = ssl.create_default_context(cafile=str(ca))

    def connect(self) -> None:
        super().connect()
        self.sock = self._tls_context.wrap_socket(self.sock, server_hostname=SERVER_NAME)


def https_get(port: int, path: str, ca: Path) -> tuple[int, int]:
    """One verified HTTPS request: (status, body length)."""
    connection = _BenchHTTPSConnection(port, ca)
    try:
        connection.request("GET", path, headers={"Host": SERVER_NAME})
        response = connection.getresponse()
        return response.status, len(response.read())
    finally:
        connection.close()


def small_request_problem(port: int, ca: Path) -> str | None:
    """None when GET / through the proxy returns the backend's body, else what went wrong."""
    try:
        status, length = https_get(port, SMALL_PATH, ca)
    except (OSError, http.client.HTTPException) as error:
        return f"GET {SMALL_PATH}: {type(error).__name__}: {error}"
    if (status, length) != (200, len(SMALL_BODY)):
        return f"GET {SMALL_PATH} gave status {status} with {length} bytes"
    return None


def served_key_type(port: int) -> str:
    """The key type of the certificate served to a client that sends no SNI (like s_time, wrk)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    public_key = x509.load_der_x509_certificate(der).public_key()
    if isinstance(public_key, rsa.RSAPublicKey):
        return "rsa4096" if public_key.key_size == 4096 else "rsa"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "ecdsa"
    return type(public_key).__name__


def check_ready_proxy(name: str, port: int, settings: ProxySettings, ca: Path) -> None:
    """Before a proxy is measured: the row's key type without SNI, and both bodies complete."""
    key_type = served_key_type(port)
    if key_type != settings.key_type:
        raise ProxyUnavailable(
            f"{name} serves a {key_type} certificate to clients without SNI, "
            f"the row needs {settings.key_type}"
        )
    for path, expected_length in ((SMALL_PATH, len(SMALL_BODY)), (LARGE_PATH, LARGE_BODY_SIZE)):
        try:
            status, length = https_get(port, path, ca)
        except (OSError, http.client.HTTPException) as error:
            raise ProxyUnavailable(f"{name}: GET {path} failed: {error}") from error
        if (status, length) != (200, expected_length):
            raise ProxyUnavailable(
                f"{name}: GET {path} gave status {status} with {length} bytes, "
                f"expected 200 with {expected_length}"
            )


_NGINX_COMMON = """\
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
worker_processes {workers};
worker_rlimit_nofile {max_files};
events {{ worker_connections {max_connections}; }}
http {{
    access_log off;
    default_type text/plain;
    sendfile on;
    keepalive_requests 1000000;
    keepalive_timeout {idle}s;
    client_header_timeout {idle}s;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
{server}
}}
"""


def _nginx_argv(directory: Path, server_block: str, workers: int) -> list[str]:
    directory.mkdir(mode=0o755, exist_ok=True)
    config = directory / "nginx.conf"
    config.write_text(
        _NGINX_COMMON.format(
            directory=directory,
            workers=workers,
            max_connections=MAX_CONNECTIONS,
            max_files=2 * MAX_CONNECTIONS,
            idle=IDLE_TIMEOUT_SECONDS,
            server=server_block,
        )
    )
    return ["nginx", "-p", str(directory), "-c", str(config), "-e", str(directory / "error.log")]


def _backend_problem(port: int) -> str | None:
    """Why the plain-HTTP backend on `port` does not answer GET SMALL_PATH with 200 yet (None: it does)."""
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        connection.request("GET", SMALL_PATH)
        status = connection.getresponse().status
    except (OSError, http.client.HTTPException) as error:
        return f"GET {SMALL_PATH}: {error}"
    return None if status == 200 else f"GET {SMALL_PATH} gave status {status}"


GRPC_PATH = "/bench.Echo/Unary"
GRPC_MESSAGE = b"\x00\x00\x00\x00\x02ok"  # one length-prefixed gRPC message: uncompressed, 2 bytes


@contextlib.contextmanager
def backend(workdir: Path, certs: CertSet) -> Iterator[BackendPorts]:
    """nginx on the generator core: `/` answers "ok", `/1m` sends 1 MiB from tmpfs; the same over
    TLS (certificate for SERVER_NAME from the bench CA, session cache on) and over h2c, where
    GRPC_PATH answers one gRPC message with the trailer grpc-status: 0 (a gRPC unary reply); and
    bench/split_writes_backend.py beside it."""
    chosen: list[int] = []
    while len(chosen) < 4:  # free_port may hand out a port it just gave: keep the four distinct
        if (port := free_port()) not in chosen:
            chosen.append(port)
    ports = BackendPorts(*chosen)
    large_file = workdir / "1m.bin"
    large_file.write_bytes(os.urandom(LARGE_BODY_SIZE))
    grpc_file = workdir / "grpc-reply.bin"
    grpc_file.write_bytes(GRPC_MESSAGE)
    files = certs.by_key_type["ecdsa"]
    locations = f"""\
        location = {SMALL_PATH} {{ return 200 "{SMALL_BODY.decode()}"; }}
        location = {LARGE_PATH} {{ alias {large_file}; }}"""
    server_block = f"""\
    server {{
        listen 127.0.0.1:{ports.http} reuseport;
{locations}
    }}
    server {{
        listen 127.0.0.1:{ports.https} ssl reuseport;
        ssl_certificate {files.cert};
        ssl_certificate_key {files.key};
        ssl_session_cache shared:backend:10m;
        keepalive_requests 1000000;
{locations}
    }}
    server {{
        listen 127.0.0.1:{ports.grpc} http2 reuseport;
        http2_max_requests 1000000;
        keepalive_requests 1000000;
{locations}
        location = {GRPC_PATH} {{
            default_type application/grpc;
            add_trailer grpc-status 0 always;
            alias {grpc_file};
            error_page 405 =200 $uri;  # the static module refuses POST: serve the file anyway
        }}
    }}"""
    nginx_argv = _nginx_argv(workdir / "backend", server_block, workers=1)
    split_argv = [sys.executable, "-m", "bench.split_writes_backend", str(ports.split_writes)]
    with (
        launch("backend", nginx_argv, GENERATOR_CPUS, workdir) as (nginx, nginx_log),
        launch("split-writes-backend", split_argv, GENERATOR_CPUS, workdir) as (split, split_log),
    ):
        wait_until(lambda: _backend_problem(ports.http), nginx, nginx_log, "backend nginx")
        wait_until(lambda: _backend_problem(ports.split_writes), split, split_log, "split-writes backend")
        yield ports


def scrape_metric(admin_port: int, sample_name: str) -> float | None:
    """One unlabelled sample from ingress-proxy's Prometheus /metrics, None when absent."""
    connection = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == sample_name:
            return float(value)
    return None


def build_fixture(workdir: Path, offload: Offload) -> Path:
    """Compile the test suite's async fixture engine or provider (tests/engine/async_*) into `workdir`."""
    source, name = (
        (FIXTURE_ENGINE_SOURCE, FIXTURE_ENGINE_ID) if offload == "engine" else (FIXTURE_PROVIDER_SOURCE, FIXTURE_PROVIDER_NAME)
    )
    library = workdir / f"{name}.so"
    if library.exists():
        return library
    for input_file in (source, FIXTURE_POOL_HEADER):
        if not input_file.exists():
            raise ProxyUnavailable(f"no async fixture {offload}: {input_file} is missing")
    compiled = subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-Wno-deprecated-declarations", str(source), "-o", str(library),
         "-lcrypto", "-lpthread"],
        capture_output=True, text=True,
    )
    if compiled.returncode != 0:
        raise ProxyUnavailable(f"cannot build the async fixture {offload}: {compiled.stderr.strip()[-300:]}")
    return library


class Proxy(Protocol):
    name: str

    def start(
        self, settings: ProxySettings, run: RunContext
    ) -> contextlib.AbstractContextManager[RunningProxy]: ...


def _haproxy_server(settings: ProxySettings, run: RunContext) -> str:
    """The backend server line: the same verification and session reuse as the others."""
    if settings.upstream == "https":
        return f"127.0.0.1:{run.backends.https} ssl verify required ca-file {run.certs.ca} sni str({SERVER_NAME}) alpn http/1.1"
    if settings.upstream == "grpc":
        return f"127.0.0.1:{run.backends.grpc} proto h2"
    return f"127.0.0.1:{_plain_backend_port(settings, run)}"


def _plain_backend_port(settings: ProxySettings, run: RunContext) -> int:
    return run.backends.split_writes if settings.upstream == "split-writes" else run.backends.http


def _nginx_upstream(settings: ProxySettings, run: RunContext) -> tuple[int, str]:
    """(backend port, the proxy lines of `location /`)."""
    if settings.upstream == "https":
        return run.backends.https, f"""\
            proxy_pass https://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {run.certs.ca};
            proxy_ssl_name {SERVER_NAME};
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;"""
    if settings.upstream == "grpc":
        return run.backends.grpc, "            grpc_pass grpc://app;"
    return _plain_backend_port(settings, run), """\
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;"""


def _ingress_proxy_backend(settings: ProxySettings, run: RunContext) -> str:
    if settings.upstream == "https":
        return (
            f'{{endpoints: ["127.0.0.1:{run.backends.https}"], protocol: https, '
            f'tls: {{ca: "{run.certs.ca}", server_name: {SERVER_NAME}}}}}'
        )
    if settings.upstream == "grpc":
        return f'{{endpoints: ["127.0.0.1:{run.backends.grpc}"], protocol: h2c}}'
    return f'{{endpoints: ["127.0.0.1:{_plain_backend_port(settings, run)}"]}}'


class HAProxy:
    name = "haproxy"

    @contextlib.contextmanager
    def start(self, settings: ProxySettings, run: RunContext) -> Iterator[RunningProxy]:
        port = free_port()
        directory = run.workdir / "haproxy"
        directory.mkdir(mode=0o755, exist_ok=True)
        config = directory / "haproxy.cfg"
        cert = run.certs.by_key_type[settings.key_type].combined
        cache = "" if settings.resumption else "    tune.ssl.cachesize 0\n"
        tickets = "" if settings.resumption else " no-tls-tickets"
        config.write_text(
            f"""\
global
    nbthread {settings.workers}
    maxconn {MAX_CONNECTIONS}
{cache}
defaults
    mode http
    maxconn {MAX_CONNECTIONS}
    timeout connect 5s
    timeout client {IDLE_TIMEOUT_SECONDS}s
    timeout server {IDLE_TIMEOUT_SECONDS}s
    timeout http-keep-alive {IDLE_TIMEOUT_SECONDS}s

frontend bench
    bind 127.0.0.1:{port} ssl crt {cert}{tickets} alpn h2,http/1.1
{HAPROXY_POLICY if settings.route_policy else ""}    default_backend app

backend app
    server app {_haproxy_server(settings, run)}
"""
        )
        argv = ["haproxy", "-db", "-f", str(config)]
        with launch(self.name, argv, settings.cpus, run.workdir) as (process, log_path):
            wait_until(lambda: small_request_problem(port, run.certs.ca), process, log_path, self.name)
            check_ready_proxy(self.name, port, settings, run.certs.ca)
            yield RunningProxy(self.name, process.pid, port, notes=())


class Nginx:
    name = "nginx"

    @contextlib.contextmanager
    def start(self, settings: ProxySettings, run: RunContext) -> Iterator[RunningProxy]:
        port = free_port()
        files = run.certs.by_key_type[settings.key_type]
        cache = "shared:bench:20m" if settings.resumption else "off"
        tickets = "on" if settings.resumption else "off"
        backend_port, proxying = _nginx_upstream(settings, run)
        server_block = f"""\
    upstream app {{
        server 127.0.0.1:{backend_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {files.cert};
        ssl_certificate_key {files.key};
        ssl_session_cache {cache};
        ssl_session_tickets {tickets};
        location / {{
{NGINX_POLICY if settings.route_policy else ""}{proxying}
        }}
    }}"""
        argv = _nginx_argv(run.workdir / "nginx", server_block, settings.workers)
        with launch(self.name, argv, settings.cpus, run.workdir) as (process, log_path):
            wait_until(lambda: small_request_problem(port, run.certs.ca), process, log_path, self.name)
            check_ready_proxy(self.name, port, settings, run.certs.ca)
            yield RunningProxy(self.name, process.pid, port, notes=())


# The "keepalive-policy" row's per-route work, written for each proxy: only loopback clients,
# the path rewritten through a regex with a capture group, one request header set.
INGRESS_PROXY_POLICY_ROUTE = (
    '{policy: {allow_sources: [127.0.0.0/8], regex: true, rewrite_target: "/$1", request_headers: {set: {X-Env: bench}}}, '
    'paths: [{path: "/(.*)", type: ImplementationSpecific, backend: app}]}'
)
HAPROXY_POLICY = (
    "    http-request deny unless { src 127.0.0.0/8 }\n"
    "    http-request replace-path /(.*) /\\1\n"
    "    http-request set-header X-Env bench\n"
)
NGINX_POLICY = (
    "            allow 127.0.0.0/8;\n            deny all;\n"
    "            rewrite ^/(.*)$ /$1 break;\n"
    "            proxy_set_header X-Env bench;\n"
)


class IngressProxy:
    name = "ingress-proxy"
    executable = REPO / ".venv" / "bin" / "ingress-proxy"

    @contextlib.contextmanager
    def start(self, settings: ProxySettings, run: RunContext) -> Iterator[RunningProxy]:
        port, admin_port = free_port(), free_port()
        directory = run.workdir / "ingress-proxy"
        directory.mkdir(mode=0o755, exist_ok=True)
        files = run.certs.by_key_type[settings.key_type]
        routes = directory / "routes.yaml"
        engine, key = "", f'"{files.key}"'
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if settings.offload is not None:
            library = build_fixture(run.workdir, settings.offload)
            if settings.offload == "engine":
                engine = (
                    f'  engine: {{id: {FIXTURE_ENGINE_ID}, so_path: "{library}", '
                    "algorithms: [RSA, EC], required: true}\n  async: true\n"
                )
            else:  # the key is held by the provider, reached through its store
                engine = f'  providers: [{{name: {FIXTURE_PROVIDER_NAME}, module: "{library}"}}]\n  async: true\n'
                key = f'"{FIXTURE_PROVIDER_NAME}:{files.key}"'
            if settings.accelerator_cpus is not None:
                environment[WORKER_CPU_VARIABLES[settings.offload]] = settings.accelerator_cpus
        routes.write_text(
            f"""\
listen: {{https: "127.0.0.1:{port}", admin: "127.0.0.1:{admin_port}"}}
tls:
  certificates: [{{cert: "{files.cert}", key: {key}}}]
  default_certificate: {{cert: "{files.cert}", key: {key}}}
  session_resumption: {"true" if settings.resumption else "false"}
{engine}timeouts: {{header_read: {IDLE_TIMEOUT_SECONDS}, idle: {IDLE_TIMEOUT_SECONDS}}}
routes: [{INGRESS_PROXY_POLICY_ROUTE if settings.route_policy else "{paths: [{path: /, type: Prefix, backend: app}]}"}]
backends: {{app: {_ingress_proxy_backend(settings, run)}}}
"""
        )
        argv = [str(self.executable), "serve", "--routes", str(routes), "--no-access-log"]
        if settings.workers != 1:
            argv += ["--workers", str(settings.workers)]
        with launch(self.name, argv, settings.cpus, run.workdir, environment) as (process, log_path):

            def not_ready() -> str | None:
                try:
                    connection = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=2)
                    connection.request("GET", "/readyz")
                    status = connection.getresponse().status
                except (OSError, http.client.HTTPException) as error:
                    return f"admin GET /readyz: {error}"
                if status != 200:
                    return f"admin GET /readyz gave status {status}"
                return small_request_problem(port, run.certs.ca)

            wait_until(not_ready, process, log_path, self.name)
            check_ready_proxy(self.name, port, settings, run.certs.ca)
            yield RunningProxy(self.name, process.pid, port, notes=(), admin_port=admin_port)


PROXIES: tuple[Proxy, ...] = (IngressProxy(), HAProxy(), Nginx())


def http10_response_length(port: int, ca: Path) -> int:
    """Bytes of the reply to `GET / HTTP/1.0` (what s_time sends), read until the proxy closes."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
            tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
            received = 0
            while chunk := tls.recv(65536):
                received += len(chunk)
            return received
