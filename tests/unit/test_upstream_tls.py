"""The client TLS machine (proxy/upstream_tls.py) pumped against the server one in memory."""

from __future__ import annotations

import pytest
import trustme
from OpenSSL import SSL, crypto

from config.model import Address, Backend, BackendProtocol, ClientCertificate, PemKey, UpstreamTls
from proxy.decisions import FailureKind
from proxy.tls import ServerTls
from proxy.tls import TlsState as ServerState
from proxy.upstream_tls import ClientTls, TlsState, UpstreamContextCache, UpstreamTlsFailure, UpstreamTransport, new_client_context

ENDPOINT = Address("127.0.0.1", 8443)


def _install_pem(context: SSL.Context, key: object) -> str:
    assert isinstance(key, PemKey)
    context.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, key.pem))
    return "file"


def server_context(ca: trustme.CA, *names: str, client_ca: trustme.CA | None = None) -> SSL.Context:
    issued = ca.issue_cert(*names)
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, issued.cert_chain_pems[0].bytes()))
    context.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, issued.private_key_pem.bytes()))
    if client_ca is not None:
        context.get_cert_store().add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, client_ca.cert_pem.bytes()))  # type: ignore[union-attr]
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    return context


def pump(client: ClientTls, server: ServerTls) -> None:
    """Move bytes both ways until neither side has anything to say."""
    for _ in range(20):
        to_server, to_client = client.outgoing(), server.outgoing()
        if not to_server and not to_client:
            return
        if to_server:
            server.receive(to_server)
        if to_client:
            client.receive(to_client)
    raise AssertionError("the peers kept talking")


def connect(settings: UpstreamTls, server: SSL.Context, transport: UpstreamTransport | None = None) -> tuple[ClientTls, ServerTls]:
    transport = transport or UpstreamTransport(settings, new_client_context(settings, _install_pem), None)
    client, peer = transport.client(ENDPOINT), ServerTls(server)
    client.start()
    pump(client, peer)
    return client, peer


def test_verified_handshake_then_data_both_ways() -> None:
    ca = trustme.CA()
    client, server = connect(UpstreamTls(ca.cert_pem.bytes(), verify=True, server_name="b.test"), server_context(ca, "b.test"))
    assert client.state is TlsState.OPEN and server.state is ServerState.OPEN
    assert server.server_name == "b.test"  # SNI
    client.send(b"GET / HTTP/1.1\r\n\r\n")
    assert server.receive(client.outgoing()) == b"GET / HTTP/1.1\r\n\r\n"
    server.send(b"x" * 100_000)  # several records
    assert client.receive(server.outgoing()) == b"x" * 100_000
    server.close()
    client.receive(server.outgoing())
    assert client.state is TlsState.PEER_CLOSED and client.input_ended  # the backend closed; ours follows on close()


@pytest.mark.parametrize(
    ("case", "trusted", "certificate_names", "server_name", "kind"),
    [
        ("another CA signed it", False, ("b.test",), "b.test", FailureKind.TLS_UNTRUSTED),
        ("the certificate names another host", True, ("other.test",), "b.test", FailureKind.TLS_NAME_MISMATCH),
        ("a wildcard covers one label only", True, ("*.b.test",), "x.y.b.test", FailureKind.TLS_NAME_MISMATCH),
        ("an IP the certificate does not carry", True, ("b.test",), "127.0.0.1", FailureKind.TLS_NAME_MISMATCH),
    ],
)
def test_verification_failures_are_classified(case: str, trusted: bool, certificate_names: tuple[str, ...], server_name: str, kind: FailureKind) -> None:
    ca = trustme.CA()
    client_ca = ca if trusted else trustme.CA()
    settings = UpstreamTls(client_ca.cert_pem.bytes(), verify=True, server_name=server_name)
    with pytest.raises(UpstreamTlsFailure) as raised:
        connect(settings, server_context(ca, *certificate_names))
    assert raised.value.kind is kind, case


def test_the_endpoint_host_is_verified_when_no_name_is_configured() -> None:
    ca = trustme.CA()
    client, _ = connect(UpstreamTls(ca.cert_pem.bytes(), verify=True), server_context(ca, "127.0.0.1"))
    assert client.state is TlsState.OPEN


def test_a_server_requiring_a_client_certificate_gets_ours() -> None:
    ca, client_ca = trustme.CA(), trustme.CA()
    issued = client_ca.issue_cert("proxy.test")
    certificate = ClientCertificate(issued.cert_chain_pems[0].bytes(), PemKey(issued.private_key_pem.bytes()), "test")
    settings = UpstreamTls(ca.cert_pem.bytes(), verify=True, server_name="b.test", client_certificate=certificate)
    client, server = connect(settings, server_context(ca, "b.test", client_ca=client_ca))
    peer_certificate = server.connection.get_peer_certificate()
    assert peer_certificate is not None and peer_certificate.get_subject().organizationalUnitName is not None
    client.send(b"ping")
    assert server.receive(client.outgoing()) == b"ping"


