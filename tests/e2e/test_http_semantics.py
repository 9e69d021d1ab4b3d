"""HTTP/1.1 behaviour through the proxy with exact bytes on the wire: keep-alive, pipelining,
framing, upgrades, local answers, and refusal of hostile requests (nothing smuggled reaches the
backend, which records every request it receives)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from config.model import Hsts, PathType
from tests.conftest import simple_configuration
from tests.e2e.helpers import closed_by_peer, open_raw, read_response

P = PathType.PREFIX


@pytest.fixture
async def proxied(start_proxy, start_backend):
    backend = await start_backend("app")
    proxy = await start_proxy(simple_configuration({"app": [backend.address]}, {"": [("/", P, "app")]}))
    return proxy, backend


async def test_keep_alive_and_pipelined_requests_answered_in_order(proxied):
    proxy, backend = proxied
    reader, writer = await open_raw(proxy.http_port)
    writer.write(b"".join(b"GET /n/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(5)))
    for i in range(5):
        status, _, body = await read_response(reader)
        assert status == 200 and json.loads(body)["path_qs"] == f"/n/{i}"
    writer.write(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await read_response(reader)
    assert json.loads(body)["path_qs"] == "/again"
    assert len(proxy.server.connections) == 1
    writer.close()


async def test_chunked_request_body_is_streamed_and_rechunked(proxied):
    proxy, backend = proxied
    reader, writer = await open_raw(proxy.http_port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["body_length"] == 11
    assert backend.received[-1]["headers"]["Transfer-Encoding"] == "chunked"
    writer.close()


async def test_head_and_http10(proxied):
    proxy, _ = proxied
    reader, writer = await open_raw(proxy.http_port)
    writer.write(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /after-head HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5), None, None
    assert b" 200 " in status
    status, _, body = await read_response(reader)
    assert json.loads(body)["path_qs"] == "/after-head"
    writer.close()
    reader, writer = await open_raw(proxy.http_port)
    writer.write(b"GET /old HTTP/1.0\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == 200 and json.loads(body)["path_qs"] == "/old"
    assert await closed_by_peer(reader)


async def test_expect_100_continue_is_answered_by_the_proxy(proxied):
    proxy, _ = proxied
    reader, writer = await open_raw(proxy.http_port)
    writer.write(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 ")
    writer.write(b"body")
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["body_length"] == 4
    writer.close()


async def test_websocket_is_tunnelled_both_ways(proxied):
    proxy, _ = proxied
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://127.0.0.1:{proxy.http_port}/ws") as ws:
            for text in ("one", "two"):
                await ws.send_str(text)
                assert (await ws.receive(timeout=5)).data == f"app:{text}"


SMUGGLING = {
    "cl-and-te": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "te-and-cl": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "duplicate-content-length": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 30\r\n\r\nabcdGET /smuggled HTTP/1.1\r\n\r\n", 400),
    "obfuscated-te": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501),
    "te-space-before-colon": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
    "nul-in-header": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    "absolute-form": (b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "authority-form": (b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", 405),
    "missing-host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "two-hosts": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "bad-chunk-size": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    "invalid-method": (b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "long-uri": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    "huge-headers": (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 40000 + b"\r\n\r\n", 431),
    "too-many-headers": (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(150)) + b"\r\n", 431),
}


@pytest.mark.parametrize("request_bytes, status", SMUGGLING.values(), ids=SMUGGLING.keys())
async def test_hostile_request_is_refused_and_nothing_reaches_the_backend(proxied, request_bytes, status):
    proxy, backend = proxied
    reader, writer = await open_raw(proxy.http_port)
    writer.write(request_bytes)
    answer, _, _ = await read_response(reader)
    assert answer == status
    assert await closed_by_peer(reader)
    await asyncio.sleep(0.05)
    assert backend.received == [], "a refused request or a smuggled one reached the backend"


async def test_valid_request_then_garbage_serves_the_first_and_closes(proxied):
    proxy, backend = proxied
    reader, writer = await open_raw(proxy.http_port)
    writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n\x16\x03garbage\r\n\r\n")
    status, _, _ = await read_response(reader)
    assert status == 200
    status, _, _ = await read_response(reader)
    assert status == 400
    assert await closed_by_peer(reader)
    assert [seen["path_qs"] for seen in backend.received] == ["/ok"]


async def test_redirect_to_https_and_hsts(start_proxy, start_backend):
    from config.model import RouteTable, VirtualHost, PathRule, Backend, Configuration

    backend = await start_backend("app")
    table = RouteTable(
        (VirtualHost("secure.test", (PathRule("/", P, "app"),), redirect_to_https=True),),
        (Backend("app", (backend.address,)),),
    )
    proxy = await start_proxy(Configuration(routes=table, hsts=Hsts(max_age=600)))
    reader, writer = await open_raw(proxy.http_port)
    writer.write(b"GET /a?b=1 HTTP/1.1\r\nHost: secure.test\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status == 308
    assert headers["location"] == f"https://secure.test:{proxy.https_port}/a?b=1"
    assert "strict-transport-security" not in headers
    from tests.e2e.helpers import tls_client_context

    reader, writer = await open_raw(proxy.https_port, tls_client_context(), "secure.test")
    writer.write(b"GET / HTTP/1.1\r\nHost: secure.test\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["strict-transport-security"] == "max-age=600"
    writer.close()
