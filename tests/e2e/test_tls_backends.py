"""Backends over TLS (issue 12), end to end: aiohttp client → proxy → aiohttp backends on stdlib ssl.

Each backend's certificate comes from a trustme CA made in the test; the proxy is given that CA
(or a wrong one, or a wrong name) through the same model values the routes file produces. The
backend answers with what its TLS layer saw (session reused, client certificate), so the tests
read the facts from the far end, not from the proxy's own account.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import trustme
from aiohttp import web
from prometheus_client import REGISTRY

from config.model import (
    Address,
    Backend,
    BackendProtocol,
    ClientCertificate,
    Configuration,
    PathRule,
    PathType,
    PemKey,
    RouteTable,
    Timeouts,
    UpstreamTls,
    VirtualHost,
)
from config.routes_file import load_routes_file
from tests.conftest import LOOPBACK

BACKEND_NAME = "backend.test"


def _upstream_errors(backend: str, kind: str) -> float:
    return REGISTRY.get_sample_value("ingress_proxy_upstream_errors_total", {"backend": backend, "kind": kind}) or 0.0


async def _tls_facts(request: web.Request) -> web.StreamResponse:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    assert ssl_object is not None, "the backend only listens over TLS"
    peer = ssl_object.getpeercert()
    subject = dict(item for entry in peer["subject"] for item in entry) if peer else None
    facts = {
        "version": ssl_object.version(),
        "resumed": ssl_object.session_reused,
        "client_certificate": subject,
        "sni": getattr(request.transport, "_sni", None),
    }
    response = web.json_response(facts)
    if request.path == "/close":
        response.force_close()  # every request then needs a new connection: resumption shows
    return response


@pytest.fixture
async def start_tls_backend() -> AsyncIterator[Callable[..., Awaitable[Address]]]:
    runners: list[web.AppRunner] = []

    async def start(
        ca: trustme.CA, *names: str, client_ca: trustme.CA | None = None, sni_seen: list[str] | None = None
    ) -> Address:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*(names or (BACKEND_NAME,))).configure_cert(context)
        if client_ca is not None:
            client_ca.configure_trust(context)
            context.verify_mode = ssl.CERT_REQUIRED
        if sni_seen is not None:
            context.sni_callback = lambda _ssl, name, _context: sni_seen.append(name or "")  # type: ignore[misc,func-returns-value]
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", _tls_facts)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, LOOPBACK, 0, ssl_context=context)
        await site.start()
        runners.append(runner)
        return Address(LOOPBACK, site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    yield start
    for runner in runners:
        await runner.cleanup()


def _configuration(address: Address, tls: UpstreamTls, name: str = "secure", timeouts: Timeouts | None = None) -> Configuration:
    backend = Backend(name, (address,), BackendProtocol.HTTPS, tls)
    routes = RouteTable((VirtualHost("", (PathRule("/", PathType.PREFIX, name),)),), (backend,))
    return Configuration(routes=routes, timeouts=timeouts or Timeouts(drain=2.0))


async def _get(port: int, path: str = "/") -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{LOOPBACK}:{port}{path}", timeout=aiohttp.ClientTimeout(total=30)) as response:
            return response.status, await response.read()


def _ca_pem(ca: trustme.CA) -> bytes:
    return ca.cert_pem.bytes()


async def test_right_ca_and_name_reaches_the_backend_over_tls_with_sni(start_proxy, start_tls_backend) -> None:
    backend_ca = trustme.CA()
    sni_seen: list[str] = []
    address = await start_tls_backend(backend_ca, sni_seen=sni_seen)
    tls = UpstreamTls(ca_pem=_ca_pem(backend_ca), verify=True, server_name=BACKEND_NAME)
    proxy = await start_proxy(_configuration(address, tls))
    status, body = await _get(proxy.http_port)
    assert status == 200, body
    assert json.loads(body)["version"] in ("TLSv1.2", "TLSv1.3")
    assert sni_seen == [BACKEND_NAME]


async def test_the_endpoint_ip_is_the_verified_name_when_none_is_configured(start_proxy, start_tls_backend) -> None:
    backend_ca = trustme.CA()
    sni_seen: list[str] = []
    address = await start_tls_backend(backend_ca, LOOPBACK, sni_seen=sni_seen)
    proxy = await start_proxy(_configuration(address, UpstreamTls(ca_pem=_ca_pem(backend_ca), verify=True)))
    status, body = await _get(proxy.http_port)
    assert status == 200, body
    assert sni_seen == [""]  # an IP address is never sent as SNI (RFC 6066 §3)


async def test_wrong_ca_is_a_502_labelled_untrusted(start_proxy, start_tls_backend) -> None:
    address = await start_tls_backend(trustme.CA())
    tls = UpstreamTls(ca_pem=_ca_pem(trustme.CA()), verify=True, server_name=BACKEND_NAME)
    proxy = await start_proxy(_configuration(address, tls, name="wrong-ca"))
    before = _upstream_errors("wrong-ca", "tls untrusted")
    status, _ = await _get(proxy.http_port)
    assert status == 502
    assert _upstream_errors("wrong-ca", "tls untrusted") == before + 1


async def test_wrong_name_is_a_502_labelled_name_mismatch(start_proxy, start_tls_backend) -> None:
    backend_ca = trustme.CA()
    address = await start_tls_backend(backend_ca)
    tls = UpstreamTls(ca_pem=_ca_pem(backend_ca), verify=True, server_name="other.test")
    proxy = await start_proxy(_configuration(address, tls, name="wrong-name"))
    before = _upstream_errors("wrong-name", "tls name mismatch")
    status, _ = await _get(proxy.http_port)
    assert status == 502
    assert _upstream_errors("wrong-name", "tls name mismatch") == before + 1


async def test_without_verification_any_certificate_is_accepted(start_proxy, start_tls_backend) -> None:
    address = await start_tls_backend(trustme.CA())
    proxy = await start_proxy(_configuration(address, UpstreamTls()))
    status, _ = await _get(proxy.http_port)
    assert status == 200


async def test_mtls_backend_gets_the_client_certificate_and_refuses_without_one(start_proxy, start_tls_backend) -> None:
    backend_ca, client_ca = trustme.CA(), trustme.CA()
    address = await start_tls_backend(backend_ca, client_ca=client_ca)
    issued = client_ca.issue_cert("proxy.client.test")
    client = ClientCertificate(
        b"".join(blob.bytes() for blob in issued.cert_chain_pems), PemKey(issued.private_key_pem.bytes()), "test"
    )
    with_certificate = UpstreamTls(ca_pem=_ca_pem(backend_ca), verify=True, server_name=BACKEND_NAME, client_certificate=client)
    proxy = await start_proxy(_configuration(address, with_certificate))
    status, body = await _get(proxy.http_port)
    assert status == 200, body
    assert json.loads(body)["client_certificate"] is not None

    without = UpstreamTls(ca_pem=_ca_pem(backend_ca), verify=True, server_name=BACKEND_NAME)
    refused = await start_proxy(_configuration(address, without, name="no-client-cert"))
    status, _ = await _get(refused.http_port)
    assert status == 502


async def test_new_connections_resume_the_backend_session(start_proxy, start_tls_backend) -> None:
    backend_ca = trustme.CA()
    address = await start_tls_backend(backend_ca)
    tls = UpstreamTls(ca_pem=_ca_pem(backend_ca), verify=True, server_name=BACKEND_NAME)
    proxy = await start_proxy(_configuration(address, tls))
    facts = []
    for _ in range(3):  # /close: the backend closes after each response, so each is a new connection
        status, body = await _get(proxy.http_port, "/close")
        assert status == 200
        facts.append(json.loads(body)["resumed"])
    assert facts == [False, True, True]


async def test_keep_alive_reuses_one_tls_connection(start_proxy, start_tls_backend) -> None:
    backend_ca = trustme.CA()
    address = await start_tls_backend(backend_ca)
    tls = UpstreamTls(ca_pem=_ca_pem(backend_ca), verify=True, server_name=BACKEND_NAME)
    proxy = await start_proxy(_configuration(address, tls))
    for _ in range(5):
        status, _ = await _get(proxy.http_port)
        assert status == 200
    pools = [pool for key, pool in proxy.server.balancer._pools.items() if key[0] == address]
    assert len(pools) == 1 and len(pools[0]._idle) == 1


async def test_a_plaintext_backend_behind_protocol_https_is_a_502_and_gets_no_plaintext(start_proxy, start_backend) -> None:
    plain = await start_backend("plain")
    proxy = await start_proxy(_configuration(plain.address, UpstreamTls(), name="plain-as-tls"))
    before = _upstream_errors("plain-as-tls", "tls handshake failed")
    status, _ = await _get(proxy.http_port)
    assert status == 502
    assert plain.received == []  # never a silent plaintext fallback
    assert _upstream_errors("plain-as-tls", "tls handshake failed") == before + 1


async def test_a_backend_that_never_answers_the_handshake_is_a_502_labelled_timeout(start_proxy) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # hold the connection open, say nothing

    server = await asyncio.start_server(silent, LOOPBACK, 0)
    address = Address(LOOPBACK, server.sockets[0].getsockname()[1])
    try:
        timeouts = Timeouts(drain=2.0, backend_handshake=0.5)
        proxy = await start_proxy(_configuration(address, UpstreamTls(), name="silent", timeouts=timeouts))
        before = _upstream_errors("silent", "tls handshake timeout")
        status, _ = await _get(proxy.http_port)
        assert status == 502
        assert _upstream_errors("silent", "tls handshake timeout") == before + 1
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_client_key_that_does_not_load_is_a_problem_and_a_502_never_plaintext(start_proxy, start_tls_backend) -> None:
    backend_ca = trustme.CA()
    address = await start_tls_backend(backend_ca)
    broken = ClientCertificate(b"not a certificate", PemKey(b"not a key"), "test")
    tls = UpstreamTls(ca_pem=_ca_pem(backend_ca), verify=True, server_name=BACKEND_NAME, client_certificate=broken)
    proxy = await start_proxy(_configuration(address, tls, name="broken-client"))
    problems = proxy.server.publish(_configuration(address, tls, name="broken-client"))
    assert [problem.location for problem in problems] == ["backend broken-client"]
    before = _upstream_errors("broken-client", "tls not configured")
    status, _ = await _get(proxy.http_port)
    assert status == 502
    assert _upstream_errors("broken-client", "tls not configured") == before + 1


async def test_a_routes_file_backend_over_tls_end_to_end(tmp_path, start_proxy, start_tls_backend) -> None:
    backend_ca, client_ca = trustme.CA(), trustme.CA()
    address = await start_tls_backend(backend_ca, client_ca=client_ca)
    issued = client_ca.issue_cert("proxy.client.test")
    backend_ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    issued.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    (tmp_path / "routes.yaml").write_text(
        "listen: {https: 127.0.0.1:8443}\n"  # start_proxy binds its own ephemeral ports
        "routes: [{paths: [{path: /, backend: secure}]}]\n"
        f"backends: {{secure: {{endpoints: ['{address}'], protocol: https, "
        f"tls: {{ca: ca.pem, server_name: {BACKEND_NAME}, cert: client.pem, key: client.key}}}}}}\n"
    )
    configuration = load_routes_file(tmp_path / "routes.yaml").configuration
    proxy = await start_proxy(dataclasses.replace(configuration, timeouts=Timeouts(drain=2.0)))
    status, body = await _get(proxy.http_port)
    assert status == 200, body
    assert json.loads(body)["client_certificate"] is not None