def test_without_a_client_certificate_the_server_refuses_after_our_finished() -> None:
    ca, client_ca = trustme.CA(), trustme.CA()
    settings = UpstreamTls(ca.cert_pem.bytes(), verify=True, server_name="b.test")
    transport = UpstreamTransport(settings, new_client_context(settings, _install_pem), None)
    client, server = transport.client(ENDPOINT), ServerTls(server_context(ca, "b.test", client_ca=client_ca))
    client.start()
    with pytest.raises(Exception):  # the server's side fails first (TLS 1.3: after the client's Finished)
        pump(client, server)
    with pytest.raises(UpstreamTlsFailure) as raised:
        client.receive(server.outgoing())  # the alert reaches us as a failure, never as plaintext
    assert raised.value.kind in (FailureKind.TLS_FAILED, FailureKind.TLS_HANDSHAKE_FAILED)


@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])
def test_the_next_connection_resumes_the_remembered_session(version: int) -> None:
    ca = trustme.CA()
    server = server_context(ca, "b.test")
    server.set_min_proto_version(version)
    server.set_max_proto_version(version)
    server.set_session_id(b"test")
    settings = UpstreamTls(ca.cert_pem.bytes(), verify=True, server_name="b.test")
    transport = UpstreamTransport(settings, new_client_context(settings, _install_pem), None)
    first, peer = connect(settings, server, transport)
    assert not first.resumed
    peer.send(b"response")  # TLS 1.3: the ticket travels before it
    first.receive(peer.outgoing())
    transport.remember(ENDPOINT, first)
    second, _ = connect(settings, server, transport)
    assert second.resumed
    other_endpoint = transport.client(Address("127.0.0.2", 8443))
    other_endpoint.start()
    assert not other_endpoint.resumed  # sessions are per endpoint


def test_a_tls13_session_without_its_ticket_is_not_remembered() -> None:
    ca = trustme.CA()
    settings = UpstreamTls(ca.cert_pem.bytes(), verify=True, server_name="b.test")
    transport = UpstreamTransport(settings, new_client_context(settings, _install_pem), None)
    client, peer = transport.client(ENDPOINT), ServerTls(server_context(ca, "b.test"))
    client.start()
    peer.receive(client.outgoing())
    client.receive(peer.outgoing())  # the server's flight: we are OPEN, the ticket not read yet
    assert client.state is TlsState.OPEN
    transport.remember(ENDPOINT, client)
    assert transport._sessions == {}


def test_contexts_are_reused_across_publishes_and_failures_reported() -> None:
    cache = UpstreamContextCache()
    good = Backend("good", (ENDPOINT,), BackendProtocol.HTTPS, UpstreamTls())
    broken_certificate = ClientCertificate(b"no", PemKey(b"no"), "routes.yaml:3:5")
    broken = Backend("broken", (ENDPOINT,), BackendProtocol.HTTPS, UpstreamTls(client_certificate=broken_certificate))
    plain = Backend("plain", (ENDPOINT,))
    transports, problems = cache.build((good, broken, plain), _install_pem)
    assert set(transports) == {"good", "broken"}
    assert [problem.location for problem in problems] == ["backend broken"]
    with pytest.raises(UpstreamTlsFailure) as raised:
        transports["broken"].client(ENDPOINT)
    assert raised.value.kind is FailureKind.TLS_NOT_CONFIGURED
    again, _ = cache.build((good,), _install_pem)
    assert again["good"] is transports["good"]  # same settings: same context and sessions
    other_runtime, _ = cache.build((good,), lambda context, key: "file")
    assert other_runtime["good"] is not transports["good"]  # a new crypto runtime rebuilds


async def test_a_request_after_the_backends_close_notify_is_a_stale_keep_alive_not_a_tls_failure() -> None:
    from proxy.flow import ConnectionGone
    from proxy.upstream import TlsUpstreamConnection

    ca = trustme.CA()
    settings = UpstreamTls(ca.cert_pem.bytes(), verify=True, server_name="b.test")
    transport = UpstreamTransport(settings, new_client_context(settings, _install_pem), None)
    connection = TlsUpstreamConnection(ENDPOINT, transport)
    server = ServerTls(server_context(ca, "b.test"))
    connection.tls.start()
    pump(connection.tls, server)
    server.close()  # the backend closes an idle keep-alive connection
    connection.tls.receive(server.outgoing())
    connection.transport = object()  # type: ignore[assignment]  # never written to: the request is refused first
    with pytest.raises(ConnectionGone):  # → FailureKind.RESET: retried on a fresh connection when replayable
        connection.write(b"GET / HTTP/1.1\r\n\r\n")
