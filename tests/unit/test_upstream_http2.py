"""The pure parts of HTTP/2 to backends (proxy/upstream_http2.py): gRPC helpers and re-derived heads."""

from __future__ import annotations

import pytest

from proxy.http1 import PeerError, RequestHead
from proxy.upstream_http2 import grpc_error_head, grpc_status_for, grpc_timeout, is_grpc, request_fields, response_head


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (b"application/grpc", True),
        (b"application/grpc+proto", True),
        (b"Application/GRPC; charset=x", True),
        (b"application/grpc-web", False),  # gRPC-Web works over HTTP/1.1 by design
        (b"application/grpc-web+proto", False),
        (b"application/json", False),
        (None, False),
    ],
)
def test_is_grpc(content_type: bytes | None, expected: bool) -> None:
    headers = ((b"content-type", content_type),) if content_type is not None else ()
    assert is_grpc(headers) is expected


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1S", 1.0),
        (b"250m", 0.25),
        (b"2M", 120.0),
        (b"1H", 3600.0),
        (b"500u", 0.0005),
        (b"99999999n", 0.099999999),
        (b"123456789S", None),  # at most 8 digits
        (b"1s", None),  # units are case-sensitive: "s" is not a unit
        (b"S", None),
        (b"-1S", None),
    ],
)
def test_grpc_timeout(value: bytes, seconds: float | None) -> None:
    parsed = grpc_timeout(((b"grpc-timeout", value),))
    assert parsed == pytest.approx(seconds) if seconds is not None else parsed is None


@pytest.mark.parametrize(
    ("http_status", "grpc_status"),
    [(503, 14), (502, 14), (429, 14), (504, 4), (404, 12), (403, 7), (401, 16), (400, 13), (500, 2), (426, 2)],
)
def test_grpc_status_for(http_status: int, grpc_status: int) -> None:
    assert grpc_status_for(http_status) == grpc_status


def test_grpc_error_head_is_trailers_only() -> None:
    head = grpc_error_head(14, "ingress-proxy: 503")
    assert (head.status, head.has_body) == (200, False)
    assert dict(head.headers) == {b"content-type": b"application/grpc", b"grpc-status": b"14", b"grpc-message": b"ingress-proxy: 503"}


def _request(*headers: tuple[bytes, bytes], length: int | None = None, chunked: bool = False) -> RequestHead:
    return RequestHead(b"POST", b"/svc/Method?x=1", "1.1", headers, b"api.test", True, False, chunked, length)


def test_request_fields_are_re_derived_from_the_parse() -> None:
    fields = request_fields(
        _request(
            (b"Host", b"evil.test"),
            (b"Connection", b"x-secret"),
            (b"X-Secret", b"dropped: named by Connection"),
            (b"Content-Length", b"999"),
            (b"Transfer-Encoding", b"chunked"),
            (b"X-Forwarded-For", b"10.0.0.1"),
            (b"X-Forwarded-Proto", b"http"),
            (b"TE", b"trailers"),
            (b"User-Agent", b"grpc-python"),
            (b":authority", b"smuggled"),
            length=5,
        ),
        b"http",
        b"192.0.2.7",
        b"https",
        b"0.0.0.0:8443",
    )
    assert fields[:4] == [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"api.test"), (b":path", b"/svc/Method?x=1")]
    rest = fields[4:]
    assert rest == [
        (b"user-agent", b"grpc-python"),
        (b"te", b"trailers"),
        (b"content-length", b"5"),  # from the parse, never the client's
        (b"x-forwarded-for", b"192.0.2.7"),  # the client's own is replaced, as for HTTP/1.1
        (b"x-real-ip", b"192.0.2.7"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"api.test"),
        (b"x-forwarded-port", b"8443"),
    ]


def test_request_fields_carry_a_trusted_chain_when_given() -> None:
    """compute-full-forwarded-for: the exchange passes the chain; X-Real-IP stays the client."""
    fields = request_fields(_request((b"X-Forwarded-For", b"6.6.6.6")), b"http", b"203.0.113.7", b"https", b"0.0.0.0:8443",
                            forwarded_for=b"203.0.113.7, 10.0.0.9")  # fmt: skip
    assert [field for field in fields if field[0] in (b"x-forwarded-for", b"x-real-ip")] == [
        (b"x-forwarded-for", b"203.0.113.7, 10.0.0.9"), (b"x-real-ip", b"203.0.113.7"),
    ]


def test_grpc_requests_get_te_trailers_and_others_do_not() -> None:
    grpc_fields = request_fields(_request((b"content-type", b"application/grpc"), chunked=True), b"http", b"1", b"https", b"a:1")
    plain_fields = request_fields(_request((b"TE", b"gzip"), chunked=True), b"http", b"1", b"https", b"a:1")
    assert (b"te", b"trailers") in grpc_fields
    assert not any(name == b"te" for name, _ in plain_fields)
    assert not any(name == b"content-length" for name, _ in grpc_fields)  # no length: DATA frames frame it


@pytest.mark.parametrize(
    ("fields", "method", "status", "length", "has_body"),
    [
        ([(b":status", b"200"), (b"content-type", b"application/grpc")], b"POST", 200, None, True),
        ([(b":status", b"200"), (b"content-length", b"12")], b"GET", 200, 12, True),
        ([(b":status", b"200"), (b"content-length", b"12")], b"HEAD", 200, 12, False),
        ([(b":status", b"204")], b"GET", 204, None, False),
        ([(b":status", b"304")], b"GET", 304, None, False),
    ],
)
def test_response_head(fields: list, method: bytes, status: int, length: int | None, has_body: bool) -> None:
    head = response_head(fields, method)
    assert (head.status, head.content_length, head.has_body) == (status, length, has_body)
    assert all(name[:1] != b":" and name != b"content-length" for name, _ in head.headers)


@pytest.mark.parametrize(
    "fields",
    [
        [(b"content-type", b"x")],  # no :status
        [(b":status", b"2000")],
        [(b":status", b"abc")],
        [(b":status", b"200"), (b":path", b"/")],  # a request pseudo-header
        [(b":status", b"200"), (b"content-length", b"x")],
        [(b":status", b"200"), (b"content-length", b"1"), (b"content-length", b"2")],
    ],
)
def test_bad_response_heads_are_peer_errors(fields: list) -> None:
    with pytest.raises(PeerError):
        response_head(fields, b"GET")
