"""The HTTP/2 server core pumped against an in-memory `h2` client, and raw frames for hostile peers."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from h2.settings import SettingCodes
from h2.stream import StreamState
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from proxy.http1 import upstream_request_head
from proxy.http2 import (
    ConnectionEnded,
    Http2Limits,
    Http2Server,
    Malformed,
    Refused,
    StreamData,
    StreamEnd,
    StreamRefused,
    StreamRequest,
    StreamReset,
    WindowOpened,
    as_http1_head,
    parse_request,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a?b=1"), (b":authority", b"site.test")]


def post(length: int | None = None) -> list[tuple[bytes, bytes]]:
    fields = [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/up"), (b":authority", b"site.test")]
    return fields + ([(b"content-length", b"%d" % length)] if length is not None else [])


def parse_frames(data: bytes) -> list[Frame]:
    frames = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        frames.append(frame)
        data = data[9 + length :]
    return frames


class Pair:
    """A server core and a real h2 client, bytes moved between them by hand."""

    def __init__(self, limits: Http2Limits = Http2Limits(), client_settings: dict[int, int] | None = None) -> None:
        self.server = Http2Server(limits)
        self.server.initiate()
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        self.client = h2.connection.H2Connection(config)
        self.client.initiate_connection()
        if client_settings:
            self.client.update_settings(client_settings)
        self.client_events: list[h2.events.Event] = []
        self.pump()
        self.client_events.clear()

    def pump(self) -> list:
        """Client bytes to the server; the server's reply to the client. Returns the server's events."""
        events = self.server.receive(self.client.data_to_send())
        self.to_client()
        return events

    def to_client(self) -> None:
        self.client_events += self.client.receive_data(self.server.outgoing())

    def request(self, fields: list[tuple[bytes, bytes]], end_stream: bool = True) -> tuple[int, list]:
        stream_id = self.client.get_next_available_stream_id()
        self.client.send_headers(stream_id, fields, end_stream=end_stream)
        return stream_id, self.pump()

    def send_body(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        for start in range(0, len(data), 16384):
            self.client.send_data(stream_id, data[start : start + 16384])
        if end_stream:
            self.client.end_stream(stream_id)

    def raw_request(self, stream_id: int, fields: list[tuple[bytes, bytes]]) -> tuple[list, list[Frame]]:
        """A request the h2 client would refuse to send, encoded with its HPACK state."""
        headers = HeadersFrame(stream_id, flags=["END_HEADERS", "END_STREAM"])
        headers.data = self.client.encoder.encode(fields)
        return self.raw(headers)

    def raw(self, *frames: Frame) -> tuple[list, list[Frame]]:
        """Frames the h2 client would never send; returns the server's events and its reply frames."""
        events = self.server.receive(b"".join(frame.serialize() for frame in frames))
        return events, parse_frames(self.server.outgoing())

    def received(self, kind: type) -> list:
        return [event for event in self.client_events if isinstance(event, kind)]


def goaway_code(frames: list[Frame]) -> int | None:
    codes = [frame.error_code for frame in frames if isinstance(frame, GoAwayFrame)]
    return codes[-1] if codes else None


def resets(frames: list[Frame]) -> dict[int, int]:
    return {frame.stream_id: frame.error_code for frame in frames if isinstance(frame, RstStreamFrame)}


# -- the connection preface and a plain exchange --------------------------------------------------


def test_preface_advertises_our_limits_and_the_connection_window() -> None:
    server = Http2Server()
    server.initiate()
    settings, window = parse_frames(server.outgoing())
    assert isinstance(settings, SettingsFrame) and settings.settings == {
        SettingCodes.HEADER_TABLE_SIZE: 4096,
        SettingCodes.MAX_CONCURRENT_STREAMS: 100,
        SettingCodes.INITIAL_WINDOW_SIZE: 65535,
        SettingCodes.MAX_FRAME_SIZE: 16384,
        SettingCodes.MAX_HEADER_LIST_SIZE: 32 * 1024,
        SettingCodes.ENABLE_PUSH: 0,  # h2 always sends these two; 0 is what a server must say
        SettingCodes.ENABLE_CONNECT_PROTOCOL: 0,
    }
    assert isinstance(window, WindowUpdateFrame) and (window.stream_id, window.window_increment) == (0, 1024 * 1024 - 65535)


