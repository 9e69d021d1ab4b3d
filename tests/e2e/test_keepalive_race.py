"""A backend that drops a kept-alive connection instead of answering its next request (what an
idle timeout racing our request looks like): idempotent requests are retried on a fresh
connection, others get 502 because they may have been processed."""

from __future__ import annotations

import asyncio

import pytest

from config.model import Address, PathType
from tests.conftest import simple_configuration
from tests.e2e.helpers import open_raw, read_response


@pytest.fixture
async def one_shot_backend():
    """Answers the first request on each connection (claiming keep-alive), then closes on the next."""
    served: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        served.append(head.split(b"\r\n")[0])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the second request on this connection: drop it
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield Address("127.0.0.1", server.sockets[0].getsockname()[1]), served
    server.close()


async def test_reused_connection_closed_by_backend_is_retried_for_get_only(start_proxy, one_shot_backend):
    address, served = one_shot_backend
    proxy = await start_proxy(simple_configuration({"app": [address]}, {"": [("/", PathType.PREFIX, "app")]}))
    reader, writer = await open_raw(proxy.http_port)
    for path in (b"/1", b"/2", b"/3"):
        writer.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
        status, _, body = await read_response(reader)
        assert (status, body) == (200, b"ok")
    writer.write(b"POST /4 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
    status, _, _ = await read_response(reader)
    assert status == 502
    assert served == [b"GET /1 HTTP/1.1", b"GET /2 HTTP/1.1", b"GET /3 HTTP/1.1"]


async def test_keep_alive_connection_survives_local_and_backend_errors(start_proxy, start_backend):
    alive = await start_backend("alive")
    configuration = simple_configuration(
        {"dead": [Address("127.0.0.1", 1)], "empty": [], "alive": [alive.address]},
        {"": [("/dead", PathType.PREFIX, "dead"), ("/empty", PathType.PREFIX, "empty"), ("/alive", PathType.PREFIX, "alive")]},
    )
    proxy = await start_proxy(configuration)
    reader, writer = await open_raw(proxy.http_port)
    for path, expected in ((b"/dead", 502), (b"/alive", 200), (b"/empty", 503), (b"/nowhere", 404), (b"/alive", 200)):
        writer.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
        status, _, _ = await read_response(reader)
        assert status == expected, path
    writer.close()
