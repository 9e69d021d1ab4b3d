"""The real `ingress-proxy serve --routes FILE` as a subprocess, on ephemeral loopback ports.

Hostile-input and soak tests drive the process users run, not an in-process server: its stdout
and stderr go to files the tests grep (tracebacks, leaked secrets), /metrics and /readyz are read
over the admin listener, RSS comes from /proc, and reloads are real file rewrites. The routes
file is written from plain dictionaries (`routes_document`), always atomically (write + rename),
so the proxy's poller never sees half a file.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import trustme
import yaml

from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
PROXY_COMMAND = str(REPO / ".venv" / "bin" / "ingress-proxy")
LOOPBACK = "127.0.0.1"
START_SECONDS = 20.0
START_ATTEMPTS = 3


@dataclass(frozen=True)
class CertificateFiles:
    cert: Path
    key: Path
    hosts: tuple[str, ...]

    def entry(self) -> dict:
        return {"cert": str(self.cert), "key": str(self.key), "hosts": list(self.hosts)}


def write_certificate(ca: trustme.CA, directory: Path, name: str, *hosts: str) -> CertificateFiles:
    issued = ca.issue_cert(*hosts)
    cert = directory / f"{name}.pem"
    key = directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    return CertificateFiles(cert, key, tuple(hosts))


@dataclass(frozen=True)
class Ports:
    https: int = field(default_factory=free_port)
    http: int = field(default_factory=free_port)
    admin: int = field(default_factory=free_port)


def listen_section(ports: Ports, proxy_protocol: tuple[str, ...] = ()) -> dict[str, str | dict]:
    """`proxy_protocol`: the listeners ("https", "http") that require a PROXY protocol header."""
    section: dict[str, str | dict] = {
        "https": f"{LOOPBACK}:{ports.https}", "http": f"{LOOPBACK}:{ports.http}", "admin": f"{LOOPBACK}:{ports.admin}"
    }
    for name in proxy_protocol:
        section[name] = {"address": section[name], "proxy_protocol": True}
    return section


def routes_document(
    ports: Ports,
    backends: dict[str, list[str]],
    paths: list[tuple[str, str]],
    certificates: list[dict] = (),  # type: ignore[assignment]
    timeouts: dict[str, float] | None = None,
    host: str | None = None,
) -> dict:
    """A routes file as a dictionary: `paths` are (prefix, backend) for one virtual host."""
    route: dict = {"paths": [{"path": path, "backend": backend} for path, backend in paths]}
    if host is not None:
        route["host"] = host
    document: dict = {
        "listen": listen_section(ports),
        "routes": [route],
        "backends": {name: {"endpoints": endpoints} for name, endpoints in backends.items()},
    }
    if certificates:
        document["tls"] = {"certificates": list(certificates)}
    if timeouts:
        document["timeouts"] = dict(timeouts)
    return document


def write_routes(path: Path, document: dict) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(yaml.safe_dump(document, sort_keys=False))
    partial.replace(path)


class ProxyProcess:
    """One running `ingress-proxy serve`; `stop()` ends it (SIGTERM, then SIGKILL after a while)."""

    def __init__(
        self,
        directory: Path,
        ports: Ports,
        document: dict,
        env: dict[str, str] | None = None,
        log_level: str = "info",
        proxy_protocol: tuple[str, ...] = (),
    ) -> None:
        """Start and wait for /readyz. Ports are picked free but bound later by the process: if
        another test took one meanwhile, start again on fresh ports (use `self.ports` afterwards)."""
        self.directory = directory
        self.routes_path = directory / "routes.yaml"
        self.stdout_path = directory / "proxy.stdout"
        self.stderr_path = directory / "proxy.stderr"
        self.proxy_protocol = proxy_protocol
        if proxy_protocol:
            document = {**document, "listen": listen_section(ports, proxy_protocol)}
        for attempt in range(START_ATTEMPTS):
            self.ports = ports
            try:
                self._start(document, env, log_level)
                return
            except RuntimeError:
                if attempt + 1 == START_ATTEMPTS or "Address already in use" not in self.stderr():
                    raise
            ports = Ports()
            document = {**document, "listen": listen_section(ports, proxy_protocol)}

    def _start(self, document: dict, env: dict[str, str] | None, log_level: str) -> None:
        write_routes(self.routes_path, document)
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [PROXY_COMMAND, "serve", "--routes", str(self.routes_path), "--log-level", log_level],
                stdout=stdout,
                stderr=stderr,
                env={**os.environ, **(env or {})},
                cwd=self.directory,
            )
        self._wait_ready()

    # -- lifecycle ----------------------------------------------------------------------------

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ingress-proxy exited with {self.process.returncode}:\n{self.stderr()}")
            try:
                if self.admin_get("/readyz", timeout=1.0)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"ingress-proxy not ready after {START_SECONDS} s:\n{self.stderr()}")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (drain), wait; SIGKILL if it hangs. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    # -- what it wrote ------------------------------------------------------------------------

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def tracebacks(self) -> list[str]:
        """Traceback lines in stderr (LOG.exception writes one): there must never be one per connection."""
        return [line for line in self.stderr().splitlines() if "Traceback" in line]

    # -- admin listener -----------------------------------------------------------------------

    def admin_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.ports.admin}{path}", timeout=timeout) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def metrics(self) -> str:
        return self.admin_get("/metrics")[1]

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
        total = 0.0
        for line in self.metrics().splitlines():
            match = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", line)
            if match is None or match.group(1) != name:
                continue
            sample_labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
            if all(sample_labels.get(key) == value for key, value in labels.items()):
                total += float(match.group(3))
        return total

    def generation(self) -> int:
        return int(self.metric("ingress_proxy_config_generation"))

    def wait_for_generation(self, number: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.generation() < number:
            if time.monotonic() > deadline:
                raise AssertionError(f"generation {number} not live after {timeout} s:\n{self.stderr()[-2000:]}")
            time.sleep(0.02)

    def reload(self, document: dict, hangup: bool = True) -> int:
        """Rewrite the routes file (SIGHUP: reload now; else wait for the 1 s poll); the new generation."""
        before = self.generation()
        write_routes(self.routes_path, {**document, "listen": listen_section(self.ports, self.proxy_protocol)})
        if hangup:
            self.process.send_signal(signal.SIGHUP)
        self.wait_for_generation(before + 1)
        return before + 1

    def try_reload(self, document: dict, timeout: float = 10.0) -> str:
        """Rewrite + SIGHUP a file that may be refused; the reload's result ("ok", "partial", "failed")."""
        results = ("ok", "partial", "failed")
        before = {result: self.metric("ingress_proxy_config_reloads_total", result=result) for result in results}
        write_routes(self.routes_path, {**document, "listen": listen_section(self.ports, self.proxy_protocol)})
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for result in results:
                if self.metric("ingress_proxy_config_reloads_total", result=result) > before[result]:
                    return result
            time.sleep(0.02)
        raise AssertionError(f"no reload within {timeout} s:\n{self.stderr()[-2000:]}")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.process.pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))
