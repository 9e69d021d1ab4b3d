"""Backends that misbehave on purpose, plus the shared recording backend, on one thread's loop.

Tests in this folder are synchronous socket clients of a proxy subprocess, so the backends run on
an asyncio loop in a background thread (`BackendZoo`). Each faulty backend is a tiny raw TCP
server that reads one request head and then does exactly one wrong thing; each counts the
connections it accepted so a test can tell whether the proxy reached it at all.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from config.model import Address
from tests.conftest import RecordingBackend, _start_backend

LOOPBACK = "127.0.0.1"
OVERSIZED_HEADER_BYTES = 80 * 1024  # above proxy.http1.MAX_RESPONSE_HEADER_BYTES (64 KiB)
MID_BODY_ANNOUNCED = 100_000
MID_BODY_SENT = 5_000


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def reset_after_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_head(reader)
    _reset(writer)


async def hang_after_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_head(reader)
    await reader.read()  # until the proxy gives up and closes


async def garbage_after_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_head(reader)
    writer.write(b"\x16\x03\x01\x00\xffSSH-2.0 this is not HTTP\r\n\r\n")
    await writer.drain()
    await reader.read()


async def oversized_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Huge: " + b"h" * OVERSIZED_HEADER_BYTES + b"\r\n\r\nok")
    await writer.drain()
    await reader.read()


async def close_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % MID_BODY_ANNOUNCED + b"b" * MID_BODY_SENT)
    await writer.drain()
    writer.close()


async def reset_mid_chunked_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n" + b"c" * 4096 + b"\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)
    _reset(writer)


async def hang_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    await writer.drain()
    await reader.read()


async def bad_framing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A response framed two ways: the proxy must not guess which one the backend meant."""
    await _read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    await writer.drain()
    await reader.read()


async def endless_interim_responses(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """103 Early Hints forever: each one is a response head, so no read timeout ever fires."""
    await _read_head(reader)
    while True:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n" * 64)
        await writer.drain()
        await asyncio.sleep(0.01)


async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accepts, then reads nothing at all: a request body upload stalls in the socket buffers."""
    await asyncio.Event().wait()


FAULTS: dict[str, Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]] = {
    "reset": reset_after_head,
    "hang": hang_after_head,
    "garbage": garbage_after_head,
    "oversized": oversized_headers,
    "midbody": close_mid_body,
    "chunkreset": reset_mid_chunked_body,
    "hangbody": hang_mid_body,
    "badframing": bad_framing,
    "interim": endless_interim_responses,
    "noread": never_reads,
}


@dataclass
class FaultyBackend:
    name: str
    address: Address
    connections: int = 0


class BackendZoo:
    """A thread with its own event loop serving the recording backend and one server per fault."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="backend-zoo", daemon=True)
        self._thread.start()
        self._servers: list[asyncio.Server] = []
        self._runners: list[web.AppRunner] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self.faulty: dict[str, FaultyBackend] = {}
        self.app = self.run(self._start_app("app"))
        for name, behaviour in FAULTS.items():
            self.faulty[name] = self.run(self._start_fault(name, behaviour))

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _start_app(self, name: str) -> RecordingBackend:
        backend, runner = await _start_backend(name)
        self._runners.append(runner)
        return backend

    async def _start_fault(
        self, name: str, behaviour: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
    ) -> FaultyBackend:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            backend.connections += 1
            self._handlers.add(asyncio.current_task())  # type: ignore[arg-type]
            try:
                await behaviour(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass
            finally:
                self._handlers.discard(asyncio.current_task())  # type: ignore[arg-type]
                writer.transport.abort()

        server = await asyncio.start_server(accept, LOOPBACK, 0)
        self._servers.append(server)
        backend = FaultyBackend(name, Address(LOOPBACK, server.sockets[0].getsockname()[1]))
        return backend

    async def _stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._handlers):
            task.cancel()
        for runner in self._runners:
            await runner.cleanup()

    def close(self) -> None:
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()
