"""The compiled HTTP/1.1 head builders (proxy/_http1_heads.pyx) against the pure ones, byte for byte.

The same heads go through `proxy.http1.pure_*` (the reference) and the compiled twins; the
outputs, or the exceptions (type and message), must be identical. Header names are drawn from the
names the builders treat specially, in any letter case, plus arbitrary ones, and Connection values
name any of them, so every branch (derived, named by Connection, Server/Date, Upgrade,
X-Forwarded-For) is reached; odd argument types take the twins' fall-back to the pure builder.
"""

from __future__ import annotations

import dataclasses
import glob
import inspect
from types import ModuleType
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import http1
from proxy.http1 import HOP_BY_HOP, RequestHead, RequestParser, ResponseHead, ResponseParser

ROOT = Path(__file__).resolve().parents[2]
BUILT = sorted(glob.glob(str(ROOT / "proxy" / "_http1_heads*.so")))
needs_compiled = pytest.mark.skipif(not BUILT, reason="the compiled heads were not built in this checkout: make install")


@pytest.fixture(scope="module")
def compiled_heads() -> ModuleType:
    """The extension, also when INGRESS_PROXY_PURE=1 keeps proxy.http1 on the pure builders."""
    if http1._compiled_heads is not None:
        return http1._compiled_heads
    import proxy._http1_heads as heads

    heads.configure(http1._DERIVED_IN_REQUEST, http1._DERIVED_IN_RESPONSE, http1.pure_upstream_request_head, http1.pure_client_response_head)
    return heads

SPECIAL_NAMES = sorted(http1._DERIVED_IN_REQUEST | http1._DERIVED_IN_RESPONSE | {b"server", b"date", b"close", b"x-custom"})
_name = st.one_of(
    st.sampled_from(SPECIAL_NAMES).flatmap(lambda name: st.builds(lambda flips: _recase(name, flips), st.lists(st.booleans(), min_size=len(name), max_size=len(name)))),
    st.binary(min_size=1, max_size=12),
)
_token = st.one_of(st.sampled_from(SPECIAL_NAMES), st.binary(max_size=8))
_connection_value = st.lists(st.tuples(st.sampled_from([b"", b" ", b"\t"]), _token), max_size=4).map(
    lambda items: b",".join(pad + token.upper() if i % 2 else pad + token for i, (pad, token) in enumerate(items))
)
_header = st.one_of(
    st.tuples(_name, st.binary(max_size=20)),
    st.tuples(st.sampled_from([b"Connection", b"connection", b"CONNECTION"]), _connection_value),
)
_headers = st.lists(_header, max_size=10).map(tuple)
_length = st.one_of(st.none(), st.integers(0, 10**12))


def _recase(name: bytes, flips: list[bool]) -> bytes:
    return bytes(c - 32 if flip and 97 <= c <= 122 else c for c, flip in zip(name, flips))


_REQUEST_FIELDS = dict(
    method=st.sampled_from([b"GET", b"POST", b"HEAD"]),
    target=st.binary(min_size=1, max_size=20),
    version=st.sampled_from(["1.0", "1.1"]),
    headers=_headers,
    host=st.binary(max_size=12),
    keep_alive=st.booleans(),
    upgrade=st.booleans(),
    chunked=st.booleans(),
    content_length=_length,
    vouched=st.lists(st.tuples(st.sampled_from([b"ssl-client-verify", b"ssl-client-cert"]), st.binary(max_size=12)), max_size=2).map(tuple),
)
_request_head = st.builds(RequestHead, **_REQUEST_FIELDS)
_RESPONSE_FIELDS = dict(
    status=st.sampled_from([100, 101, 200, 204, 206, 304, 404, 502]),
    reason=st.binary(max_size=12),
    version=st.sampled_from(["1.0", "1.1"]),
    headers=_headers,
    keep_alive=st.booleans(),
    chunked=st.booleans(),
    content_length=_length,
    has_body=st.booleans(),
)
_response_head = st.builds(ResponseHead, **_RESPONSE_FIELDS)
_argument = st.binary(max_size=16)
# Types the twins hand back to the pure builder (which may raise): for the fall-back tests.
_odd_argument = st.one_of(st.binary(max_size=16), st.text(max_size=4), st.builds(bytearray, st.binary(max_size=4)))


def _outcome(call, *args):
    try:
        return ("ok", call(*args))
    except Exception as error:  # any exception: the twin must raise the very same one
        return ("raised", type(error), str(error))


def test_the_twins_are_in_use_when_built() -> None:
    """With the extension built (and INGRESS_PROXY_PURE unset) the public names are the twins."""
    from proxy import compiled

    if compiled.pure_forced():
        assert http1.upstream_request_head is http1.pure_upstream_request_head
    elif BUILT:
        assert http1._compiled_heads is not None
        assert http1.upstream_request_head is http1._compiled_heads.upstream_request_head
        assert http1.client_response_head is http1._compiled_heads.client_response_head
    else:
        pytest.skip("the compiled heads were not built in this checkout (make install says why)")


def _check_request(compiled_heads, head, client_ip, proto, local_address, extra, host_header, real_ip, forwarded_for) -> None:
    args = (head, client_ip, proto, local_address, extra, host_header, real_ip, forwarded_for)
    assert _outcome(compiled_heads.upstream_request_head, *args) == _outcome(http1.pure_upstream_request_head, *args)


