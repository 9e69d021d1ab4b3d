"""A client's close_notify ends its input, not our answers (TLS 1.3 half-close; OpenSSL allows
sending until our own close_notify). Clients that send a request and close_notify in one flight
get the whole response and then our close_notify, over HTTP/1.1 and HTTP/2, and a drain that
meets such a connection finishes cleanly."""

from __future__ import annotations

import asyncio
import socket
import struct

import h2.connection
import h2.events
import pytest
import trustme
from OpenSSL import SSL, crypto

from config.model import PathType
from tests.conftest import certificate_for, simple_configuration

HOST = "half-close.test"


@pytest.fixture
async def proxy_and_backend(ca, start_proxy, start_backend):
    backend = await start_backend("app")
    certificate = certificate_for(ca, HOST, key_type=trustme.KeyType.ECDSA)
    configuration = simple_configuration({"app": [backend.address]}, {HOST: [("/", PathType.PREFIX, "app")]}, certificates=(certificate,))
    return await start_proxy(configuration), backend


def _client(ca: trustme.CA, port: int, version: int, alpn: list[bytes]) -> SSL.Connection:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(version)
    context.set_max_proto_version(version)
    context.set_verify(SSL.VERIFY_PEER)
    store = context.get_cert_store()
    assert store is not None
    store.add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, ca.cert_pem.bytes()))
    if alpn:
        context.set_alpn_protos(alpn)
    raw = socket.create_connection(("127.0.0.1", port))  # blocking, as pyOpenSSL wants it; a stuck read
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))  # fails after 10 s
    connection = SSL.Connection(context, raw)
    connection.set_tlsext_host_name(HOST.encode())
    connection.set_connect_state()
    connection.do_handshake()
    return connection


def _read_until_close_notify(connection: SSL.Connection) -> bytes:
    """Everything the proxy sends, up to its close_notify (an EOF without one fails the test)."""
    received = b""
    while True:
        try:
            chunk = connection.recv(65536)
        except SSL.ZeroReturnError:
            return received
        received += chunk


def _http1_request_then_close_notify(ca: trustme.CA, port: int, version: int) -> bytes:
    connection = _client(ca, port, version, [])
    try:
        connection.sendall(b"GET /asked HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n\r\n")
        connection.shutdown()  # our close_notify right behind the request
        return _read_until_close_notify(connection)
    finally:
        connection.sock_shutdown(socket.SHUT_RDWR)


def _http2_request_then_close_notify(ca: trustme.CA, port: int) -> tuple[int, bytes]:
    connection = _client(ca, port, SSL.TLS1_3_VERSION, [b"h2"])
    try:
        assert connection.get_alpn_proto_negotiated() == b"h2"
        session = h2.connection.H2Connection()
        session.initiate_connection()
        headers = [(":method", "GET"), (":path", "/asked"), (":scheme", "https"), (":authority", HOST)]
        session.send_headers(1, headers, end_stream=True)
        connection.sendall(session.data_to_send())
        connection.shutdown()
        status, body = 0, b""
        for event in session.receive_data(_read_until_close_notify(connection)):
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
        return status, body
    finally:
        connection.sock_shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION], ids=["TLSv1.2", "TLSv1.3"])
async def test_http1_request_with_close_notify_gets_the_whole_response(ca, proxy_and_backend, version):
    proxy, backend = proxy_and_backend
    response = await asyncio.to_thread(_http1_request_then_close_notify, ca, proxy.https_port, version)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b'"path_qs": "/asked"' in body  # the recording backend echoes what it saw
    assert [seen["path_qs"] for seen in backend.received] == ["/asked"]


async def test_http2_request_with_close_notify_gets_the_response_and_drain_is_clean(ca, proxy_and_backend):
    proxy, backend = proxy_and_backend
    status, body = await asyncio.to_thread(_http2_request_then_close_notify, ca, proxy.https_port)
    assert status == 200 and b'"path_qs": "/asked"' in body
    proxy.stop.set()  # drain, with the half-closed connection possibly still tracked
    await asyncio.wait_for(proxy.task, 10)
    assert proxy.task.exception() is None
