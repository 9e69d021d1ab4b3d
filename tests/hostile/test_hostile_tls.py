"""Hostile TLS clients: garbage, truncated and oversized ClientHellos, old protocol versions,
renegotiation, clients that stall mid-handshake, and a flood of half handshakes.

Each gets an alert or a close within the handshake timeout; meanwhile the proxy keeps serving
an honest client, and its memory stays bounded.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import time

import pytest
from OpenSSL import SSL

from tests.hostile.clients import SERVER_NAME, exchange, read_until_closed
from tests.hostile.conftest import TIMEOUTS
from proxy.downstream import HANDSHAKE_ABANDONED
from tests.hostile.proxy_process import LOOPBACK

SLACK = 1.0
HONEST_REQUEST = b"GET /honest HTTP/1.1\r\nHost: hostile.test\r\nConnection: close\r\n\r\n"


def client_hello() -> bytes:
    """A real TLS 1.3 ClientHello (OpenSSL's), taken from a memory-BIO client."""
    connection = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    connection.set_connect_state()
    connection.set_tlsext_host_name(SERVER_NAME.encode())
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        pass
    return connection.bio_read(65536)


def record(content_type: int, payload: bytes, version: bytes = b"\x03\x01", length: int | None = None) -> bytes:
    return bytes([content_type]) + version + struct.pack("!H", len(payload) if length is None else length) + payload


def assert_honest_client_served(proxy, trusted_client: ssl.SSLContext) -> None:
    answer = exchange(proxy.ports.https, HONEST_REQUEST, tls=trusted_client)
    assert answer.statuses == [200], answer.received[:200]


def sslv3_client_hello() -> bytes:
    """By hand: OpenSSL 3 cannot send one. SSL 3.0, two RSA suites, no extensions."""
    body = b"\x03\x00" + os.urandom(32) + b"\x00" + b"\x00\x04\x00\x0a\x00\x2f" + b"\x01\x00"
    return record(22, b"\x01" + len(body).to_bytes(3, "big") + body, b"\x03\x00")


HOSTILE_HANDSHAKES = {
    "sslv3-hello": sslv3_client_hello(),
    "random-bytes": os.urandom(600),
    "http-on-the-tls-port": b"GET / HTTP/1.1\r\nHost: hostile.test\r\n\r\n",
    "sslv2-hello": bytes.fromhex("802e0103010015000000100100800300800700c0060040020080040080") + os.urandom(16),
    "record-over-16k": record(22, b"\x01" + b"\x00" * 20, length=0x4800) + b"\x00" * 0x4800,
    "hello-length-16m": record(22, b"\x01\xff\xff\xff" + b"\x03\x03" + os.urandom(200)),
    "application-data-first": record(23, os.urandom(100), b"\x03\x03"),
    "alert-first": record(21, b"\x02\x28"),
    "change-cipher-spec-first": record(20, b"\x01"),
    "hello-session-id-length-255": (lambda hello: hello[:43] + b"\xff" + hello[44:])(client_hello()),
    "hello-extensions-cut": (lambda hello: record(22, hello[5:-40]))(client_hello()),
}


@pytest.mark.parametrize("data", HOSTILE_HANDSHAKES.values(), ids=HOSTILE_HANDSHAKES.keys())
def test_hostile_handshake_gets_alert_or_close(hostile_proxy, trusted_client, data):
    answer = exchange(hostile_proxy.ports.https, data, wait=TIMEOUTS["handshake"] + SLACK)
    assert answer.closed
    assert answer.received[:1] in (b"", b"\x15"), f"expected nothing or an alert record, got {answer.received[:20]!r}"
    assert_honest_client_served(hostile_proxy, trusted_client)


def test_truncated_client_hello_then_silence_is_closed_within_handshake_timeout(hostile_proxy, trusted_client):
    failures_before = hostile_proxy.metric("ingress_proxy_tls_handshake_failures_total", reason="timeout")
    answer = exchange(hostile_proxy.ports.https, client_hello()[:100], wait=TIMEOUTS["handshake"] + SLACK)
    assert answer.closed and answer.received == b""
    assert TIMEOUTS["handshake"] - 0.1 < answer.seconds < TIMEOUTS["handshake"] + SLACK
    assert hostile_proxy.metric("ingress_proxy_tls_handshake_failures_total", reason="timeout") == failures_before + 1


def test_client_that_stops_after_server_hello_is_closed_within_handshake_timeout(hostile_proxy):
    with socket.create_connection((LOOPBACK, hostile_proxy.ports.https)) as sock:
        sock.sendall(client_hello())
        started = time.monotonic()
        received, closed = read_until_closed(sock, TIMEOUTS["handshake"] + SLACK)
        elapsed = time.monotonic() - started
    assert received[:1] == b"\x16", "the proxy should have answered with its ServerHello"
    assert closed and elapsed < TIMEOUTS["handshake"] + SLACK


def _s_client(port: int, *options: str, stdin: bytes = b"", timeout: float = 15) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"{LOOPBACK}:{port}", "-servername", SERVER_NAME, *options],
        input=stdin,
        capture_output=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_old_protocol_versions_are_refused(hostile_proxy, trusted_client, version):
    """SECLEVEL=0 so that it is the proxy refusing, not our own client declining to offer TLS 1.0."""
    completed = _s_client(hostile_proxy.ports.https, version, "-cipher", "DEFAULT:@SECLEVEL=0", stdin=b"")
    output = (completed.stdout + completed.stderr).decode(errors="replace")
    assert completed.returncode != 0, output
    assert "Cipher is (NONE)" in output or "no protocols available" in output or "alert protocol version" in output, output
    assert_honest_client_served(hostile_proxy, trusted_client)


