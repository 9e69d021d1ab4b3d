"""End to end on loopback: real TLS clients (aiohttp/stdlib ssl, curl) → proxy → real aiohttp backends."""

from __future__ import annotations

import asyncio
import json
import ssl

import aiohttp
import pytest

from config.model import Address, PathType
from tests.conftest import certificate_for, simple_configuration

P, E = PathType.PREFIX, PathType.EXACT


def client_ssl(ca) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def fetch(session, url, ca, host=None, **kwargs):
    headers = kwargs.pop("headers", {})
    if host:
        headers["Host"] = host
    async with session.request(kwargs.pop("method", "GET"), url, ssl=client_ssl(ca), headers=headers, **kwargs) as response:
        return response.status, response.headers, await response.read()


@pytest.fixture
async def two_backends(start_backend):
    return await start_backend("one"), await start_backend("two")


async def test_routes_by_host_and_path_and_forwards_headers(ca, start_proxy, two_backends):
    one, two = two_backends
    configuration = simple_configuration(
        {"one": [one.address], "two": [two.address]},
        {"foo.test": [("/", P, "one"), ("/two", P, "two")], "*.wild.test": [("/exact", E, "two")]},
        certificates=(certificate_for(ca, "foo.test", "*.wild.test"),),
    )
    proxy = await start_proxy(configuration)
    base = f"https://127.0.0.1:{proxy.https_port}"
    async with aiohttp.ClientSession() as session:
        # SNI is the URL host for aiohttp: connect through a resolver override instead
        resolver_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=_LoopbackResolver()))
        async with resolver_session:
            status, headers, body = await fetch(resolver_session, f"https://foo.test:{proxy.https_port}/two/x?q=1", ca)
            assert status == 200
            seen = json.loads(body)
            assert seen["backend"] == "two" and seen["path_qs"] == "/two/x?q=1"
            assert seen["headers"]["Host"] == f"foo.test:{proxy.https_port}"
            assert seen["headers"]["X-Forwarded-For"] == "127.0.0.1"
            assert seen["headers"]["X-Forwarded-Proto"] == "https"
            assert seen["headers"]["X-Real-IP"] == "127.0.0.1"
            assert headers["Server"] and headers["Date"] and headers["Content-Type"].startswith("application/json")
            status, _, body = await fetch(resolver_session, f"https://foo.test:{proxy.https_port}/", ca)
            assert json.loads(body)["backend"] == "one"
            status, _, _ = await fetch(resolver_session, f"https://a.wild.test:{proxy.https_port}/exact/", ca)
            assert status == 404
            status, _, body = await fetch(resolver_session, f"https://a.wild.test:{proxy.https_port}/exact", ca)
            assert status == 200 and json.loads(body)["backend"] == "two"
        status, _, body = await fetch(session, f"http://127.0.0.1:{proxy.http_port}/", ca, host="foo.test")
        assert status == 200 and json.loads(body)["headers"]["X-Forwarded-Proto"] == "http"
        status, headers, body = await fetch(session, f"http://127.0.0.1:{proxy.http_port}/", ca, host="nothing.test")
        assert status == 404 and body == b"404 Not Found\n"


class _LoopbackResolver(aiohttp.abc.AbstractResolver):
    """Resolve every name to 127.0.0.1 so the client sends real SNI for test host names."""

    async def resolve(self, host, port=0, family=0):
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": 2, "proto": 0, "flags": 0}]

    async def close(self):
        pass


async def test_no_endpoints_is_503_and_dead_endpoint_is_502(ca, start_proxy, start_backend):
    configuration = simple_configuration(
        {"empty": [], "dead": [Address("127.0.0.1", 1)]},
        {"": [("/empty", P, "empty"), ("/dead", P, "dead")]},
    )
    proxy = await start_proxy(configuration)
    async with aiohttp.ClientSession() as session:
        status, _, _ = await fetch(session, f"http://127.0.0.1:{proxy.http_port}/empty", ca, host="x")
        assert status == 503
        status, _, _ = await fetch(session, f"http://127.0.0.1:{proxy.http_port}/dead", ca, host="x")
        assert status == 502


async def test_refused_endpoint_is_retried_on_the_next(ca, start_proxy, start_backend):
    alive = await start_backend("alive")
    configuration = simple_configuration(
        {"app": [Address("127.0.0.1", 1), alive.address]}, {"": [("/", P, "app")]}
    )
    proxy = await start_proxy(configuration)
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            status, _, body = await fetch(session, f"http://127.0.0.1:{proxy.http_port}/", ca, host="x")
            assert status == 200 and json.loads(body)["backend"] == "alive"


async def test_round_robin_reaches_every_endpoint(ca, start_proxy, start_backend):
    backends = [await start_backend(f"b{i}") for i in range(5)]
    configuration = simple_configuration({"app": [b.address for b in backends]}, {"": [("/", P, "app")]})
    proxy = await start_proxy(configuration)
    async with aiohttp.ClientSession() as session:
        seen = set()
        for _ in range(10):
            _, _, body = await fetch(session, f"http://127.0.0.1:{proxy.http_port}/", ca, host="x")
            seen.add(json.loads(body)["backend"])
    assert seen == {f"b{i}" for i in range(5)}