def test_get_request_and_response() -> None:
    pair = Pair()
    sid, events = pair.request(GET + [(b"user-agent", b"t"), (b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"te", b"trailers")])
    assert events == [
        StreamRequest(
            sid, b"GET", b"/a?b=1", b"site.test", b"https",
            ((b"user-agent", b"t"), (b"te", b"trailers"), (b"cookie", b"a=1; b=2")), True, None,
        )
    ]
    assert pair.server.open_streams == 1
    pair.server.send_head(sid, 200, ((b"Content-Type", b"text/plain"), (b"Connection", b"close"), (b"Transfer-Encoding", b"chunked")))
    pair.server.send_data(sid, b"ok", end_stream=True)
    pair.to_client()
    (response,) = pair.received(h2.events.ResponseReceived)
    assert response.headers == [(b":status", b"200"), (b"content-type", b"text/plain")]
    assert [event.data for event in pair.received(h2.events.DataReceived)] == [b"ok"]
    assert pair.received(h2.events.StreamEnded) and pair.server.open_streams == 0


def test_request_body_and_trailers_windows_follow_consumed() -> None:
    pair = Pair()
    sid = pair.client.get_next_available_stream_id()
    pair.client.send_headers(sid, post())
    body = b"b" * 65535  # the whole stream window
    pair.client.send_data(sid, body[:16384])
    pair.client.send_data(sid, body[16384:32768])
    pair.client.send_data(sid, body[32768:49152])
    pair.client.send_data(sid, body[49152:])
    events = pair.pump()
    assert isinstance(events[0], StreamRequest) and events[0].content_length is None
    assert b"".join(event.data for event in events if isinstance(event, StreamData)) == body
    assert pair.client.local_flow_control_window(sid) == 0  # nothing reopened before the exchange forwards
    assert not pair.received(h2.events.WindowUpdated)
    pair.server.consumed(sid, len(body))
    pair.to_client()
    assert pair.client.local_flow_control_window(sid) == 65535
    pair.client.send_headers(sid, [(b"x-checksum", b"1")], end_stream=True)
    assert pair.pump() == [StreamEnd(sid, ((b"x-checksum", b"1"),))]
    assert as_http1_head(events[0]).chunked  # no content-length: the HTTP/1.1 hop is chunked


def test_response_trailers_follow_queued_data() -> None:
    pair = Pair(client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 10})
    sid, _ = pair.request(GET)
    pair.server.send_head(sid, 200, ())
    pair.server.send_data(sid, b"0123456789abcdef")
    pair.server.send_trailers(sid, ((b"Grpc-Status", b"0"),))
    pair.to_client()
    assert pair.server.pending(sid) == 6 and not pair.received(h2.events.TrailersReceived)
    pair.client.increment_flow_control_window(100, sid)
    assert pair.pump() == [WindowOpened()]
    assert b"".join(event.data for event in pair.received(h2.events.DataReceived)) == b"0123456789abcdef"
    (trailers,) = pair.received(h2.events.TrailersReceived)
    assert trailers.headers == [(b"grpc-status", b"0")] and pair.server.open_streams == 0


def test_response_before_the_request_body_ends_closes_with_no_error() -> None:
    pair = Pair()
    sid, _ = pair.request(post(10), end_stream=False)
    pair.server.send_head(sid, 413, (), end_stream=True)
    pair.to_client()
    assert pair.received(h2.events.StreamReset)[0].error_code == ErrorCodes.NO_ERROR
    assert pair.server.open_streams == 0


# -- flow control on the send side: zero-window stall ---------------------------------------------


