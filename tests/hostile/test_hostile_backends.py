"""Backends that reset, hang, send garbage, oversized or doubly framed heads, or die mid-body.

Before a response head reached the client, it gets 502 (or 504 for a backend that stays silent
past `backend_response`) on a connection it may keep using; after the head left, the only honest
signal is a cut body, so the client connection closes early. Either way the proxy and its pools
recover: the next request on the same client connection, to a healthy endpoint, succeeds.
"""

from __future__ import annotations

import time

import pytest

from tests.hostile.backends import MID_BODY_ANNOUNCED, MID_BODY_SENT
from tests.hostile.clients import connect, exchange, read_until_closed, split_responses
from tests.hostile.conftest import TIMEOUTS

SLACK = 1.0


def get(path: str, close: bool = False) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: hostile.test\r\n%s\r\n" % (path.encode(), b"Connection: close\r\n" if close else b"")


BEFORE_HEAD = {
    "reset": (502, "reset"),
    "garbage": (502, "bad response"),
    "oversized": (502, "bad response"),
    "badframing": (502, "bad response"),
    "hang": (504, "response timeout"),
}


@pytest.mark.parametrize("fault", BEFORE_HEAD)
def test_failure_before_the_head_is_a_502_or_504_and_the_connection_goes_on(hostile_proxy, zoo, app_requests, fault):
    status, kind = BEFORE_HEAD[fault]
    errors_before = hostile_proxy.metric("ingress_proxy_upstream_errors_total", backend=fault, kind=kind)
    accepted_before = zoo.faulty[fault].connections
    started = time.monotonic()
    answer = exchange(hostile_proxy.ports.http, get(f"/fault/{fault}") + get("/after", close=True))
    assert answer.statuses == [status, 200], answer.received[:300]
    assert zoo.faulty[fault].connections > accepted_before, "the faulty backend was never reached"
    assert [seen["path_qs"] for seen in app_requests] == ["/after"]
    assert hostile_proxy.metric("ingress_proxy_upstream_errors_total", backend=fault, kind=kind) > errors_before
    if fault == "hang":  # never retried: the backend may be working on it
        assert TIMEOUTS["backend_response"] - 0.1 < time.monotonic() - started < TIMEOUTS["backend_response"] + SLACK
        assert zoo.faulty[fault].connections == accepted_before + 1


def test_refused_connect_is_a_502(hostile_proxy, app_requests):
    answer = exchange(hostile_proxy.ports.http, get("/refused") + get("/after", close=True))
    assert answer.statuses == [502, 200]


def _cut_response(path: str, port: int) -> tuple[bytes, bool, float]:
    with connect(port) as sock:
        sock.sendall(get(path))
        started = time.monotonic()
        received, closed = read_until_closed(sock, TIMEOUTS["backend_response"] + 2 * SLACK)
        return received, closed, time.monotonic() - started


def test_backend_closing_mid_body_cuts_the_client_body(hostile_proxy):
    received, closed, _ = _cut_response("/fault/midbody", hostile_proxy.ports.http)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: %d" % MID_BODY_ANNOUNCED in head
    assert closed and len(body) == MID_BODY_SENT, "a short body must end in a close, never a silent keep-alive"


def test_backend_reset_mid_chunked_body_never_sends_the_last_chunk(hostile_proxy):
    received, closed, _ = _cut_response("/fault/chunkreset", hostile_proxy.ports.http)
    assert received.startswith(b"HTTP/1.1 200 ") and closed
    assert not received.endswith(b"0\r\n\r\n"), "the client must not see a complete chunked body"


def test_backend_silent_mid_body_is_cut_after_backend_response(hostile_proxy):
    received, closed, seconds = _cut_response("/fault/hangbody", hostile_proxy.ports.http)
    assert received.startswith(b"HTTP/1.1 200 ") and received.endswith(b"half") and closed
    assert seconds < TIMEOUTS["backend_response"] + SLACK


def test_gets_fail_over_from_a_resetting_endpoint_and_bodies_are_never_sent_twice(hostile_proxy, zoo, app_requests):
    """Backend "mixed" = [resets, healthy]: body-less GETs are retried on the next endpoint, a
    POST is not (it may have reached the first one)."""
    gets = exchange(hostile_proxy.ports.http, *(get(f"/mixed/{i}") for i in range(10)), get("/mixed/last", close=True))
    assert gets.statuses == [200] * 11
    statuses = []
    for index in range(4):
        answer = exchange(
            hostile_proxy.ports.http,
            b"POST /mixed/post%d HTTP/1.1\r\nHost: hostile.test\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbody" % index,
        )
        statuses += answer.statuses
    assert set(statuses) <= {200, 502} and 502 in statuses and 200 in statuses
    posts = [seen["path_qs"] for seen in app_requests if seen["method"] == "POST"]
    assert len(posts) == len(set(posts)) == statuses.count(200)


def test_pools_recover_after_every_fault(hostile_proxy, app_requests):
    for fault in [*BEFORE_HEAD, "midbody", "chunkreset"]:
        exchange(hostile_proxy.ports.http, get(f"/fault/{fault}", close=True), wait=TIMEOUTS["backend_response"] + SLACK)
    answer = exchange(hostile_proxy.ports.http, *(get(f"/ok/{i}") for i in range(49)), get("/ok/49", close=True))
    assert [status for status, _ in split_responses(answer.received)] == [200] * 50
    assert len(app_requests) == 50


def test_backend_that_never_reads_an_upload_gets_504_within_backend_response(hostile_proxy, zoo):
    """Without a bound on waiting for the backend to take the body, client and backend connections
    would hang for as long as the client kept trying."""
    errors_before = hostile_proxy.metric("ingress_proxy_upstream_errors_total", backend="noread", kind="backend not reading")
    body_size = 256 * 1024 * 1024
    with connect(hostile_proxy.ports.http) as sock:
        sock.sendall(b"POST /fault/noread HTTP/1.1\r\nHost: hostile.test\r\nContent-Length: %d\r\n\r\n" % body_size)
        sock.settimeout(0.2)
        started = time.monotonic()
        sent, received = 0, b""
        while time.monotonic() - started < TIMEOUTS["backend_response"] + 3 * SLACK:
            try:
                sent += sock.send(b"u" * 65536)
            except TimeoutError:  # our send buffer is full: see whether the proxy answered
                piece, closed = read_until_closed(sock, 0.2)
                received += piece
                if received or closed:
                    break
            except (BrokenPipeError, ConnectionResetError):
                break
        seconds = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 504 ") or received == b""
    assert seconds < TIMEOUTS["backend_response"] + 2 * SLACK and sent < body_size
    assert hostile_proxy.metric("ingress_proxy_upstream_errors_total", backend="noread", kind="backend not reading") > errors_before
    assert exchange(hostile_proxy.ports.http, get("/after-upload", close=True)).statuses == [200]


def test_endless_interim_responses_end_in_504(hostile_proxy):
    """1xx responses are passed on, but they do not extend backend_response."""
    answer = exchange(hostile_proxy.ports.http, get("/fault/interim", close=True), wait=TIMEOUTS["backend_response"] * 2 + SLACK)
    assert answer.closed
    assert answer.statuses[0] == 103 and answer.statuses[-1] == 504 and set(answer.statuses) == {103, 504}
