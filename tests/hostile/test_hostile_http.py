"""Hostile HTTP/1.1 clients against the real proxy process (plain listener; TLS ones elsewhere).

Each case gets a 4xx/5xx and/or a close within the configured timeouts (conftest.TIMEOUTS), and
nothing it tried to smuggle reaches the backend, which records every request it receives. This
extends tests/e2e/test_http_semantics.py's corpus (CL+TE, obs-fold, absolute-form, ... are there).
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.hostile.clients import connect, exchange, read_until_closed
from tests.hostile.conftest import TIMEOUTS

SLACK = 1.0  # scheduling slack on a shared 2-core machine
HOST = b"Host: hostile.test\r\n"


def post(body_framing: bytes, body: bytes = b"") -> bytes:
    return b"POST /smuggle HTTP/1.1\r\n" + HOST + body_framing + b"\r\n" + body


def chunked(body: bytes) -> bytes:
    return post(b"Transfer-Encoding: chunked\r\n", body)


SMUGGLED = b"GET /smuggled HTTP/1.1\r\n" + HOST + b"\r\n"

CORPUS: dict[str, tuple[bytes, set[int]]] = {
    # chunk extensions and chunk sizes
    "chunk-ext-nul": (chunked(b"5;a=\x00\r\nhello\r\n0\r\n\r\n" + SMUGGLED), {400}),
    "chunk-ext-bare-cr": (chunked(b"5;a\rb\r\nhello\r\n0\r\n\r\n" + SMUGGLED), {400}),
    "chunk-ext-lf-only": (chunked(b"5;a=b\nhello\r\n0\r\n\r\n" + SMUGGLED), {400}),
    "chunk-size-overflow": (chunked(b"1" + b"0" * 20 + b"\r\nhello\r\n0\r\n\r\n" + SMUGGLED), {400}),
    "chunk-size-negative": (chunked(b"-5\r\nhello\r\n0\r\n\r\n" + SMUGGLED), {400}),
    "chunk-size-hex-prefix": (chunked(b"0x5\r\nhello\r\n0\r\n\r\n" + SMUGGLED), {400}),
    "chunk-size-space": (chunked(b"5 \r\nhello\r\n0\r\n\r\n" + SMUGGLED), {400}),
    "chunk-data-too-long": (chunked(b"3\r\nhello\r\n0\r\n\r\n" + SMUGGLED), {400}),
    "chunk-lf-line-endings": (chunked(b"5\nhello\n0\n\n" + SMUGGLED), {400}),
    # Content-Length forms
    "cl-plus": (post(b"Content-Length: +5\r\n", b"hello" + SMUGGLED), {400}),
    "cl-negative": (post(b"Content-Length: -5\r\n", b"hello" + SMUGGLED), {400}),
    "cl-hex": (post(b"Content-Length: 0x5\r\n", b"hello" + SMUGGLED), {400}),
    "cl-list": (post(b"Content-Length: 5, 5\r\n", b"hello" + SMUGGLED), {400}),
    "cl-space-inside": (post(b"Content-Length: 1 5\r\n", b"hello" + SMUGGLED), {400}),
    "cl-exponent": (post(b"Content-Length: 5e0\r\n", b"hello" + SMUGGLED), {400}),
    "cl-empty": (post(b"Content-Length: \r\n", b"hello" + SMUGGLED), {400}),
    "cl-overflow": (post(b"Content-Length: 99999999999999999999999\r\n", b"hello" + SMUGGLED), {400}),
    "cl-case-duplicate": (post(b"Content-Length: 5\r\ncontent-length: 50\r\n", b"hello" + SMUGGLED), {400}),
    "te-case-and-cl": (post(b"transfer-ENCODING: Chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n" + SMUGGLED), {400}),
    "te-two-headers": (
        post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", b"0\r\n\r\n" + SMUGGLED),
        {400, 501},
    ),
    "te-vertical-tab": (post(b"Transfer-Encoding:\x0bchunked\r\n", b"0\r\n\r\n" + SMUGGLED), {400, 501}),
    # versions and request lines
    "http-0.9": (b"GET /\r\n\r\n", {400}),
    "http-2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400, 405, 505}),
    "http-9.9": (b"GET / HTTP/9.9\r\n" + HOST + b"\r\n", {400, 505}),
    "lowercase-version": (b"GET / http/1.1\r\n" + HOST + b"\r\n", {400}),
    "trailing-word": (b"GET / HTTP/1.1 extra\r\n" + HOST + b"\r\n", {400}),
    "nul-in-target": (b"GET /a\x00b HTTP/1.1\r\n" + HOST + b"\r\n", {400}),
    "lf-only-lines": (b"GET / HTTP/1.1\n" + HOST.replace(b"\r\n", b"\n") + b"\n", {400}),
    "asterisk-form": (b"OPTIONS * HTTP/1.1\r\n" + HOST + b"\r\n", {400}),
    # NUL / CR / LF / separators in header names and values
    "nul-in-name": (b"GET / HTTP/1.1\r\n" + HOST + b"X-A\x00: b\r\n\r\n", {400}),
    "space-in-name": (b"GET / HTTP/1.1\r\n" + HOST + b"X A: b\r\n\r\n", {400}),
    "paren-in-name": (b"GET / HTTP/1.1\r\n" + HOST + b"X(A): b\r\n\r\n", {400}),
    "empty-name": (b"GET / HTTP/1.1\r\n" + HOST + b": b\r\n\r\n", {400}),
    "bare-cr-in-value": (b"GET / HTTP/1.1\r\n" + HOST + b"X-A: a\rTransfer-Encoding: chunked\r\n\r\n", {400}),
    "bare-lf-in-value": (b"GET / HTTP/1.1\r\n" + HOST + b"X-A: a\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", {400}),
    "cr-in-host": (b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", {400}),
    "del-in-value": (b"GET / HTTP/1.1\r\n" + HOST + b"X-A: a\x7fb\r\n\r\n", {400}),
    "no-colon": (b"GET / HTTP/1.1\r\n" + HOST + b"X-A b\r\n\r\n", {400}),
    # sizes
    "long-method": (b"G" * 10_000 + b" / HTTP/1.1\r\n" + HOST + b"\r\n", {400, 405, 414, 431, 501}),
    "long-header-name": (b"GET / HTTP/1.1\r\n" + HOST + b"X" * 40_000 + b": a\r\n\r\n", {431}),
    "101-headers": (b"GET / HTTP/1.1\r\n" + HOST + b"".join(b"X-%d: a\r\n" % i for i in range(100)) + b"\r\n", {431}),
    "many-small-headers-32k": (
        b"GET / HTTP/1.1\r\n" + HOST + b"".join(b"X-%02d: %s\r\n" % (i, b"v" * 400) for i in range(90)) + b"\r\n",
        {431},
    ),
}


@pytest.mark.parametrize("request_bytes, statuses", CORPUS.values(), ids=CORPUS.keys())
def test_hostile_request_is_refused_closed_and_not_forwarded(hostile_proxy, app_requests, request_bytes, statuses):
    answer = exchange(hostile_proxy.ports.http, request_bytes, wait=TIMEOUTS["header_read"] + SLACK)
    assert answer.closed, f"connection left open; got {answer.received[:200]!r}"
    assert len(answer.statuses) == 1 and answer.statuses[0] in statuses, answer.received[:300]
    time.sleep(0.05)
    assert app_requests == [], "a refused request (or one smuggled inside it) reached the backend"


def test_exactly_100_headers_still_pass(hostile_proxy, app_requests):
    """The 431s above are the limit, not an accident (the exact byte limits: test_parser_fuzz)."""
    headers = b"".join(b"X-%d: a\r\n" % i for i in range(98))  # + Host + Connection = 100
    answer = exchange(hostile_proxy.ports.http, b"GET /hundred HTTP/1.1\r\n" + HOST + headers + b"Connection: close\r\n\r\n")
    assert answer.statuses == [200]
    assert [seen["path_qs"] for seen in app_requests] == ["/hundred"]


def test_valid_pipeline_then_garbage_serves_only_the_valid_requests(hostile_proxy, app_requests):
    pipeline = b"".join(b"GET /p/%d HTTP/1.1\r\n" % i + HOST + b"\r\n" for i in range(3))
    body_with_request = b"GET /inside-body HTTP/1.1\r\n\r\n"
    pipeline += post(b"Content-Length: %d\r\n" % len(body_with_request), body_with_request)
    answer = exchange(hostile_proxy.ports.http, pipeline + b"\x00\x01\x02garbage\r\n\r\n" + SMUGGLED)
    assert answer.statuses == [200, 200, 200, 200, 400] and answer.closed
    assert [seen["path_qs"] for seen in app_requests] == ["/p/0", "/p/1", "/p/2", "/smuggle"]
    assert app_requests[3]["body_length"] == len(body_with_request)


def test_slowloris_head_trickle_gets_408_within_header_read(hostile_proxy, app_requests):
    """One byte every 100 ms never completes the head: 408 and close `header_read` after the first byte."""
    trickle = b"GET /slow HTTP/1.1\r\n" + HOST + b"X-Pad: " + b"a" * 1000
    with connect(hostile_proxy.ports.http) as sock:
        started = time.monotonic()
        received, closed = b"", False
        for byte in trickle:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            received, closed = read_until_closed(sock, 0.1)
            if received or closed:
                break
        if not closed:
            more, closed = read_until_closed(sock, SLACK)
            received += more
        elapsed = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 408 ") and closed
    assert TIMEOUTS["header_read"] - 0.1 < elapsed < TIMEOUTS["header_read"] + SLACK
    assert app_requests == []


def test_partial_head_then_silence_gets_408(hostile_proxy, app_requests):
    answer = exchange(hostile_proxy.ports.http, b"GET /stall HTTP/1.1\r\nHo", wait=TIMEOUTS["header_read"] + SLACK)
    assert answer.statuses == [408] and answer.closed
    assert answer.seconds < TIMEOUTS["header_read"] + SLACK


def test_silent_connection_is_closed_after_idle(hostile_proxy):
    with connect(hostile_proxy.ports.http) as sock:
        started = time.monotonic()
        received, closed = read_until_closed(sock, TIMEOUTS["idle"] + SLACK)
    assert closed and received == b""
    assert time.monotonic() - started > TIMEOUTS["idle"] - 0.1


def test_body_that_stops_arriving_is_cut_within_idle(hostile_proxy, app_requests):
    answer = exchange(hostile_proxy.ports.http, post(b"Content-Length: 1000\r\n", b"x" * 10), wait=TIMEOUTS["idle"] + SLACK)
    assert answer.closed and answer.statuses in ([408], [])
    assert answer.seconds < TIMEOUTS["idle"] + SLACK
    time.sleep(0.05)
    assert app_requests == [], "the backend recorded a request whose body never finished"


def test_chunked_body_that_stops_arriving_is_cut_within_idle(hostile_proxy, app_requests):
    answer = exchange(hostile_proxy.ports.http, chunked(b"400\r\n" + b"y" * 100), wait=TIMEOUTS["idle"] + SLACK)
    assert answer.closed and answer.seconds < TIMEOUTS["idle"] + SLACK
    assert app_requests == []


STREAMED_BYTES = 64 * 1024 * 1024
NON_READERS = 16


def test_clients_that_never_read_are_dropped_and_memory_stays_bounded(hostile_proxy):
    """16 clients ask for 64 MiB each and never read: the proxy must not buffer it (RSS), must drop
    them once they stall its writes for `idle` seconds (nginx's send_timeout), and keeps serving others.
    Dropped means: gone from the proxy's open connections; the client sees EOF after what the kernel
    had already queued."""
    rss_before = hostile_proxy.rss_bytes()
    sockets = []
    for _ in range(NON_READERS):
        sock = socket.create_connection(("127.0.0.1", hostile_proxy.ports.http), timeout=5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /stream/%d HTTP/1.1\r\n" % STREAMED_BYTES + HOST + b"\r\n")
        sockets.append(sock)
    try:
        time.sleep(0.5)
        peak = hostile_proxy.rss_bytes()
        assert hostile_proxy.metric("ingress_proxy_open_connections", listener="http") == NON_READERS
        served_meanwhile = exchange(hostile_proxy.ports.http, b"GET /meanwhile HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
        assert served_meanwhile.statuses == [200]
        time.sleep(TIMEOUTS["idle"] + SLACK)
        peak = max(peak, hostile_proxy.rss_bytes())
        still_open = hostile_proxy.metric("ingress_proxy_open_connections", listener="http")
        received = []
        for sock in sockets:
            data, closed = read_until_closed(sock, 5.0)
            assert closed
            received.append(len(data))
    finally:
        for sock in sockets:
            sock.close()
    growth = peak - rss_before
    print(
        f"never-reading clients: RSS {rss_before / 2**20:.1f} → peak {peak / 2**20:.1f} MiB; "
        f"open after idle: {still_open:.0f}; bytes each got: {min(received)}–{max(received)}"
    )
    assert still_open == 0, "stalled clients still hold connections after the idle timeout"
    assert max(received) < STREAMED_BYTES
    assert growth < 48 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB for {NON_READERS} stalled clients"


@pytest.mark.parametrize("case", ["cl-list", "chunk-ext-nul", "bare-lf-in-value", "http-0.9", "101-headers"])
def test_hostile_request_over_tls_is_refused_the_same_way(hostile_proxy, app_requests, trusted_client, case):
    request_bytes, statuses = CORPUS[case]
    answer = exchange(hostile_proxy.ports.https, request_bytes, wait=TIMEOUTS["header_read"] + SLACK, tls=trusted_client)
    assert answer.closed and len(answer.statuses) == 1 and answer.statuses[0] in statuses
    time.sleep(0.05)
    assert app_requests == []


def test_slowloris_over_tls_gets_408_within_header_read(hostile_proxy, app_requests, trusted_client):
    """The handshake completes; then the head stalls. The header_read clock runs from its first byte."""
    answer = exchange(
        hostile_proxy.ports.https,
        b"GET /slow-tls HTTP/1.1\r\n",
        HOST,
        wait=TIMEOUTS["header_read"] + SLACK,
        pause=0.3,
        tls=trusted_client,
    )
    assert answer.statuses == [408] and answer.closed
    assert answer.seconds < TIMEOUTS["header_read"] - 0.3 + SLACK
    assert app_requests == []