def test_renegotiation_is_refused(hostile_proxy, trusted_client):
    """s_client's `R` line asks for a TLS 1.2 renegotiation: the proxy refuses (OP_NO_RENEGOTIATION)
    and no request is served on that connection afterwards."""
    handshakes_before = hostile_proxy.metric("ingress_proxy_tls_handshakes_total")
    client = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"{LOOPBACK}:{hostile_proxy.ports.https}", "-servername", SERVER_NAME, "-tls1_2"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert client.stdin is not None
        time.sleep(0.5)
        client.stdin.write(b"R\n")
        client.stdin.flush()
        time.sleep(0.5)
        try:
            client.stdin.write(b"GET /after-renegotiation HTTP/1.1\r\nHost: hostile.test\r\n\r\n")
            client.stdin.flush()
            time.sleep(0.5)
            client.stdin.close()
        except BrokenPipeError:
            pass  # s_client already gave up: the renegotiation failed
        output = client.communicate(timeout=10)[0].decode(errors="replace")
    finally:
        client.kill()
    assert "RENEGOTIATING" in output, output
    assert "no renegotiation" in output.lower() or "alert" in output.lower(), output[-1500:]
    assert "HTTP/1.1" not in output, "a request was served on the connection after renegotiation"
    assert hostile_proxy.metric("ingress_proxy_tls_handshakes_total") == handshakes_before + 1
    assert_honest_client_served(hostile_proxy, trusted_client)


FLOOD = int(os.environ.get("HOSTILE_FLOOD", "500"))


def test_flood_of_half_handshakes(hostile_proxy, trusted_client):
    """500 connections each send half a ClientHello and wait: an honest client is still served
    promptly, RSS stays bounded, and all 500 are closed after the handshake timeout."""
    half_hello = client_hello()[:150]
    rss_before = hostile_proxy.rss_bytes()
    sockets = []
    try:
        for _ in range(FLOOD):
            sock = socket.create_connection((LOOPBACK, hostile_proxy.ports.https), timeout=5)
            sock.sendall(half_hello)
            sockets.append(sock)
        time.sleep(0.3)
        started = time.monotonic()
        assert_honest_client_served(hostile_proxy, trusted_client)
        honest_seconds = time.monotonic() - started
        open_during = hostile_proxy.metric("ingress_proxy_open_connections", listener="https")
        rss_peak = hostile_proxy.rss_bytes()
        time.sleep(TIMEOUTS["handshake"] + SLACK)
        open_after = hostile_proxy.metric("ingress_proxy_open_connections", listener="https")
        closed = 0
        for sock in sockets:
            _, was_closed = read_until_closed(sock, 0.01)
            closed += was_closed
    finally:
        for sock in sockets:
            sock.close()
    growth = rss_peak - rss_before
    print(
        f"half-handshake flood: {FLOOD} conns, open {open_during:.0f} → {open_after:.0f}, {closed} closed, "
        f"honest request {honest_seconds * 1000:.0f} ms, RSS +{growth / 2**20:.1f} MiB ({growth / FLOOD / 1024:.0f} KiB/conn)"
    )
    assert open_during >= FLOOD
    assert honest_seconds < 1.0
    assert open_after == 0 and closed == FLOOD
    assert growth < 64 * 2**20


@pytest.mark.parametrize("sent", [b"", client_hello()[:100], client_hello()], ids=["nothing", "part-of-a-hello", "whole-hello"])
def test_a_client_that_closes_mid_handshake_is_let_go_at_once(hostile_proxy, trusted_client, sent):
    """Its FIN ends the handshake then and there (it can never send its Finished): counted as closed
    by the client, not left to the handshake timeout (whose counter does not move)."""
    abandoned = hostile_proxy.metric("ingress_proxy_tls_handshake_failures_total", reason=HANDSHAKE_ABANDONED)
    timeouts = hostile_proxy.metric("ingress_proxy_tls_handshake_failures_total", reason="timeout")
    with socket.create_connection((LOOPBACK, hostile_proxy.ports.https)) as sock:
        sock.sendall(sent)
        sock.shutdown(socket.SHUT_WR)
        received, closed = read_until_closed(sock, TIMEOUTS["handshake"] * 5)
    assert closed
    assert received[:1] in (b"", b"\x16"), received[:20]  # nothing, or the ServerHello it had answered
    assert hostile_proxy.metric("ingress_proxy_tls_handshake_failures_total", reason=HANDSHAKE_ABANDONED) == abandoned + 1
    assert hostile_proxy.metric("ingress_proxy_tls_handshake_failures_total", reason="timeout") == timeouts
    assert_honest_client_served(hostile_proxy, trusted_client)