def _check_response(compiled_heads, response, rechunk, keep_alive, date, extra) -> None:
    args = (response, rechunk, keep_alive, date, extra)
    assert _outcome(compiled_heads.client_response_head, *args) == _outcome(http1.pure_client_response_head, *args)


@needs_compiled
@settings(max_examples=500, deadline=None)
@given(head=_request_head, client_ip=_argument, proto=_argument, local_address=_argument, extra=_argument, host_header=_argument, real_ip=_argument, forwarded_for=_argument)
def test_request_head_matches_pure(compiled_heads, head, client_ip, proto, local_address, extra, host_header, real_ip, forwarded_for) -> None:
    _check_request(compiled_heads, head, client_ip, proto, local_address, extra, host_header, real_ip, forwarded_for)


@needs_compiled
@settings(max_examples=500, deadline=None)
@given(response=_response_head, rechunk=st.booleans(), keep_alive=st.booleans(), date=_argument, extra=_argument)
def test_response_head_matches_pure(compiled_heads, response, rechunk, keep_alive, date, extra) -> None:
    _check_response(compiled_heads, response, rechunk, keep_alive, date, extra)


_odd_header = st.tuples(st.one_of(_name, st.text(max_size=3)), st.one_of(st.binary(max_size=4), st.builds(bytearray, st.binary(max_size=4))))


@needs_compiled
@settings(max_examples=200, deadline=None)
@given(
    head=_request_head, odd_headers=st.lists(_odd_header, max_size=3),
    client_ip=_odd_argument, proto=_odd_argument, local_address=_odd_argument, extra=_odd_argument, host_header=_odd_argument, real_ip=_odd_argument,
    forwarded_for=_odd_argument,
)
def test_request_head_falls_back_to_pure_on_odd_types(compiled_heads, head, odd_headers, client_ip, proto, local_address, extra, host_header, real_ip, forwarded_for) -> None:
    head = dataclasses.replace(head, headers=head.headers + tuple(odd_headers))
    _check_request(compiled_heads, head, client_ip, proto, local_address, extra, host_header, real_ip, forwarded_for)


@needs_compiled
@settings(max_examples=200, deadline=None)
@given(response=_response_head, odd_headers=st.lists(_odd_header, max_size=3), rechunk=st.booleans(), keep_alive=st.booleans(), date=_odd_argument, extra=_odd_argument)
def test_response_head_falls_back_to_pure_on_odd_types(compiled_heads, response, odd_headers, rechunk, keep_alive, date, extra) -> None:
    response = dataclasses.replace(response, headers=response.headers + tuple(odd_headers))
    _check_response(compiled_heads, response, rechunk, keep_alive, date, extra)


@needs_compiled
def test_parsed_heads_match_pure(compiled_heads: ModuleType) -> None:
    """Heads as the parsers make them (what the proxy really passes), including odd cases."""
    requests = [
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Custom\r\nX-Custom: 1\r\nX-Forwarded-For: 1.1.1.1\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nEXPECT: 100-continue\r\n\r\n",
        b"GET / HTTP/1.0\r\nUser-Agent: x\r\n\r\n",
    ]
    for raw in requests:
        parser = RequestParser()
        parser.feed(raw)
        head = parser.events[0]
        assert isinstance(head, RequestHead)
        args = (head, b"10.0.0.1", b"https", b"127.0.0.1:8443", b"X-Policy: 1\r\n")
        assert compiled_heads.upstream_request_head(*args) == http1.pure_upstream_request_head(*args)
    responses = [
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: D\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nConnection: close, Server\r\nServer: hidden\r\n\r\n",
    ]
    for raw in responses:
        response_parser = ResponseParser(b"GET")
        response_parser.feed(raw)
        response = response_parser.events[0]
        assert isinstance(response, ResponseHead)
        for rechunk in (False, True):
            for keep_alive in (False, True):
                args2 = (response, rechunk, keep_alive, b"Wed, 02 Dec 2026 00:00:00 GMT", b"Strict-Transport-Security: max-age=1\r\n")
                assert compiled_heads.client_response_head(*args2) == http1.pure_client_response_head(*args2)


@needs_compiled
@pytest.mark.parametrize("name", ["upstream_request_head", "client_response_head"])
def test_the_twins_take_the_pure_builders_parameters(compiled_heads: ModuleType, name: str) -> None:
    """A parameter added to a pure builder must be added to its twin (the call sites use keywords)."""

    def shape(function: object) -> list[tuple[str, object, object]]:
        return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]  # type: ignore[arg-type]

    assert shape(getattr(compiled_heads, name)) == shape(getattr(http1, f"pure_{name}"))


@pytest.mark.parametrize("head_type, drawn", [(RequestHead, _REQUEST_FIELDS), (ResponseHead, _RESPONSE_FIELDS)], ids=["request", "response"])
def test_the_strategies_fill_every_field_of_the_heads(head_type: type, drawn: dict) -> None:
    """A field added to a head (with a default) must be drawn here too, or the twins never see it."""
    assert set(drawn) == {field.name for field in dataclasses.fields(head_type)}


def test_the_special_names_cover_hop_by_hop() -> None:
    """The strategies above reach every name either builder treats specially."""
    assert HOP_BY_HOP <= set(SPECIAL_NAMES)
