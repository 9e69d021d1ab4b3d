"""Kubernetes mode end to end: the fake API server in this event loop, `ingress-proxy serve --kubernetes`
as a real subprocess, real aiohttp backends behind EndpointSlices on 127.0.0.x, real HTTP/TLS clients.

Every test gets its own API server and its own controller processes on free loopback ports; the
processes are stopped with SIGTERM (killed if they do not exit) at teardown, and their logs are
printed when a test fails so that a failure explains itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import trustme
from aiohttp import web
from kubernetes_asyncio import client, config

from tests.fake_apiserver import FakeApiServer
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / ".venv" / "bin" / "ingress-proxy"
START_TIMEOUT = 15.0  # process start + initial LIST of every kind, on a loaded 2-core machine
STOP_TIMEOUT = 10.0

T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool], timeout: float, what: str) -> float:
    """Poll `probe()` until `accept` holds; returns the seconds it took. Fails with the last value seen."""
    started = time.monotonic()
    last: object = None
    while True:
        try:
            last = await probe()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ssl.SSLError) as error:
            last = error
        else:
            if accept(last):  # type: ignore[arg-type]
                return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout}s; last seen: {last!r}")
        await asyncio.sleep(0.02)


# --- the cluster -------------------------------------------------------------------------------


@dataclass
class Cluster:
    """kubernetes-asyncio APIs for the fake server, plus the server itself for fault hooks."""

    server: FakeApiServer
    kubeconfig: Path
    api_client: client.ApiClient

    @property
    def networking(self) -> client.NetworkingV1Api:
        return client.NetworkingV1Api(self.api_client)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client)

    @property
    def discovery(self) -> client.DiscoveryV1Api:
        return client.DiscoveryV1Api(self.api_client)

    @property
    def coordination(self) -> client.CoordinationV1Api:
        return client.CoordinationV1Api(self.api_client)

    async def ingress_status(self, name: str, namespace: str = "default") -> list[str]:
        ingress = await self.networking.read_namespaced_ingress(name, namespace)
        entries = (ingress.status.load_balancer.ingress if ingress.status and ingress.status.load_balancer else None) or []
        return [entry.ip or entry.hostname for entry in entries]


async def open_cluster(server: FakeApiServer, kubeconfig: Path) -> AsyncIterator[Cluster]:
    server.write_kubeconfig(kubeconfig)
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration, persist_config=False)
    async with client.ApiClient(configuration) as api_client:
        yield Cluster(server, kubeconfig, api_client)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with FakeApiServer(allow_loopback=True, bookmark_interval=0.5) as server:
        async for opened in open_cluster(server, tmp_path / "kubeconfig"):
            yield opened


# --- backends ----------------------------------------------------------------------------------


@dataclass
class Backend:
    """A real aiohttp server answering JSON {"backend": name, ...}; GET /slow/<seconds> answers late."""

    name: str
    host: str
    port: int
    received: list[str] = field(default_factory=list)


async def serve_backend(backend: Backend) -> web.AppRunner:
    async def slow(request: web.Request) -> web.Response:
        backend.received.append(request.path_qs)  # on arrival: a test can wait for it to be in flight
        await asyncio.sleep(float(request.match_info["seconds"]))
        return web.json_response({"backend": backend.name, "slow": True})

    async def echo(request: web.Request) -> web.Response:
        backend.received.append(request.path_qs)
        headers = {name.lower(): value for name, value in request.headers.items()}  # one value per name (the last)
        return web.json_response({"backend": backend.name, "host": request.host, "path": request.path_qs, "headers": headers})

    app = web.Application()
    app.router.add_get("/slow/{seconds}", slow)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, backend.host, backend.port).start()
    return runner


StartBackends = Callable[..., Awaitable[list[Backend]]]


async def start_backend_group(names: list[str], runners: list[web.AppRunner], first_host: int = 2) -> list[Backend]:
    """One backend per name on 127.0.0.<first_host+i>, all on one port (an EndpointSlice has one
    port list for all its endpoints); their runners are appended to `runners` for the caller to clean up."""
    for _ in range(20):
        port = free_port(f"127.0.0.{first_host}")
        backends = [Backend(name, f"127.0.0.{first_host + index}", port) for index, name in enumerate(names)]
        started: list[web.AppRunner] = []
        try:
            for backend in backends:
                started.append(await serve_backend(backend))
        except OSError:  # the port was taken on one of the addresses meanwhile: try another
            for runner in started:
                await runner.cleanup()
            continue
        runners.extend(started)
        return backends
    raise RuntimeError("no port free on every backend address")


@pytest.fixture
async def start_backends() -> AsyncIterator[StartBackends]:
    """`await start_backends(names, first_host=2)`: `start_backend_group`, cleaned up at teardown."""
    runners: list[web.AppRunner] = []

    async def start(names: list[str], first_host: int = 2) -> list[Backend]:
        return await start_backend_group(names, runners, first_host)

    yield start
    for runner in runners:
        await runner.cleanup()


# --- the controller process --------------------------------------------------------------------


@dataclass
class ControllerProcess:
    process: asyncio.subprocess.Process
    https_port: int
    http_port: int
    admin_port: int
    log_path: Path

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def readyz(self) -> int:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            async with session.get(f"{self.admin}/readyz") as response:
                return response.status

    async def metric(self, name: str, **labels: str) -> float:
        """One sample from /metrics (0 when absent)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            async with session.get(f"{self.admin}/metrics") as response:
                text = await response.text()
        wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
        sample = f"{name}{{{wanted}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()
        return self.process.returncode if self.process.returncode is not None else -1


