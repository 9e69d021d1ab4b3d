"""The TLS state machine pumped against an in-memory pyOpenSSL client: no sockets, no loop."""

from __future__ import annotations

import pytest
import trustme
from OpenSSL import SSL, crypto

from proxy.tls import ServerTls, TlsFailure, TlsState
from tests.memory_tls import handshake, pending


@pytest.fixture(scope="module")
def server_context(ca: trustme.CA) -> SSL.Context:
    issued = ca.issue_cert("tls.test")
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, issued.cert_chain_pems[0].bytes()))
    context.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, issued.private_key_pem.bytes()))
    return context


def new_client(version: int = SSL.TLS1_3_VERSION, session: SSL.Session | None = None) -> SSL.Connection:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(version)
    context.set_max_proto_version(version)
    client = SSL.Connection(context, None)
    client.set_connect_state()
    client.set_tlsext_host_name(b"tls.test")
    if session is not None:
        client.set_session(session)
    return client


@pytest.mark.parametrize("version, name", [(SSL.TLS1_2_VERSION, "TLSv1.2"), (SSL.TLS1_3_VERSION, "TLSv1.3")])
def test_handshake_data_both_ways_and_close_notify(server_context, version, name):
    server, client = ServerTls(server_context), new_client(version)
    assert server.state is TlsState.HANDSHAKING
    handshake(server, client)
    assert (server.state, server.version, server.server_name) == (TlsState.OPEN, name, "tls.test")
    client.send(b"ping")
    client.send(b"pong")
    assert server.receive(pending(client)) == b"pingpong"  # two records, one call
    big = b"x" * 100_000  # more than one 16 KiB record: partial writes are looped
    server.send(big)
    client.bio_write(server.outgoing())
    received = b""
    while len(received) < len(big):
        received += client.recv(1 << 20)
    assert received == big
    server.close()
    client.bio_write(server.outgoing())
    with pytest.raises(SSL.ZeroReturnError):
        client.recv(10)
    assert server.state is TlsState.CLOSED


@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])
def test_peer_close_notify_ends_input_but_answers_still_go_out(server_context, version):
    """A client may send its request and its close_notify in one flight: the request's plaintext
    comes out, nothing after it, and the answer can still be sent before our own close_notify."""
    server, client = ServerTls(server_context), new_client(version)
    handshake(server, client)
    client.send(b"GET / HTTP/1.1\r\n\r\n")
    client.shutdown()
    assert server.receive(pending(client)) == b"GET / HTTP/1.1\r\n\r\n"
    assert (server.state, server.input_ended, server.sendable) == (TlsState.PEER_CLOSED, True, True)
    assert server.receive(b"\x17\x03\x03\x00\x05more?") == b""  # nothing is read after close_notify
    server.send(b"HTTP/1.1 200 OK\r\n\r\n")
    server.close()
    client.bio_write(server.outgoing())
    assert client.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"
    with pytest.raises(SSL.ZeroReturnError):  # then our close_notify
        client.recv(10)
    assert (server.state, server.sendable) == (TlsState.CLOSED, False)
    with pytest.raises(TlsFailure):
        server.send(b"too late")


def test_garbage_breaks_the_session_and_queues_an_alert(server_context):
    server = ServerTls(server_context)
    with pytest.raises(TlsFailure) as failure:
        server.receive(b"\x16\x03\x01\x00\x05hello")
    assert server.state is TlsState.BROKEN
    assert failure.value.reason
    assert server.outgoing()[:1] == b"\x15"  # an alert record
    assert server.receive(b"more") == b""  # a broken session ignores further input


def test_partial_client_hello_waits_for_more(server_context):
    server, client = ServerTls(server_context), new_client()
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()
    hello = pending(client)
    assert server.receive(hello[:10]) == b""
    assert server.state is TlsState.HANDSHAKING and server.outgoing() == b""
    server.receive(hello[10:])
    assert server.outgoing()  # the ServerHello flight


@pytest.mark.parametrize("closed_quietly", [True, False])
def test_quiet_shutdown_keeps_the_session_resumable(ca, closed_quietly):
    issued = ca.issue_cert("tls.test")
    context = SSL.Context(SSL.TLS_SERVER_METHOD)  # session cache only: no tickets to fall back on
    context.set_options(SSL.OP_NO_TICKET)
    context.set_session_id(b"test")
    context.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, issued.cert_chain_pems[0].bytes()))
    context.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, issued.private_key_pem.bytes()))
    server, client = ServerTls(context), new_client(SSL.TLS1_2_VERSION)
    handshake(server, client)
    session = client.get_session()
    if closed_quietly:
        server.close()
    del server  # SSL_free: without both shutdown flags OpenSSL evicts the session
    resumed_server, resumed_client = ServerTls(context), new_client(SSL.TLS1_2_VERSION, session)
    handshake(resumed_server, resumed_client)
    assert resumed_server.resumed is closed_quietly


def test_only_allowed_transitions(server_context):
    server = ServerTls(server_context)
    server.close()
    assert server.state is TlsState.CLOSED
    with pytest.raises(AssertionError):
        server._move(TlsState.OPEN)
