"""Client certificates per host, end to end: `ingress-proxy serve --routes FILE` (the real process)
with `client_auth:` hosts, curl `--cert/--key` over HTTP/1.1 and HTTP/2 and a pyOpenSSL client,
certificates from CAs made here, and real backends (aiohttp over HTTP/1.1, an h2c server) that
show what reached them."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from OpenSSL import SSL
from OpenSSL._util import lib

from tests.e2e.test_route_policy import PROTOCOLS, curl, header
from tests.hostile.proxy_process import LOOPBACK, Ports, ProxyProcess, listen_section, write_certificate

pytestmark = pytest.mark.e2e
CERTIFICATE_HEADERS = ("ssl-client-verify", "ssl-client-subject-dn", "ssl-client-issuer-dn", "ssl-client-cert")
SPOOFED = ["-H", "ssl-client-verify: SUCCESS", "-H", "ssl-client-subject-dn: CN=admin", "-H", "ssl-client-cert: forged"]


@dataclass
class Client:
    cert: Path  # leaf (and intermediates) as curl --cert takes it
    key: Path
    leaf_pem: bytes

    def options(self) -> list[str]:
        return ["--cert", str(self.cert), "--key", str(self.key)]


def _client(ca: trustme.CA, directory: Path, name: str) -> Client:
    issued = ca.issue_cert(f"{name}@clients.test", common_name=name)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    return Client(cert, key, issued.cert_chain_pems[0].bytes())


class _H2cHeaders(asyncio.Protocol):
    """An h2c backend (the `h2` library, server side) answering each request with the request's
    headers as JSON: what an HTTP/2 backend of the proxy receives."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        import h2.config
        import h2.connection

        self.transport = transport
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.heads: dict[int, dict[str, str]] = {}
        transport.write(self.h2.data_to_send())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        import h2.events

        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.heads[event.stream_id] = dict(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                reply = json.dumps({"backend": "h2c", "headers": self.heads.pop(event.stream_id)}).encode()
                self.h2.send_headers(event.stream_id, [(":status", "200"), ("content-length", str(len(reply)))])
                self.h2.send_data(event.stream_id, reply, end_stream=True)
        self.transport.write(self.h2.data_to_send())  # type: ignore[attr-defined]


@dataclass
class Setup:
    process: ProxyProcess
    ca_file: str
    ca: trustme.CA
    alice: Client  # issued by the clients' CA
    mallory: Client  # issued by a CA nobody trusts
    bob: Client  # issued by an intermediate under `root`: one intermediate between him and the bundle

    @property
    def port(self) -> int:
        return self.process.ports.https


@pytest.fixture
async def setup(ca: trustme.CA, start_backend, tmp_path: Path) -> AsyncIterator[Setup]:
    clients, strangers, root = trustme.CA(organization_name="Clients CA"), trustme.CA(), trustme.CA()
    clients.cert_pem.write_to_path(str(tmp_path / "clients-ca.pem"))
    root.cert_pem.write_to_path(str(tmp_path / "root-ca.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "server-ca.pem"))
    backend = await start_backend("app")
    h2c = await asyncio.get_running_loop().create_server(_H2cHeaders, LOOPBACK, 0)
    names = ("on.test", "h2.test", "optional.test", "noca.test", "deep0.test", "deep1.test", "page.test", "open.test")
    certificate = write_certificate(ca, tmp_path, "site", *names)
    ports = Ports()

    def host(name: str, backend_name: str = "app", **client_auth: object) -> dict:
        entry: dict = {"host": name, "paths": [{"path": "/", "backend": backend_name}]}
        if client_auth:
            entry["client_auth"] = client_auth
        return entry

    document = {
        "listen": listen_section(ports),
        "tls": {"certificates": [certificate.entry()]},
        "routes": [
            host("on.test", ca="clients-ca.pem", verify="on", pass_certificate=True),
            host("h2.test", "h2c", ca="clients-ca.pem", pass_certificate=True),
            host("optional.test", ca="clients-ca.pem", verify="optional"),
            host("noca.test", ca="clients-ca.pem", verify="optional_no_ca"),
            host("deep0.test", ca="root-ca.pem", depth=0),
            host("deep1.test", ca="root-ca.pem"),  # the default depth, 1
            host("page.test", ca="clients-ca.pem", error_page="https://help.test/certificates"),
            host("open.test"),
        ],
        "backends": {
            "app": {"endpoints": [str(backend.address)]},
            "h2c": {"endpoints": [f"{LOOPBACK}:{h2c.sockets[0].getsockname()[1]}"], "protocol": "h2c"},
        },
    }
    process = await asyncio.to_thread(ProxyProcess, tmp_path, ports, document)
    intermediate = root.create_child_ca()
    try:
        yield Setup(
            process, str(tmp_path / "server-ca.pem"), ca,
            _client(clients, tmp_path, "alice"), _client(strangers, tmp_path, "mallory"), _client(intermediate, tmp_path, "bob"),
        )  # fmt: skip
    finally:
        h2c.close()
        assert await asyncio.to_thread(process.stop) == 0
        assert process.tracebacks() == []


def seen(response: dict) -> dict:
    assert response["status"] == 200, response
    return json.loads(response["body"])


def certificate_headers(seen_by_backend: dict) -> dict[str, list[str]]:
    return {name: header(seen_by_backend, name) for name in CERTIFICATE_HEADERS if header(seen_by_backend, name)}


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_valid_certificate_reaches_the_backend_as_ingress_nginx_headers(setup: Setup, protocol: str) -> None:
    got = seen(await curl(setup.port, setup.ca_file, protocol, "on.test", "/", *setup.alice.options(), *SPOOFED))
    headers = certificate_headers(got)
    assert headers["ssl-client-verify"] == ["SUCCESS"]
    assert headers["ssl-client-subject-dn"][0].startswith("CN=alice,")  # nginx's $ssl_client_s_dn (RFC 2253): most specific first
    assert headers["ssl-client-issuer-dn"][0].endswith(",O=Clients CA")
    assert [urllib.parse.unquote(value).encode() for value in headers["ssl-client-cert"]] == [setup.alice.leaf_pem]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_verify_on_refuses_a_missing_or_foreign_certificate_with_400(setup: Setup, protocol: str) -> None:
    missing = await curl(setup.port, setup.ca_file, protocol, "on.test", "/")
    assert (missing["status"], missing["body"]) == (400, b"400 Bad Request: No required SSL certificate was sent\n")
    foreign = await curl(setup.port, setup.ca_file, protocol, "on.test", "/", *setup.mallory.options())
    assert (foreign["status"], foreign["body"]) == (400, b"400 Bad Request: The SSL certificate error\n")


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_optional_modes(setup: Setup, protocol: str) -> None:
    none = certificate_headers(seen(await curl(setup.port, setup.ca_file, protocol, "optional.test", "/", *SPOOFED)))
    assert none == {"ssl-client-verify": ["NONE"]}  # and the client's spoofed copies are gone
    assert (await curl(setup.port, setup.ca_file, protocol, "optional.test", "/", *setup.mallory.options()))["status"] == 400
    valid = certificate_headers(seen(await curl(setup.port, setup.ca_file, protocol, "optional.test", "/", *setup.alice.options())))
    assert valid["ssl-client-verify"] == ["SUCCESS"] and "ssl-client-cert" not in valid  # pass_certificate is off
    unknown = certificate_headers(seen(await curl(setup.port, setup.ca_file, protocol, "noca.test", "/", *setup.mallory.options())))
    assert unknown["ssl-client-verify"][0].startswith("FAILED:") and unknown["ssl-client-subject-dn"][0].startswith("CN=mallory,")


async def test_depth_counts_the_intermediates_between_the_client_and_the_bundle(setup: Setup) -> None:
    too_deep = await curl(setup.port, setup.ca_file, "--http1.1", "deep0.test", "/", *setup.bob.options())
    assert (too_deep["status"], too_deep["body"]) == (400, b"400 Bad Request: The SSL certificate error\n")
    deep_enough = certificate_headers(seen(await curl(setup.port, setup.ca_file, "--http1.1", "deep1.test", "/", *setup.bob.options())))
    assert deep_enough["ssl-client-verify"] == ["SUCCESS"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_an_error_page_gets_the_refused_requests_instead_of_400(setup: Setup, protocol: str) -> None:
    for options in ([], setup.mallory.options()):
        answer = await curl(setup.port, setup.ca_file, protocol, "page.test", "/", *options)
        assert (answer["status"], answer["headers"]["location"]) == (302, "https://help.test/certificates")
    assert seen(await curl(setup.port, setup.ca_file, protocol, "page.test", "/", *setup.alice.options()))["backend"] == "app"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_host_without_client_auth_is_unaffected_and_never_gets_spoofed_headers(setup: Setup, protocol: str) -> None:
    for options in ([], setup.alice.options()):
        got = seen(await curl(setup.port, setup.ca_file, protocol, "open.test", "/", *options, *SPOOFED))
        assert certificate_headers(got) == {}


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_host_that_needs_a_certificate_on_a_connection_made_for_another_is_421(setup: Setup, protocol: str) -> None:
    """SNI open.test (no certificate asked), Host on.test: the request cannot have been verified."""
    answer = await curl(setup.port, setup.ca_file, protocol, "open.test", "/", "-H", "Host: on.test", *setup.alice.options())
    assert answer["status"] == 421


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_an_http2_backend_gets_the_headers_too(setup: Setup, protocol: str) -> None:
    got = seen(await curl(setup.port, setup.ca_file, protocol, "h2.test", "/", *setup.alice.options(), *SPOOFED))
    assert got["backend"] == "h2c"
    assert got["headers"]["ssl-client-verify"] == "SUCCESS" and got["headers"]["ssl-client-subject-dn"].startswith("CN=alice,")
    assert urllib.parse.unquote(got["headers"]["ssl-client-cert"]).encode() == setup.alice.leaf_pem


def _waiting(raw: socket.socket, call):  # type: ignore[no-untyped-def]
    """`call()` on a socket with a timeout (pyOpenSSL raises WantReadError instead of blocking)."""
    while True:
        try:
            return call()
        except SSL.WantReadError:
            if not select.select([raw], [], [], 20)[0]:
                raise TimeoutError("the proxy sent nothing for 20 s") from None


def _pyopenssl_get(setup: Setup, host: str, client: Client | None, session: SSL.Session | None, version: int) -> tuple[bytes, bool, SSL.Session]:
    """One HTTP/1.1 request from a pyOpenSSL client; (response, resumed, session for next time)."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(version)
    context.set_max_proto_version(version)
    context.load_verify_locations(setup.ca_file)
    context.set_verify(SSL.VERIFY_PEER, lambda *_: True)
    if client is not None:
        context.use_certificate_chain_file(str(client.cert))
        context.use_privatekey_file(str(client.key))
    with socket.create_connection((LOOPBACK, setup.port), timeout=20) as raw:
        connection = SSL.Connection(context, raw)
        connection.set_tlsext_host_name(host.encode())
        if session is not None:
            connection.set_session(session)
        connection.set_connect_state()
        _waiting(raw, connection.do_handshake)
        connection.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
        response = b""
        while not _complete(response):
            response += _waiting(raw, lambda: connection.recv(65536))
        resumed = bool(lib.SSL_session_reused(connection._ssl))
        connection.shutdown()  # our close_notify first: a clean end keeps the session resumable
        return response, resumed, connection.get_session()


def _complete(response: bytes) -> bool:
    head, separator, body = response.partition(b"\r\n\r\n")
    lengths = [line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    return bool(separator) and len(body) >= int(lengths[0])


@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION], ids=["tls1.2", "tls1.3"])
async def test_a_resumed_session_keeps_the_identity_and_does_not_cross_hosts(setup: Setup, version: int) -> None:
    full, resumed, session = await asyncio.to_thread(_pyopenssl_get, setup, "on.test", setup.alice, None, version)
    assert full.startswith(b"HTTP/1.1 200") and b'"CN=alice,' in full and not resumed
    again, resumed, _ = await asyncio.to_thread(_pyopenssl_get, setup, "on.test", None, session, version)
    assert resumed and again.startswith(b"HTTP/1.1 200") and b'"CN=alice,' in again  # no certificate sent this time

    _, _, open_session = await asyncio.to_thread(_pyopenssl_get, setup, "open.test", None, None, version)
    crossed, resumed, _ = await asyncio.to_thread(_pyopenssl_get, setup, "on.test", None, open_session, version)
    assert not resumed and crossed.startswith(b"HTTP/1.1 400")  # a full handshake: no certificate, refused
    plain, resumed, _ = await asyncio.to_thread(_pyopenssl_get, setup, "open.test", None, open_session, version)
    assert resumed and plain.startswith(b"HTTP/1.1 200")  # hosts without client auth resume as before
    foreign, resumed, _ = await asyncio.to_thread(_pyopenssl_get, setup, "optional.test", None, session, version)
    assert not resumed and foreign.startswith(b"HTTP/1.1 200")  # same CA, other mode: another session ID context

