"""Fixtures shared by every test folder: certificates, a real loopback backend, an in-process proxy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import trustme
import uvloop
from aiohttp import web

from config.model import (
    Address,
    Backend,
    Certificate,
    Configuration,
    Listeners,
    PathRule,
    PathType,
    PemKey,
    RouteTable,
    Timeouts,
    VirtualHost,
)
from proxy.server import ProxyServer

LOOPBACK = "127.0.0.1"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests run on uvloop, like the product (its transports differ from asyncio's)."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


def certificate_for(ca: trustme.CA, *hosts: str, key_type: trustme.KeyType = trustme.KeyType.ECDSA) -> Certificate:
    issued = ca.issue_cert(*hosts, key_type=key_type)
    chain = b"".join(blob.bytes() for blob in issued.cert_chain_pems)
    return Certificate(chain, PemKey(issued.private_key_pem.bytes()), tuple(hosts), f"test:{hosts[0]}")


@dataclass
class RecordingBackend:
    """A real aiohttp HTTP/1.1 server that records what reached it."""

    address: Address
    name: str
    received: list[dict] = field(default_factory=list)


async def _start_backend(name: str) -> tuple[RecordingBackend, web.AppRunner]:
    recorded: list[dict] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen = {
            "backend": name,
            "method": request.method,
            "path_qs": request.path_qs,
            "headers": dict(request.headers),
            "body_length": len(body),
        }
        recorded.append(seen)
        return web.json_response(seen)

    async def stream(request: web.Request) -> web.StreamResponse:
        """GET /stream/<bytes>: a chunked response of that many bytes, streamed in 64 KiB pieces."""
        remaining = int(request.match_info["size"])
        response = web.StreamResponse()
        await response.prepare(request)
        piece = b"x" * 65536
        while remaining > 0:
            await response.write(piece[: min(remaining, len(piece))])
            remaining -= len(piece)
        await response.write_eof()
        return response

    async def sink(request: web.Request) -> web.Response:
        """POST /sink: count the body bytes without holding them."""
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
        return web.json_response({"backend": name, "received": total})

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(f"{name}:{message.data}")
        return ws

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.match_info["seconds"]))
        return web.Response(text="late")

    app = web.Application(client_max_size=1024**3)
    app.router.add_get("/stream/{size}", stream)
    app.router.add_post("/sink", sink)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/slow/{seconds}", slow)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    backend = RecordingBackend(Address(LOOPBACK, port), name)
    backend.received = recorded
    return backend, runner


@pytest.fixture
async def start_backend() -> AsyncIterator[Callable[[str], Awaitable[RecordingBackend]]]:
    runners: list[web.AppRunner] = []

    async def start(name: str = "b1") -> RecordingBackend:
        backend, runner = await _start_backend(name)
        runners.append(runner)
        return backend

    yield start
    for runner in runners:
        await runner.cleanup()


def simple_configuration(
    backends: dict[str, list[Address]],
    hosts: dict[str, list[tuple[str, PathType, str]]],
    certificates: tuple[Certificate, ...] = (),
    **settings: object,
) -> Configuration:
    table = RouteTable(
        virtual_hosts=tuple(
            VirtualHost(host, tuple(PathRule(path, kind, backend) for path, kind, backend in rules))
            for host, rules in hosts.items()
        ),
        backends=tuple(Backend(name, tuple(endpoints)) for name, endpoints in backends.items()),
        default_backend=settings.pop("default_backend", None),  # type: ignore[arg-type]
    )
    settings.setdefault("timeouts", Timeouts(drain=2.0))  # tests never wait 30 s at teardown
    return Configuration(routes=table, certificates=certificates, **settings)  # type: ignore[arg-type]


@dataclass
class RunningProxy:
    server: ProxyServer
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def https_port(self) -> int:
        return self.server.bound_ports["https"]

    @property
    def http_port(self) -> int:
        return self.server.bound_ports["http"]


@pytest.fixture
async def start_proxy() -> AsyncIterator[Callable[..., Awaitable[RunningProxy]]]:
    """Start ProxyServer in this event loop on ephemeral loopback ports; stopped at teardown."""
    running: list[RunningProxy] = []

    async def start(configuration: Configuration, http: bool = True) -> RunningProxy:
        listeners = Listeners(https=Address(LOOPBACK, 0), http=Address(LOOPBACK, 0) if http else None)
        server = ProxyServer(listeners)

        class PublishOnce:
            async def run(self, sink: ProxyServer) -> None:
                sink.publish(configuration)
                await asyncio.Event().wait()

        stop = asyncio.Event()
        task = asyncio.create_task(server.serve(PublishOnce(), stop))
        while "https" not in server.bound_ports:
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        proxy = RunningProxy(server, stop, task)
        running.append(proxy)
        return proxy

    yield start
    for proxy in running:
        proxy.stop.set()
        await asyncio.wait_for(proxy.task, 10)


def parse_json_body(raw: bytes) -> dict:
    return json.loads(raw)
