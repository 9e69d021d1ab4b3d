"""Property-based fuzzing of the sans-IO request parser (proxy.http1.RequestParser).

The contract under test, for any input at all: `feed` either appends events or raises PeerError
with a 4xx/5xx status the shell can answer with; no other exception ever escapes (a bug there
would cost a connection and a traceback). And framing must not depend on how TCP segmented the
bytes: feeding the same input in pieces, split anywhere, yields the same events and the same
refusal as feeding it whole — otherwise an attacker could pick the split that smuggles.
"""

from __future__ import annotations

from dataclasses import astuple

from hypothesis import example, given
from hypothesis import strategies as st

from proxy.http1 import (
    MAX_HEADER_BYTES,
    MAX_HEADER_COUNT,
    MAX_TARGET_BYTES,
    Body,
    EndOfMessage,
    PeerError,
    RequestHead,
    RequestParser,
    TunnelData,
)

TOKEN_CHARACTERS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
DANGEROUS_BYTES = [b"\x00", b"\r", b"\n", b" ", b"\t", b":", b";", b",", b"\x7f", b"\xff", b"0", b"-", b"\r\n"]
FRAMING_LINES = [
    b"Content-Length: 5\r\n",
    b"Content-Length: +5\r\n",
    b"Content-Length: -1\r\n",
    b"Content-Length: 0x5\r\n",
    b"Content-Length: 5, 5\r\n",
    b"Content-Length: 99999999999999999999999\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked, identity\r\n",
    b"Transfer-Encoding: identity\r\n",
    b"Transfer-Encoding:\x0bchunked\r\n",
    b"Host: other\r\n",
    b"Connection: upgrade\r\nUpgrade: websocket\r\n",
    b"Expect: 100-continue\r\n",
    b" continued\r\n",
]

Normalised = tuple[tuple[object, ...], ...]


def parse(pieces: list[bytes]) -> tuple[Normalised, int | None]:
    """Feed `pieces` in order; (events with adjacent data merged, refusal status or None)."""
    parser = RequestParser()
    status = None
    for piece in pieces:
        try:
            parser.feed(piece)
        except PeerError as error:
            status = error.status
            break
    return _normalise(list(parser.events)), status


def _normalise(events: list[object]) -> Normalised:
    merged: list[tuple[object, ...]] = []
    for event in events:
        if isinstance(event, (Body, TunnelData)):
            kind = type(event).__name__
            if merged and merged[-1][0] == kind:
                merged[-1] = (kind, merged[-1][1] + event.data)  # type: ignore[operator]
            else:
                merged.append((kind, event.data))
        elif isinstance(event, RequestHead):
            merged.append(("head", *astuple(event)))
        else:
            assert isinstance(event, EndOfMessage), f"unexpected event {event!r}"
            merged.append(("end",))
    return tuple(merged)


def assert_contract(data: bytes, cuts: list[int]) -> None:
    whole_events, whole_status = parse([data])
    assert whole_status is None or 400 <= whole_status <= 505
    bounds = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    pieces = [data[start:end] for start, end in zip(bounds, bounds[1:])]
    split_events, split_status = parse(pieces)
    assert (split_events, split_status) == (whole_events, whole_status)
    for event in whole_events:
        if event[0] == "head":
            target = event[2]
            assert isinstance(target, bytes) and target.startswith(b"/"), "only origin-form targets may reach routing"


header_names = st.text(TOKEN_CHARACTERS, min_size=1, max_size=12).map(str.encode)
header_values = st.binary(max_size=24).map(lambda value: bytes(b for b in value if 0x20 <= b < 0x7F))


