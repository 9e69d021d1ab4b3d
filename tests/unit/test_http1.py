"""HTTP/1.1 framing fed bytes in memory: events out, and the heads we write to each next hop."""

from __future__ import annotations

import pytest

from proxy.http1 import (
    END_OF_MESSAGE,
    Body,
    PeerError,
    RequestParser,
    ResponseHead,
    ResponseParser,
    TunnelData,
    client_response_head,
    encode_chunk,
    upstream_request_head,
)


def request_events(data: bytes) -> list:
    parser = RequestParser()
    parser.feed(data)
    return list(parser.events)


def response_events(method: bytes, data: bytes, eof: bool = False) -> tuple[list, ResponseParser]:
    parser = ResponseParser(method)
    parser.feed(data)
    if eof:
        parser.feed_eof()
    return list(parser.events), parser


def shape(events: list) -> list[str]:
    return [type(event).__name__ for event in events]


REQUESTS = {
    "bodyless-get": (b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\n\r\n", ["RequestHead", "EndOfMessage"]),
    "content-length": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", ["RequestHead", "Body", "EndOfMessage"]),
    "chunked": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", ["RequestHead", "Body", "EndOfMessage"]),
    "pipelined": (b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n", ["RequestHead", "EndOfMessage"] * 2),
    "upgrade": (b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nframe", ["RequestHead", "EndOfMessage", "TunnelData"]),
    "http10-no-host": (b"GET / HTTP/1.0\r\n\r\n", ["RequestHead", "EndOfMessage"]),
}


@pytest.mark.parametrize("data, expected", REQUESTS.values(), ids=REQUESTS.keys())
def test_request_events(data: bytes, expected: list[str]) -> None:
    assert shape(request_events(data)) == expected


def test_request_head_fields() -> None:
    head, _ = request_events(b"PUT /p/q?x=1 HTTP/1.1\r\nHost: Example.COM:8443\r\nContent-Length: 0\r\n\r\n")
    assert (head.method, head.target, head.path, head.host) == (b"PUT", b"/p/q?x=1", "/p/q", b"Example.COM:8443")
    assert (head.keep_alive, head.upgrade, head.chunked, head.content_length, head.has_body) == (True, False, False, 0, False)


@pytest.mark.parametrize(
    "data, status",
    [
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"CONNECT x:1 HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"GET /" + b"a" * 8193 + b" HTTP/1.1\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\nA: " + b"b" * 33000 + b"\r\n\r\n", 431),
        # llhttp would end it at its head and tunnel the "body": the backend would read it as the body
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 1\r\n\r\n\x00", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ],
)
def test_request_refusals(data: bytes, status: int) -> None:
    with pytest.raises(PeerError) as refused:
        request_events(data)
    assert refused.value.status == status


def test_head_response_ends_without_a_body() -> None:
    events, parser = response_events(b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    assert shape(events) == ["ResponseHead", "EndOfMessage"] and parser.complete and parser.keep_alive
    assert events[0].has_body is False


def test_interim_then_final_response() -> None:
    events, parser = response_events(
        b"GET", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    assert [getattr(event, "status", None) for event in events] == [103, None, 200, None, None]
    assert events[3] == Body(b"ok") and events[4] is END_OF_MESSAGE and parser.complete


def test_read_until_close_body_ends_at_eof_and_is_not_reusable() -> None:
    events, parser = response_events(b"GET", b"HTTP/1.1 200 OK\r\n\r\npartial", eof=True)
    assert shape(events) == ["ResponseHead", "Body", "EndOfMessage"] and not parser.keep_alive


def test_eof_mid_body_is_a_backend_error() -> None:
    with pytest.raises(PeerError) as failed:
        response_events(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", eof=True)
    assert failed.value.status == 502


def test_switching_protocols_then_tunnel() -> None:
    events, parser = response_events(b"GET", b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nraw")
    assert events[-1] == TunnelData(b"raw") and parser.tunnel


# (first request's method, first response, whether llhttp's parser is kept for the next one)
REUSE_AFTER = {
    "content-length": (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
    "chunked": (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", True),
    "no-content": (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n", True),
    "interim-then-final": (b"GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
    # llhttp does not know the request was HEAD: it would take the next response as this body.
    "head-with-length": (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", False),
}


@pytest.mark.parametrize("method, first, kept", REUSE_AFTER.values(), ids=REUSE_AFTER.keys())
def test_reset_parser_reads_the_next_response_on_the_connection(method: bytes, first: bytes, kept: bool) -> None:
    parser = ResponseParser(method)
    parser.feed(first)
    assert parser.complete
    c_parser = parser._parser
    parser.events.clear()
    parser.reset(b"GET")
    assert not parser.complete and (parser._parser is c_parser) == kept
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Second: yes\r\n\r\nsecon")
    assert not parser.complete
    parser.feed(b"d")
    events = list(parser.events)
    assert shape(events) == ["ResponseHead", "Body", "Body", "EndOfMessage"] and parser.complete and parser.keep_alive
    assert events[0].headers == ((b"Content-Length", b"6"), (b"X-Second", b"yes")) and events[0].has_body


def test_reset_after_a_head_response_expects_no_body_only_for_head() -> None:
    parser = ResponseParser(b"GET")
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    parser.reset(b"HEAD")
    parser.events.clear()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    assert shape(list(parser.events)) == ["ResponseHead", "EndOfMessage"] and parser.complete


def test_upstream_request_head_rewrites_hop_by_hop_and_forwarding_headers() -> None:
    head = request_events(
        b"POST /x HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n"
        b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: ftp\r\nTransfer-Encoding: chunked\r\nUser-Agent: ua\r\n\r\n0\r\n\r\n"
    )[0]
    written = upstream_request_head(head, b"127.0.0.2", b"https", b"127.0.0.1:8443")
    lines = written.split(b"\r\n")
    assert lines[0] == b"POST /x HTTP/1.1"
    assert b"Host: h" in lines and b"User-Agent: ua" in lines
    assert b"X-Forwarded-For: 127.0.0.2" in lines and b"X-Forwarded-Proto: https" in lines  # replaced, not appended to
    assert b"X-Real-IP: 127.0.0.2" in lines and not any(b"10.0.0.1" in line for line in lines)
    assert b"X-Forwarded-Port: 8443" in lines and b"Transfer-Encoding: chunked" in lines
    assert not any(line.lower().startswith((b"x-secret", b"keep-alive", b"connection")) for line in lines)
    assert written.endswith(b"\r\n\r\n")


def test_client_response_head_adds_server_date_and_framing() -> None:
    response = ResponseHead(200, b"OK", "1.1", ((b"Connection", b"close"), (b"Content-Type", b"text/plain")), False, False, None, True)
    written = client_response_head(response, rechunk=True, keep_alive=True, date=b"D", extra=b"X: y\r\n")
    assert written == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nServer: ingress-proxy\r\nDate: D\r\n"
        b"Transfer-Encoding: chunked\r\nX: y\r\n\r\n"
    )
    assert encode_chunk(b"abc") == b"3\r\nabc\r\n"
