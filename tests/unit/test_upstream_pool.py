"""The pool invariant (proxy/upstream.py): every way into an EndpointPool, over a real loopback socket.

A connection may go back only when its request was completely sent, its response completely
framed and read, and no byte arrived unasked; each row breaks exactly one of those.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from config.model import Address
from proxy.http1 import EndOfMessage, ResponseHead
from proxy.upstream import EndpointPool, UpstreamConnection, connect

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def _exchange(response: bytes, *, sent: bool = True, read_all: bool = True) -> tuple[UpstreamConnection, EndpointPool]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    address = Address("127.0.0.1", listener.getsockname()[1])
    loop = asyncio.get_running_loop()
    upstream = await connect(address, 5.0)
    backend, _ = await loop.sock_accept(listener)
    listener.close()
    upstream.begin_request(b"GET", lambda: 0)
    upstream.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    if sent:
        upstream.request_sent()
    await loop.sock_recv(backend, 65536)
    await loop.sock_sendall(backend, response)
    head = await upstream.next_event(5.0)
    assert isinstance(head, ResponseHead)
    if read_all:
        while type(await upstream.next_event(5.0)) is not EndOfMessage:
            pass
        await asyncio.sleep(0.05)  # let any bytes that followed in the same segment arrive
    pool = EndpointPool((address, None))
    pool.give_back(upstream)
    upstream.backend_socket = backend  # type: ignore[attr-defined]  # kept open for the test's end
    return upstream, pool


async def test_a_clean_exchange_is_pooled_and_reused() -> None:
    upstream, pool = await _exchange(OK)
    assert pool.take() is upstream


@pytest.mark.parametrize(
    ("case", "response", "sent", "read_all"),
    [
        ("request not completely sent", OK, False, True),
        ("response not completely read", OK, True, False),
        ("a second response nobody asked for", OK + OK, True, True),
        ("body bytes after a bodiless response", b"HTTP/1.1 204 No Content\r\n\r\nextra", True, True),
        ("backend asks to close", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", True, True),
        ("read-until-close body", b"HTTP/1.1 200 OK\r\n\r\nok", True, False),
    ],
)
async def test_anything_else_closes_instead_of_pooling(case: str, response: bytes, sent: bool, read_all: bool) -> None:
    upstream, pool = await _exchange(response, sent=sent, read_all=read_all)
    assert pool.take() is None, case
    assert upstream.closed, case


async def test_bytes_while_idle_in_the_pool_close_the_connection() -> None:
    upstream, pool = await _exchange(OK)
    backend: socket.socket = upstream.backend_socket  # type: ignore[attr-defined]
    await asyncio.get_running_loop().sock_sendall(backend, OK)  # an answer nobody is waiting for
    for _ in range(100):
        if upstream.closed:
            break
        await asyncio.sleep(0.01)
    assert upstream.closed and pool.take() is None