@st.composite
def valid_requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH"]))
    path = b"/" + draw(st.text("abc/%?=&._-~", max_size=20)).encode()
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    headers = [b"Host: h.test\r\n"]
    framing_names = (b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade")
    extra = draw(st.lists(st.tuples(header_names, header_values), max_size=4))
    headers += [name + b": " + value + b"\r\n" for name, value in extra if name.lower() not in framing_names]
    body = draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    if framing == "length":
        headers.append(b"Content-Length: %d\r\n" % len(body))
        encoded = body
    elif framing == "chunked":
        headers.append(b"Transfer-Encoding: chunked\r\n")
        sizes = draw(st.lists(st.integers(1, 16), max_size=4))
        encoded, offset = b"", 0
        for size in sizes:
            piece = body[offset : offset + size]
            offset += size
            if piece:
                encoded += b"%x\r\n%s\r\n" % (len(piece), piece)
        encoded += b"0\r\n\r\n"
    else:
        encoded = b""
    head = method + b" " + path + b" " + version + b"\r\n" + b"".join(headers) + b"\r\n"
    pipelined = version == b"HTTP/1.1" and draw(st.booleans())  # llhttp refuses bytes after a 1.0 message
    return head + encoded + (b"GET /next HTTP/1.1\r\nHost: h.test\r\n\r\n" if pipelined else b"")


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(valid_requests()))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data)))
        mutation = draw(st.sampled_from(["insert", "replace", "delete", "line", "duplicate"]))
        if mutation == "insert":
            data[position:position] = draw(st.sampled_from(DANGEROUS_BYTES))
        elif mutation == "replace" and position < len(data):
            data[position] = draw(st.integers(0, 255))
        elif mutation == "delete":
            del data[position : position + draw(st.integers(1, 4))]
        elif mutation == "line":
            line_start = data.find(b"\r\n") + 2
            data[line_start:line_start] = draw(st.sampled_from(FRAMING_LINES))
        elif mutation == "duplicate":
            data += data[: position]
    return bytes(data)


cut_points = st.lists(st.integers(0, 10_000), max_size=6)


@given(st.binary(max_size=300), cut_points)
@example(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", [3])  # a TLS ClientHello on the plain port
@example(b"GET /\r\n\r\n", [])  # HTTP/0.9
@example(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", [1])
def test_arbitrary_bytes_give_events_or_a_peer_error(data: bytes, cuts: list[int]) -> None:
    assert_contract(data, cuts)


@given(valid_requests(), cut_points)
def test_valid_requests_parse_the_same_however_split(data: bytes, cuts: list[int]) -> None:
    assert_contract(data, cuts)
    events, status = parse([data])
    assert status is None
    assert events[0][0] == "head" and events[-1] == ("end",)


@given(mutated_requests(), cut_points)
@example(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=\"\x00\"\r\nhello\r\n0\r\n\r\n", [40])
@example(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1_0\r\n\r\n", [])
def test_mutated_requests_give_events_or_a_peer_error(data: bytes, cuts: list[int]) -> None:
    assert_contract(data, cuts)


@given(st.sampled_from(FRAMING_LINES), st.sampled_from(FRAMING_LINES), cut_points)
def test_framing_headers_combined_are_never_read_two_ways(first: bytes, second: bytes, cuts: list[int]) -> None:
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    data = b"POST /f HTTP/1.1\r\nHost: a\r\n" + first + second + b"\r\n5\r\nhello\r\n0\r\n\r\n" + smuggled
    assert_contract(data, cuts)
    events, status = parse([data])
    heads = [event for event in events if event[0] == "head"]
    if len(heads) > 1:  # the body was framed one way only: the second request starts where that framing ends
        framing_bytes = first + second
        assert b"Content-Length" in framing_bytes or b"chunked" in framing_bytes or heads[1][2] == b"/smuggled"


def _status(request: bytes) -> int | None:
    return parse([request])[1]


def test_limits_are_exact() -> None:
    """Each limit refuses one byte (or header) past it and accepts exactly up to it."""
    def with_target(length: int) -> bytes:
        return b"GET /" + b"t" * (length - 1) + b" HTTP/1.1\r\nHost: a\r\n\r\n"

    def with_headers(count: int) -> bytes:
        return b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(count - 1)) + b"\r\n"

    def with_header_bytes(total: int) -> bytes:
        filler = total - len(b"Host") - len(b"a") - len(b"X-Fill")
        return b"GET / HTTP/1.1\r\nHost: a\r\nX-Fill: " + b"f" * filler + b"\r\n\r\n"

    assert (_status(with_target(MAX_TARGET_BYTES)), _status(with_target(MAX_TARGET_BYTES + 1))) == (None, 414)
    assert (_status(with_headers(MAX_HEADER_COUNT)), _status(with_headers(MAX_HEADER_COUNT + 1))) == (None, 431)
    assert (_status(with_header_bytes(MAX_HEADER_BYTES)), _status(with_header_bytes(MAX_HEADER_BYTES + 1))) == (None, 431)