StartController = Callable[..., Awaitable[ControllerProcess]]


async def launch_controller(
    cluster: Cluster, log_path: Path, *flags: str, wait_ready: bool = True, namespace: str = "default"
) -> ControllerProcess:
    """`ingress-proxy serve --kubernetes` on free loopback ports with the cluster's kubeconfig;
    waits for /readyz unless told not to. The caller stops it."""
    https_port, http_port, admin_port = free_port(), free_port(), free_port()
    arguments = [
        "serve", "--kubernetes", "--kubeconfig", str(cluster.kubeconfig),
        "--https-address", f"127.0.0.1:{https_port}", "--http-address", f"127.0.0.1:{http_port}",
        "--admin-address", f"127.0.0.1:{admin_port}", *flags,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            str(CLI), *arguments, stdout=log, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "POD_NAMESPACE": namespace}, cwd=log_path.parent,
        )  # fmt: skip
    controller = ControllerProcess(process, https_port, http_port, admin_port, log_path)
    if wait_ready:
        try:
            await eventually(controller.readyz, lambda status: status == 200, START_TIMEOUT, f"controller ready\n{controller.log()}")
        except BaseException:
            await controller.stop()
            raise
    return controller


@pytest.fixture
async def start_controller(tmp_path: Path) -> AsyncIterator[StartController]:
    """`await start_controller(cluster, *flags, wait_ready=True)`: `launch_controller`, stopped at teardown."""
    started: list[ControllerProcess] = []

    async def start(cluster: Cluster, *flags: str, wait_ready: bool = True, namespace: str = "default") -> ControllerProcess:
        log_path = tmp_path / f"controller-{len(started)}.log"
        controller = await launch_controller(cluster, log_path, *flags, wait_ready=wait_ready, namespace=namespace)
        started.append(controller)
        return controller

    yield start
    for index, controller in enumerate(started):
        await controller.stop()
        # Captured: pytest shows it only when the test failed.
        sys.stderr.write(f"\n--- controller {index} log (tail) ---\n{controller.log()[-6000:]}\n")


# --- clients -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: Any  # parsed JSON when the body is JSON, else text


async def http_get(port: int, host: str, path: str = "/", *, tls: ssl.SSLContext | None = None, timeout: float = 5.0) -> Answer:
    """One request on a fresh connection: Host (and SNI, for TLS) = `host`, connected to 127.0.0.1."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        scheme = "https" if tls is not None else "http"
        async with session.get(
            f"{scheme}://127.0.0.1:{port}{path}",
            headers={"Host": host},
            ssl=tls if tls is not None else False,
            server_hostname=host if tls is not None else None,
            allow_redirects=False,
        ) as response:
            text = await response.text()
            body: Any = text
            if response.content_type == "application/json":
                body = await response.json()
            return Answer(response.status, dict(response.headers), body)


def backend_of(answer: Answer) -> str | None:
    return answer.body.get("backend") if answer.status == 200 and isinstance(answer.body, dict) else None


def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context

