"""Soak fixtures: the real proxy process, continuous client traffic, and a scale knob.

SOAK_SCALE (default 1; `make soak` sets 10) multiplies every loop count, so `make test` runs a
bounded version of each soak and `make soak` the long one. `Traffic` keeps keep-alive clients,
new-connection clients and (optionally) one WebSocket busy against the proxy until stopped, and
records every failure it sees with its reason.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from tests.conftest import RecordingBackend, _start_backend
from tests.hostile.proxy_process import Ports, ProxyProcess

SOAK_SCALE = int(os.environ.get("SOAK_SCALE", "1"))
SERVER_NAME = "soak.test"


def scaled(count: int) -> int:
    return count * SOAK_SCALE


@pytest.fixture(scope="session")
def soak_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_tls(soak_ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    soak_ca.configure_trust(context)
    return context


@pytest.fixture
async def start_soak_proxy(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ProxyProcess]]]:
    """Start `ingress-proxy serve` from a routes document; stopped (and its stderr checked) at teardown."""
    started: list[ProxyProcess] = []

    async def start(ports: Ports, document: dict, env: dict[str, str] | None = None, log_level: str = "info") -> ProxyProcess:
        proxy = await asyncio.to_thread(ProxyProcess, tmp_path, ports, document, env, log_level)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await asyncio.to_thread(proxy.stop)
        assert proxy.tracebacks() == [], proxy.stderr()[-5000:]


@pytest.fixture
async def start_pod() -> AsyncIterator[Callable[[str], Awaitable[tuple[RecordingBackend, Callable[[], Awaitable[None]]]]]]:
    """Like `start_backend`, but each backend comes with a `stop()` to take it away mid-test."""
    runners = []

    async def start(name: str) -> tuple[RecordingBackend, Callable[[], Awaitable[None]]]:
        backend, runner = await _start_backend(name)
        runners.append(runner)
        return backend, runner.cleanup

    yield start
    for runner in runners:
        await runner.cleanup()


@dataclass
class Traffic:
    """Clients hammering https://SERVER_NAME/<path> until `stop()`; counts successes, keeps failures."""

    port: int
    tls: ssl.SSLContext
    path: str = "/soak"
    keep_alive_clients: int = 3
    new_connection_clients: int = 1
    websocket: bool = False
    accept: Callable[[Any], bool] = lambda body: True  # given the decoded JSON body of each 200
    ok: int = 0
    websocket_messages: int = 0
    failures: list[str] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> Traffic:
        for _ in range(self.keep_alive_clients):
            self._tasks.append(asyncio.create_task(self._requests(force_close=False)))
        for _ in range(self.new_connection_clients):
            self._tasks.append(asyncio.create_task(self._requests(force_close=True)))
        if self.websocket:
            self._tasks.append(asyncio.create_task(self._websocket()))
        return self

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.gather(*self._tasks)

    def _session(self, force_close: bool) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=self.tls, force_close=force_close, limit=1)
        return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10))

    async def _requests(self, force_close: bool) -> None:
        url = f"https://127.0.0.1:{self.port}{self.path}"
        async with self._session(force_close) as session:
            while not self._stopping.is_set():
                try:
                    async with session.get(url, server_hostname=SERVER_NAME, headers={"Host": SERVER_NAME}) as response:
                        body = await response.json() if response.status == 200 else await response.text()
                    if response.status == 200 and self.accept(body):
                        self.ok += 1
                    else:
                        self.failures.append(f"{response.status}: {str(body)[:200]}")
                except (aiohttp.ClientError, asyncio.TimeoutError, ssl.SSLError) as error:
                    self.failures.append(f"{'new' if force_close else 'keep-alive'} connection: {error!r}")
                    await asyncio.sleep(0.05)

    async def _websocket(self) -> None:
        url = f"https://127.0.0.1:{self.port}/ws"
        async with self._session(False) as session:
            try:
                async with session.ws_connect(url, server_hostname=SERVER_NAME, headers={"Host": SERVER_NAME}) as ws:
                    while not self._stopping.is_set():
                        await ws.send_str(f"m{self.websocket_messages}")
                        reply = await ws.receive(timeout=5)
                        if reply.type is not aiohttp.WSMsgType.TEXT or not reply.data.endswith(f"m{self.websocket_messages}"):
                            self.failures.append(f"websocket: {reply.type} {reply.data!r}")
                            return
                        self.websocket_messages += 1
                        await asyncio.sleep(0.05)
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                self.failures.append(f"websocket: {error!r}")