def test_zero_window_peer_holds_only_what_the_shell_queued_and_can_be_timed_out() -> None:
    pair = Pair(client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 0})
    sid, _ = pair.request(GET)
    pair.server.send_head(sid, 200, ())
    chunk = b"z" * 300_000
    pair.server.send_data(sid, chunk)
    wire = pair.server.outgoing()
    assert not any(isinstance(frame, DataFrame) for frame in parse_frames(wire)) and len(wire) < 100
    assert (pair.server.pending(sid), pair.server.pending_total, pair.server.stalled()) == (300_000, 300_000, [sid])
    pair.client.receive_data(wire)
    # the peer acknowledges with unrelated traffic but never opens its window: nothing moves
    pair.client.ping(b"12345678")
    assert pair.pump() == [] and pair.server.pending(sid) == 300_000
    # the shell's send deadline passes: it resets the stream, the queue is gone
    pair.server.reset(sid, ErrorCodes.CANCEL)
    assert resets(parse_frames(pair.server.outgoing())) == {sid: ErrorCodes.CANCEL}
    assert (pair.server.pending_total, pair.server.stalled(), pair.server.open_streams) == (0, [], 0)


def test_a_peer_that_does_not_read_leaves_data_in_pending_not_in_the_output() -> None:
    pair = Pair(client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    pair.client.increment_flow_control_window(2**31 - 1 - 65535)  # windows wide open
    sid, _ = pair.request(GET)
    pair.server.send_head(sid, 200, ())
    for _ in range(4):  # the shell's transport is paused: it queues but does not take outgoing()
        pair.server.send_data(sid, b"y" * 100_000)
    assert pair.server.pending(sid) == pair.server.pending_total == 400_000  # what its watermark sees
    wire = pair.server.outgoing()  # the transport drained: one write of everything
    assert sum(len(frame.data) for frame in parse_frames(wire) if isinstance(frame, DataFrame)) == 400_000
    assert pair.server.pending_total == 0 and pair.server.stalled() == []


# -- validation: a pure function, as a table -------------------------------------------------------

MALFORMED = {
    "upper-case name": GET + [(b"User-Agent", b"x")],
    "cr in value": GET + [(b"x-a", b"1\r\nx-b: 2")],
    "leading space in value": GET + [(b"x-a", b" 1")],
    "connection header": GET + [(b"connection", b"keep-alive")],
    "transfer-encoding": GET + [(b"transfer-encoding", b"chunked")],
    "upgrade": GET + [(b"upgrade", b"websocket")],
    "te not trailers": GET + [(b"te", b"gzip")],
    "missing :path": GET[:2] + GET[3:],
    "missing :scheme": GET[:1] + GET[2:],
    "repeated :method": GET + [(b":method", b"GET")],
    "unknown pseudo": GET + [(b":protocol", b"websocket")],
    "pseudo after regular": GET[:3] + [(b"x", b"1"), GET[3]],
    "space in :path": GET[:2] + [(b":path", b"/a b")] + GET[3:],
    "userinfo in :authority": GET[:3] + [(b":authority", b"u@site.test")],
    "content-length on end_stream": GET + [(b"content-length", b"5")],
}

REFUSED = {
    "connect": ([(b":method", b"CONNECT"), (b":authority", b"site.test:443")], 405),
    "asterisk path": (GET[:2] + [(b":path", b"*")] + GET[3:], 400),
    "absolute path": (GET[:2] + [(b":path", b"http://x/")] + GET[3:], 400),
    "no authority nor host": (GET[:3], 400),
    "host disagrees": (GET + [(b"host", b"other.test")], 400),
    "two hosts": (GET[:3] + [(b"host", b"a"), (b"host", b"b")], 400),
    "header list too large": (GET + [(b"x-big", b"v" * 33_000)], 431),
    "too many headers": (GET + [(b"x-%d" % n, b"v") for n in range(101)], 431),
}


@pytest.mark.parametrize("fields", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests(fields: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(Malformed):
        parse_request(1, fields, True, Http2Limits())


@pytest.mark.parametrize("fields, status", REFUSED.values(), ids=REFUSED.keys())
def test_refused_requests(fields: list[tuple[bytes, bytes]], status: int) -> None:
    with pytest.raises(Refused) as refused:
        parse_request(1, fields, True, Http2Limits())
    assert refused.value.status == status


def test_as_many_headers_as_http1_allows() -> None:
    request = parse_request(1, GET + [(b"x-%d" % n, b"v") for n in range(100)], True, Http2Limits())
    assert len(request.headers) == 100


def test_host_alone_and_host_agreeing_with_authority_are_accepted() -> None:
    alone = parse_request(1, GET[:3] + [(b"host", b"site.test")], True, Http2Limits())
    agreeing = parse_request(1, GET + [(b"host", b"SITE.test")], True, Http2Limits())
    assert alone.authority == agreeing.authority == b"site.test" and alone.headers == agreeing.headers == ()


def test_malformed_request_resets_that_stream_only() -> None:
    pair = Pair()
    bad, events = pair.request(GET + [(b"Upper", b"x")])
    assert events == [] and pair.received(h2.events.StreamReset)[0].error_code == ErrorCodes.PROTOCOL_ERROR
    good, events = pair.request(GET)
    assert [type(event) for event in events] == [StreamRequest] and good > bad


# Bytes the exchange never forwards must still reopen the connection window, or the connection
# stalls: each of these tests repeats its case until more than the 1 MiB window has gone through.
ROUNDS_PAST_THE_WINDOW = 20


def test_refused_request_is_answered_and_its_body_discarded() -> None:
    pair = Pair()
    for _ in range(ROUNDS_PAST_THE_WINDOW):
        sid, events = pair.request([(b":method", b"CONNECT"), (b":authority", b"site.test:443")], end_stream=False)
        assert events == [StreamRefused(sid, 405, "CONNECT is not supported by a reverse proxy")]
        pair.send_body(sid, b"x" * 60_000)
        assert pair.pump() == []  # no StreamData: the exchange never sees a refused body
        pair.server.send_head(sid, 405, ((b"content-length", b"0"),), end_stream=True)
        pair.to_client()
        assert pair.received(h2.events.ResponseReceived)[-1].headers[0] == (b":status", b"405")
        assert pair.server.open_streams == 0


@pytest.mark.parametrize("declared, sent, end", [(60_003, b"abcd", False), (60_005, b"abc", True)], ids=["longer", "shorter"])
def test_content_length_contradicted_by_data_is_a_stream_error(declared: int, sent: bytes, end: bool) -> None:
    pair = Pair()
    for _ in range(ROUNDS_PAST_THE_WINDOW):
        sid, _ = pair.request(post(declared), end_stream=False)
        pair.send_body(sid, b"p" * 60_000)  # forwarded and consumed by the exchange
        pair.server.consumed(sid, 60_000)
        pair.client.send_data(sid, sent, end_stream=end)
        assert pair.pump()[-1] == StreamReset(sid, ErrorCodes.PROTOCOL_ERROR)
        assert pair.received(h2.events.StreamReset)[-1].error_code == ErrorCodes.PROTOCOL_ERROR
    _, events = pair.request(GET)  # the connection carries on
    assert isinstance(events[0], StreamRequest) and not pair.server.closed


@pytest.mark.parametrize("values", [[b"abc"], [b"3", b"4"]], ids=["not digits", "conflicting"])
def test_invalid_content_length_value_ends_the_connection(values: list[bytes]) -> None:
    # A quirk of h2: it checks the value while it handles the HEADERS frame and makes any failure
    # there a connection error. Stricter than RFC 9113's stream error; the other streams go too.
    pair = Pair()
    _, events = pair.request(post() + [(b"content-length", value) for value in values], end_stream=False)
    assert [type(event) for event in events] == [ConnectionEnded] and events[0].error_code == ErrorCodes.PROTOCOL_ERROR


def test_client_reset_stops_the_exchange_and_credits_unconsumed_bytes() -> None:
    pair = Pair()
    for _ in range(ROUNDS_PAST_THE_WINDOW):
        sid, _ = pair.request(post(), end_stream=False)
        pair.send_body(sid, b"x" * 60_000)
        pair.pump()
        pair.client.reset_stream(sid, ErrorCodes.CANCEL)
        assert pair.pump() == [StreamReset(sid, ErrorCodes.CANCEL)]
    pair.server.send_data(sid, b"late", end_stream=True)  # a write crossing the reset is ignored
    pair.server.consumed(sid, 40_000)
    assert pair.server.outgoing() == b"" and pair.server.open_streams == 0


def test_calls_out_of_order_are_the_exchanges_bug_and_say_so() -> None:
    pair = Pair()
    sid, _ = pair.request(GET)
    with pytest.raises(RuntimeError, match="before the head"):
        pair.server.send_data(sid, b"x")
    pair.server.send_head(sid, 103, ((b"link", b"</a>"),))  # interim heads may come first
    pair.server.send_head(sid, 200, ())
    with pytest.raises(RuntimeError, match="second response head"):
        pair.server.send_head(sid, 200, ())
    pair.server.send_trailers(sid, ())
    with pytest.raises(RuntimeError, match="already ended"):
        pair.server.send_data(sid, b"x")


# -- defences -------------------------------------------------------------------------------------


def test_rapid_reset_ends_the_connection_with_enhance_your_calm() -> None:
    pair = Pair()
    events: list = []
    for _ in range(101):
        sid = pair.client.get_next_available_stream_id()
        pair.client.send_headers(sid, GET)
        pair.client.reset_stream(sid, ErrorCodes.CANCEL)
        events += pair.server.receive(pair.client.data_to_send())
    assert isinstance(events[-1], ConnectionEnded) and events[-1].error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert goaway_code(parse_frames(pair.server.outgoing())) == ErrorCodes.ENHANCE_YOUR_CALM
    assert pair.server.closed and pair.server.receive(b"\x00" * 9) == []


def test_resets_within_the_budget_of_finished_streams_are_fine() -> None:
    pair = Pair(Http2Limits(reset_cap=5))
    for _ in range(50):  # every other stream is cancelled: a browser navigating away
        sid, _ = pair.request(GET)
        pair.server.send_head(sid, 204, (), end_stream=True)
        pair.to_client()
        cancelled = pair.client.get_next_available_stream_id()
        pair.client.send_headers(cancelled, GET)
        pair.client.reset_stream(cancelled)
        pair.pump()
    assert not pair.server.closed


def test_finished_streams_cannot_be_banked_for_a_reset_burst() -> None:
    pair = Pair(Http2Limits(reset_cap=5))
    for _ in range(20):
        sid, _ = pair.request(GET)
        pair.server.send_head(sid, 204, (), end_stream=True)
        pair.to_client()
    events: list = []
    for _ in range(6):
        sid = pair.client.get_next_available_stream_id()
        pair.client.send_headers(sid, GET)
        pair.client.reset_stream(sid)
        events += pair.server.receive(pair.client.data_to_send())
    assert isinstance(events[-1], ConnectionEnded) and events[-1].error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_not_http2_at_all() -> None:
    server = Http2Server()
    server.initiate()
    events = server.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [type(event) for event in events] == [ConnectionEnded] and events[0].error_code == ErrorCodes.PROTOCOL_ERROR
    assert server.closed


def test_continuation_flood_is_cut_before_decoding() -> None:
    pair = Pair()
    head = HeadersFrame(1)
    head.data = b"\x00" * 16384  # never decoded: the block is counted first
    continuations = []
    for _ in range(4):
        frame = ContinuationFrame(1)
        frame.data = b"\x00" * 16384
        continuations.append(frame)
    events, frames = pair.raw(head, *continuations)
    assert [type(event) for event in events] == [ConnectionEnded]
    assert goaway_code(frames) == ErrorCodes.ENHANCE_YOUR_CALM


def test_empty_continuation_flood_is_cut_by_frame_count() -> None:
    pair = Pair()
    head = HeadersFrame(1)
    head.data = pair.client.encoder.encode(GET)
    events, frames = pair.raw(head, *(ContinuationFrame(1) for _ in range(100)))  # no bytes, no end
    assert [type(event) for event in events] == [ConnectionEnded]
    assert goaway_code(frames) == ErrorCodes.PROTOCOL_ERROR  # h2's cap: 64 frames a block


def test_hpack_bomb_over_the_hard_limit_ends_the_connection() -> None:
    pair = Pair()
    # one 4 KiB entry in the dynamic table, then referenced again and again by its one-byte index
    fields = GET + [(b"x-big", b"v" * 4000)] + [(b"x-big", b"v" * 4000)] * 20
    pair.client.send_headers(1, fields, end_stream=True)
    events = pair.pump()
    assert isinstance(events[-1], ConnectionEnded) and events[-1].error_code == ErrorCodes.ENHANCE_YOUR_CALM


@pytest.mark.parametrize("make", [lambda: SettingsFrame(0), lambda: PingFrame(0, opaque_data=b"\x00" * 8)], ids=["settings", "ping"])
def test_control_frame_flood_from_a_peer_that_does_not_read(make) -> None:
    pair = Pair(Http2Limits(control_reply_cap=50))
    for _ in range(2):  # a peer that reads its ACKs (the shell takes outgoing()) is not flooding
        events, _ = pair.raw(*(make() for _ in range(50)))
        assert events == []
    flood = b"".join(make().serialize() for _ in range(51))
    assert pair.server.receive(flood[: len(flood) // 2]) == []
    events = pair.server.receive(flood[len(flood) // 2 :])  # outgoing() not taken in between
    assert isinstance(events[-1], ConnectionEnded) and events[-1].error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert goaway_code(parse_frames(pair.server.outgoing())) == ErrorCodes.ENHANCE_YOUR_CALM


def test_streams_over_the_concurrency_limit_are_refused_and_hpack_stays_in_step() -> None:
    pair = Pair(Http2Limits(max_concurrent_streams=3))
    fields = GET + [(b"x-indexed", b"same value each time")]
    accepted = [pair.request(fields, end_stream=False)[0] for _ in range(3)]
    events, frames = pair.raw_request(7, fields + [(b"x-new", b"indexed now")])  # a client ignoring our SETTINGS
    assert events == [] and resets(frames) == {7: ErrorCodes.REFUSED_STREAM}
    pair.server.send_head(accepted[0], 204, (), end_stream=True)
    pair.server.outgoing()
    # the refused stream's block was decoded, so its new table entry resolves now
    events, _ = pair.raw_request(9, fields + [(b"x-new", b"indexed now")])
    assert isinstance(events[0], StreamRequest)
    assert events[0].headers == ((b"x-indexed", b"same value each time"), (b"x-new", b"indexed now"))


def test_oversize_header_list_is_a_431_refusal() -> None:
    pair = Pair()
    sid, events = pair.request(GET + [(b"x-big", b"v" * 40_000)])
    assert events == [StreamRefused(sid, 431, "request headers too large")] and not pair.server.closed


def test_frame_over_max_frame_size_is_refused_from_its_header() -> None:
    pair = Pair()
    header = (16385).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big")
    events = pair.server.receive(header + b"x" * 100)  # refused before the payload has arrived
    assert events[-1] == ConnectionEnded(ErrorCodes.FRAME_SIZE_ERROR, "a 16385-byte frame exceeds 16384")
    assert goaway_code(parse_frames(pair.server.outgoing())) == ErrorCodes.FRAME_SIZE_ERROR


def test_protocol_error_from_h2_ends_the_connection() -> None:
    pair = Pair()
    data = DataFrame(2)  # even stream id: clients may not open those
    data.data = b"x"
    events, frames = pair.raw(data)
    assert isinstance(events[-1], ConnectionEnded) and goaway_code(frames) == ErrorCodes.PROTOCOL_ERROR


# -- drain and connection end ---------------------------------------------------------------------


def test_graceful_goaway_lets_streams_in_flight_finish_and_refuses_new_ones() -> None:
    pair = Pair()
    in_flight, _ = pair.request(GET)
    pair.server.goaway()
    pair.to_client()
    (goaway,) = pair.received(h2.events.ConnectionTerminated)
    assert (goaway.error_code, goaway.last_stream_id) == (ErrorCodes.NO_ERROR, in_flight)
    late = in_flight + 2
    headers = HeadersFrame(late, flags=["END_HEADERS", "END_STREAM"])
    headers.data = pair.client.encoder.encode(GET)
    events, frames = pair.raw(headers)
    assert events == [] and resets(frames) == {late: ErrorCodes.REFUSED_STREAM}
    assert pair.server.open_streams == 1
    pair.server.send_head(in_flight, 200, (), end_stream=True)
    assert pair.server.open_streams == 0 and not pair.server.closed


def test_peer_goaway_ends_the_connection() -> None:
    pair = Pair()
    pair.client.close_connection()
    assert pair.pump() == [ConnectionEnded(ErrorCodes.NO_ERROR, "peer sent GOAWAY")]
    assert pair.server.closed


# -- towards the HTTP/1.1 backend -----------------------------------------------------------------

UPSTREAM = {
    "get": (
        StreamRequest(1, b"GET", b"/a?b=1", b"site.test", b"https", ((b"te", b"trailers"), (b"accept", b"*/*")), True, None),
        ((b"host", b"site.test"), (b"accept", b"*/*")), False, None,
    ),
    "post with length": (
        StreamRequest(3, b"POST", b"/up", b"site.test:8443", b"https", ((b"content-length", b"3"),), False, 3),
        ((b"host", b"site.test:8443"), (b"content-length", b"3")), False, 3,
    ),
    "post without length": (
        StreamRequest(5, b"POST", b"/up", b"site.test", b"https", (), False, None),
        ((b"host", b"site.test"),), True, None,
    ),
}


@pytest.mark.parametrize("request_, headers, chunked, length", UPSTREAM.values(), ids=UPSTREAM.keys())
def test_as_http1_head(request_: StreamRequest, headers, chunked: bool, length: int | None) -> None:
    head = as_http1_head(request_)
    assert (head.method, head.target, head.host, head.headers) == (request_.method, request_.target, request_.authority, headers)
    assert (head.chunked, head.content_length) == (chunked, length)


def test_http1_head_serialises_for_the_backend() -> None:
    request = StreamRequest(1, b"POST", b"/up", b"site.test", b"https", ((b"te", b"trailers"),), False, None)
    written = upstream_request_head(as_http1_head(request), b"127.0.0.2", b"https", b"127.0.0.1:8443")
    lines = written.split(b"\r\n")
    assert lines[0] == b"POST /up HTTP/1.1" and b"Host: site.test" in lines and b"Transfer-Encoding: chunked" in lines
    assert not any(line.lower().startswith(b"te:") for line in lines)


def test_limits_below_the_rfc_defaults_are_refused() -> None:
    with pytest.raises(ValueError, match="stream_window must be at least 65535"):
        Http2Limits(stream_window=1024)


def test_padding_is_not_body() -> None:
    pair = Pair()
    sid, _ = pair.request(post(3), end_stream=False)
    data = DataFrame(sid, flags=["END_STREAM", "PADDED"])
    data.data, data.pad_length = b"abc", 10
    events, frames = pair.raw(data)
    assert events == [StreamData(sid, b"abc"), StreamEnd(sid, ())] and not resets(frames)


# -- any byte sequence: events or a GOAWAY, never an exception ------------------------------------

raw_frames = st.builds(
    lambda kind, flags, stream_id, payload: len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream_id.to_bytes(4, "big") + payload,
    st.integers(0, 10),
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1]),
    st.binary(max_size=40),
)


def valid_frames() -> st.SearchStrategy[bytes]:
    """What a real client sends for a request with a body: HEADERS, DATA, maybe a reset."""

    def build(path: bytes, body: bytes, reset: bool) -> bytes:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        client.data_to_send()
        client.send_headers(1, post(len(body))[:2] + [(b":path", b"/" + path)] + post()[3:4])
        client.send_data(1, body, end_stream=not reset)
        if reset:
            client.reset_stream(1)
        return client.data_to_send()

    return st.builds(build, st.binary(max_size=8), st.binary(max_size=40), st.booleans())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(raw_frames, valid_frames()), max_size=8), st.integers(1, 64))
def test_any_frames_give_events_or_a_goaway_never_an_exception(frames: list[bytes], split: int) -> None:
    server = Http2Server(Http2Limits(max_concurrent_streams=2))
    server.initiate()
    wire = PREFACE + SettingsFrame(0).serialize() + b"".join(frames)
    requested: set[int] = set()
    for start in range(0, len(wire), split):  # arbitrary read boundaries
        for event in server.receive(wire[start : start + split]):
            if isinstance(event, (StreamRequest, StreamRefused)):
                requested.add(event.stream_id)
            elif isinstance(event, (StreamData, StreamEnd)):
                assert event.stream_id in requested
        for frame in parse_frames(server.outgoing()):  # what we write is always well-framed
            assert frame.stream_id == 0 or frame.stream_id % 2 == 1
        assert server.open_streams <= 2 and server.pending_total == 0
    if server.closed:
        assert server.receive(wire) == []


# Both sides act in any order: the client (a real h2 connection) opens, uploads, cancels and opens
# windows; the exchange answers, streams, resets, consumes and drains. Whatever the order, the
# client's h2 accepts every byte we write (no protocol error), and the queues add up.
actions = st.lists(
    st.one_of(
        st.tuples(st.just("open"), st.booleans()),
        st.tuples(st.just("upload"), st.integers(0, 3), st.integers(0, 70_000), st.booleans()),
        st.tuples(st.just("cancel"), st.integers(0, 3)),
        st.tuples(st.just("read"), st.integers(0, 3), st.integers(0, 100_000)),
        st.tuples(st.just("head"), st.integers(0, 3), st.booleans()),
        st.tuples(st.just("data"), st.integers(0, 3), st.integers(0, 100_000), st.booleans()),
        st.tuples(st.just("trailers"), st.integers(0, 3)),
        st.tuples(st.just("reset"), st.integers(0, 3)),
        st.tuples(st.just("consume"), st.integers(0, 3), st.integers(0, 70_000)),
        st.tuples(st.just("goaway"),),
        st.tuples(st.just("pump"),),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions)
def test_any_interleaving_keeps_the_client_happy_and_the_queues_consistent(steps: list[tuple]) -> None:
    pair = Pair(Http2Limits(max_concurrent_streams=3), client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 30_000})
    client, server = pair.client, pair.server
    streams: list[int] = []
    announced: set[int] = set()  # streams the exchange has heard of
    head_sent: set[int] = set()  # the exchange's side of the contract: head, then data, then the end
    ended: set[int] = set()

    def pump() -> None:
        announced.update(e.stream_id for e in pair.pump() if isinstance(e, (StreamRequest, StreamRefused)))

    def pick(index: int) -> int | None:
        return streams[index % len(streams)] if streams else None

    for step in steps:
        kind, args = step[0], step[1:]
        sid = pick(args[0]) if args and kind not in ("open", "goaway", "pump") else None
        known = sid in announced
        # h2 closes a stream on any call its state forbids, so the client only does what it may
        state = client.streams[sid].state_machine.state if sid in client.streams else StreamState.CLOSED
        if kind == "open" and client.open_outbound_streams < 3:
            sid = client.get_next_available_stream_id()
            client.send_headers(sid, post() if not args[0] else GET, end_stream=args[0])
            streams.append(sid)
        elif kind == "upload" and state in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE):
            size = min(args[1], client.local_flow_control_window(sid))
            pair.send_body(sid, b"u" * size, end_stream=args[2])
        elif kind == "cancel" and state is not StreamState.CLOSED:
            client.reset_stream(sid)
        elif kind == "read" and state in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL):
            client.increment_flow_control_window(args[1] + 1, sid)
            client.increment_flow_control_window(args[1] + 1)
        if kind == "head" and known and sid not in head_sent:
            server.send_head(sid, 200, ((b"x", b"y"),), end_stream=args[1])
            head_sent.add(sid)
            if args[1]:
                ended.add(sid)
        elif kind == "data" and sid in head_sent and sid not in ended:
            server.send_data(sid, b"d" * args[1], end_stream=args[2])
            if args[2]:
                ended.add(sid)
        elif kind == "trailers" and sid in head_sent and sid not in ended:
            server.send_trailers(sid, ((b"t", b"1"),))
            ended.add(sid)
        elif kind == "reset" and known:
            server.reset(sid)
        elif kind == "consume" and known:
            server.consumed(sid, args[1])
        elif kind == "goaway":
            # h2 (the client here) stops reading at a GOAWAY, so this is the client's last step
            pump()
            server.goaway()
            pair.to_client()
            assert pair.received(h2.events.ConnectionTerminated)
            return
        elif kind == "pump":
            pump()  # the client's h2 raises if anything we wrote breaks the protocol
        assert server.pending_total == sum(server.pending(stream) for stream in set(streams))
    pair.pump()
