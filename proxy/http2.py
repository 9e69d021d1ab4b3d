"""HTTP/2 server framing, sans-IO: bytes in, events out, bytes out, over the `h2` library.

Theory of operation
-------------------
`Http2Server` is one client connection after TLS. The shell feeds decrypted bytes to `receive()`,
which returns frozen events; it calls the send side (`send_head`, `send_data`, `send_trailers`,
`reset`, `goaway`) and `consumed()` as the exchange progresses; after each turn it writes
`outgoing()` (everything queued, in order) through TLS in one write. No sockets, no loop, no
clock: the shell owns time and, when a deadline passes, says so with `reset()` or `goaway()`.

`h2` does the framing, HPACK and the stream state machines. In front of it sits a frame screen:
`receive()` splits the input into whole frames itself (reading only the 9-byte frame headers) and
hands h2 one frame at a time, which lets us refuse what h2 would otherwise buffer or get wrong:
- a frame longer than our SETTINGS_MAX_FRAME_SIZE is refused from its header (h2 would first
  buffer the whole announced length, up to 16 MiB) → GOAWAY FRAME_SIZE_ERROR;
- HEADERS + CONTINUATION bytes are counted before HPACK sees them (CVE-2024-27316) → GOAWAY
  ENHANCE_YOUR_CALM over `header_block_bytes`;
- client RST_STREAMs are counted (rapid reset, CVE-2023-44487): each one, and each stream we reset
  for the client's fault, adds one to a debt that each stream finished normally pays back by one
  (never below zero, so finished streams cannot be banked for a later burst); a debt over
  `reset_cap` → GOAWAY ENHANCE_YOUR_CALM. A browser cancelling some of its streams stays near 0;
- SETTINGS and PING frames each oblige us to queue an ACK: those queued since the shell last took
  `outgoing()` are counted → GOAWAY ENHANCE_YOUR_CALM. The shell takes `outgoing()` only while its
  transport accepts writes, so this counts the replies a peer that does not read makes us hold;
- a DATA frame that overruns the stream's content-length is caught before h2 sees it, so it
  becomes a stream error (h2 alone would end the whole connection).

h2 runs with its header validation off: `parse_request` below does RFC 9113 §8.2–8.3 in one pass
and splits what it rejects in two. *Malformed* messages (upper-case or invalid names, CR/LF/NUL in
values, connection-specific headers, `te` other than "trailers", missing or repeated
pseudo-headers, content-length contradicted by the body) reset the stream with PROTOCOL_ERROR and
produce no event (§8.1.1). *Refusals* are well-formed HTTP/2 we will not serve; they come out as
`StreamRefused(status)` for the exchange to answer like HTTP/1.1 does: CONNECT → 405 (a reverse
proxy, no tunnels), a :path that is not origin-form → 400, :authority and Host disagreeing or
neither present → 400, a header list over `max_header_list_bytes` or `max_header_count` → 431.
A refused stream's body is discarded (its window credited at once).

Concurrency: we advertise `max_concurrent_streams` but let h2 accept one more, so the excess
stream's header block is still decoded (the HPACK table must stay in step with the peer's) and
then reset with REFUSED_STREAM, a stream error the client may retry, instead of h2's connection
error. Such refusals count against the reset budget like client resets.

Flow control, both ways bounded:
- Receive: the peer may send at most `stream_window` per stream and `connection_window` in all;
  windows reopen only when the shell calls `consumed(stream_id, n)` for body bytes it forwarded.
  Bytes the exchange will never forward (padding, refused or reset streams) are credited by the
  core itself, so the connection window never leaks.
- Send: `send_data` queues; `outgoing()` frames as much of the queues as the peer's windows allow
  (and the shell calls it only while its transport takes writes, so a peer that opens its windows
  but does not read leaves the bytes queued here, not in a transport buffer). A WINDOW_UPDATE for
  a stream with queued data yields `WindowOpened`. `pending(stream_id)` / `pending_total` say how
  much is queued: the shell stops reading the backend above its watermark, so memory per stream
  is the watermark, never the response size. `stalled()` lists streams whose queue waits on a
  window the peer keeps shut: the shell times them out with `reset(stream_id, CANCEL)`.

Stream lifetime: a stream counts in `open_streams` from its `StreamRequest` (or `StreamRefused`)
until the request has ended and our END_STREAM has actually gone out, or until either side resets
it. Ending the response while the request body is still coming closes the stream with RST_STREAM
NO_ERROR (§8.1). Send calls for a stream that is gone are ignored: a `StreamReset` told the
exchange, and in an async shell its last writes may cross that event. The order of send calls on a
live stream is a contract (any 1xx heads, one final head, data, then one end: `end_stream` or
trailers); breaking it raises RuntimeError, a bug of ours, rather than writing invalid HTTP/2.

Drain: `goaway()` sends GOAWAY NO_ERROR with the highest stream id processed; streams in flight
finish, later ones are refused with REFUSED_STREAM; close when `open_streams` reaches 0. h2 itself
stops all traffic once it has sent or received a GOAWAY, so the graceful one is written by this
module, and a peer's GOAWAY ends the connection (`ConnectionEnded`): h2 will not send on it again.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

from h2 import events as h2_events
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from proxy.http1 import MAX_HEADER_BYTES, MAX_HEADER_COUNT, RequestHead

# Limits. HAProxy's and nginx's defaults where they have one; the reason beside each.
MAX_CONCURRENT_STREAMS = 100  # HAProxy tune.h2.max-concurrent-streams (nginx: 128); each holds an exchange
MAX_HEADER_LIST_BYTES = MAX_HEADER_BYTES  # same budget as HTTP/1.1 (32 KiB); beyond it 431
HEADER_TABLE_BYTES = 4096  # the RFC default HPACK table: 4 KiB of decoder state per connection
MAX_FRAME_BYTES = 16384  # the RFC minimum and default: a frame never makes us buffer more than this
STREAM_WINDOW = 65535  # the RFC default, so no SETTINGS race; a stream buffers at most this
CONNECTION_WINDOW = 1024 * 1024  # all request bodies of one connection together buffer at most 1 MiB
RESET_CAP = 100  # resets not paid back by finished streams (nghttp2 bursts 1000, HAProxy counts glitches)
CONTROL_REPLY_CAP = 1000  # SETTINGS/PING ACKs queued unread (nghttp2's max-outbound-ack is 1000)

_PREFACE_BYTES = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", checked by h2

# Frame types and flags we screen (RFC 9113 §6).
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x6, 0x9
_END_STREAM, _ACK, _PADDED = 0x1, 0x1, 0x8

# RFC 9113 §8.2.2: these make no sense on a multiplexed connection; a request carrying one is malformed.
CONNECTION_SPECIFIC = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"))

_INVALID_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9a-z]")  # a lower-case token (RFC 9110 §5.6.2)
_INVALID_METHOD = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9a-zA-Z]")
_INVALID_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")  # §8.2.1; CR/LF would split an HTTP/1.1 head
_INVALID_PATH = re.compile(rb"[\x00-\x20\x7f-\xff#]")  # goes into the HTTP/1.1 request line as is
_INVALID_AUTHORITY = re.compile(rb"[^A-Za-z0-9\-._~!$&'()*+,;=:\[\]%]")  # host[:port]; no userinfo (§8.3.1)

Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class Http2Limits:
    max_concurrent_streams: int = MAX_CONCURRENT_STREAMS
    max_header_list_bytes: int = MAX_HEADER_LIST_BYTES
    max_header_count: int = MAX_HEADER_COUNT
    header_table_bytes: int = HEADER_TABLE_BYTES
    max_frame_bytes: int = MAX_FRAME_BYTES
    stream_window: int = STREAM_WINDOW
    connection_window: int = CONNECTION_WINDOW
    reset_cap: int = RESET_CAP
    control_reply_cap: int = CONTROL_REPLY_CAP

    def __post_init__(self) -> None:
        # These are enforced from the first byte, before the peer has read our SETTINGS, so they
        # may not be below the RFC 9113 defaults the peer may use until then.
        for name, floor in (("stream_window", 65535), ("max_frame_bytes", 16384), ("header_table_bytes", 4096)):
            if getattr(self, name) < floor:
                raise ValueError(f"HTTP/2 {name} must be at least {floor} (the RFC default)")

    @property
    def header_block_bytes(self) -> int:
        """Encoded header block (HEADERS + CONTINUATION) and decoded list beyond which the
        connection ends: twice the list we serve, so a list somewhat over the limit still gets a
        431 while an HPACK bomb or CONTINUATION flood stops before it costs memory."""
        return 2 * self.max_header_list_bytes


# -- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """A request head. `end_stream`: no body follows and no `StreamEnd` will either."""

    stream_id: int
    method: bytes
    target: bytes  # :path
    authority: bytes  # :authority, or Host when the client sent only that
    scheme: bytes
    headers: Headers  # regular headers only (no Host: see authority); cookie crumbs joined with "; "
    end_stream: bool
    content_length: int | None


@dataclass(frozen=True, slots=True)
class StreamRefused:
    """A well-formed request we will not serve: answer it with `status` (and end the stream)."""

    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class StreamData:
    stream_id: int
    data: bytes  # request body bytes; call consumed(stream_id, len(data)) once forwarded


@dataclass(frozen=True, slots=True)
class StreamEnd:
    stream_id: int
    trailers: Headers


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone (the client reset it, or we did: it broke the protocol): stop its exchange."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """Queued response data moved: the shell may resume backend reads below its watermark."""


@dataclass(frozen=True, slots=True)
class ConnectionEnded:
    """GOAWAY received or sent for an error: write outgoing() and close."""

    error_code: int
    reason: str


WINDOW_OPENED = WindowOpened()
Event = StreamRequest | StreamRefused | StreamData | StreamEnd | StreamReset | WindowOpened | ConnectionEnded


# -- request validation (pure) --------------------------------------------------------------------


class Malformed(Exception):
    """RFC 9113 §8.1.1: the stream is reset with PROTOCOL_ERROR."""


class Refused(Exception):
    """Valid HTTP/2 that we do not serve; `status` is the answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _check_field(name: bytes, value: bytes) -> None:
    if not name or _INVALID_NAME.search(name):
        raise Malformed(f"header name {name[:40]!r} is not a lower-case token")
    if _INVALID_VALUE.search(value):
        raise Malformed(f"header {name.decode('latin-1')} has CR, LF, NUL or surrounding whitespace")
    if name in CONNECTION_SPECIFIC:
        raise Malformed(f"connection-specific header {name.decode('latin-1')}")


def parse_request(
    stream_id: int, fields: list[tuple[bytes, bytes]], end_stream: bool, limits: Http2Limits
) -> StreamRequest:
    """One pass over a decoded request header list; raises Malformed or Refused."""
    method = scheme = path = authority = None
    regular: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    hosts: list[bytes] = []
    content_length: int | None = None
    size = 0
    pseudo_count = 0
    in_pseudo = True
    for name, value in fields:
        size += len(name) + len(value) + 32  # SETTINGS_MAX_HEADER_LIST_SIZE counts 32 per field (§6.5.2)
        if name[:1] == b":":
            if not in_pseudo:
                raise Malformed("pseudo-header after a regular header")
            if name == b":method" and method is None:
                method = value
            elif name == b":scheme" and scheme is None:
                scheme = value
            elif name == b":path" and path is None:
                path = value
            elif name == b":authority" and authority is None:
                authority = value
            else:
                raise Malformed(f"unknown or repeated pseudo-header {name[:40]!r}")
            pseudo_count += 1
            continue
        in_pseudo = False
        _check_field(name, value)
        if name == b"te":
            if value.lower() != b"trailers":
                raise Malformed('te other than "trailers"')
        elif name == b"cookie":
            cookies.append(value)
            continue
        elif name == b"host":
            hosts.append(value)
            continue
        elif name == b"content-length" and content_length is None:
            content_length = int(value)  # h2 has checked: digits, and equal when repeated
        regular.append((name, value))
    if size > limits.max_header_list_bytes or len(fields) - pseudo_count > limits.max_header_count:
        raise Refused(431, "request headers too large")
    if method == b"CONNECT":
        raise Refused(405, "CONNECT is not supported by a reverse proxy")
    if method is None or scheme is None or path is None:
        raise Malformed("a request needs :method, :scheme and :path")
    if not method or _INVALID_METHOD.search(method):
        raise Malformed("invalid :method")
    if not path or _INVALID_PATH.search(path):
        raise Malformed("invalid :path")
    if path[:1] != b"/":
        raise Refused(400, "request target must be a path (origin-form)")
    if len(hosts) > 1:
        raise Refused(400, "more than one Host header")
    if authority is None:
        if not hosts:
            raise Refused(400, "a request needs :authority or Host")
        authority = hosts[0]
    elif hosts and hosts[0].lower() != authority.lower():
        raise Refused(400, ":authority and Host disagree")
    if not authority or _INVALID_AUTHORITY.search(authority):
        raise Malformed("invalid :authority")
    if end_stream and content_length:
        raise Malformed("content-length announces a body the request does not have")
    if cookies:
        regular.append((b"cookie", b"; ".join(cookies)))  # §8.2.3: one field for HTTP/1.1
    return StreamRequest(stream_id, method, path, authority, scheme, tuple(regular), end_stream, content_length)


def parse_trailers(fields: list[tuple[bytes, bytes]]) -> Headers:
    for name, value in fields:
        if name[:1] == b":":
            raise Malformed("pseudo-header in trailers")
        _check_field(name, value)
    return tuple(fields)


def as_http1_head(request: StreamRequest) -> RequestHead:
    """The request as an HTTP/1.1 upstream needs it (for `http1.upstream_request_head`).

    Host comes from :authority; `te` (only ever "trailers" here) is dropped: the hop to the backend
    is HTTP/1.1 and we do not relay trailers upstream. A body of unknown length goes chunked.
    """
    headers = ((b"host", request.authority),) + tuple(field for field in request.headers if field[0] != b"te")
    return RequestHead(
        method=request.method,
        target=request.target,
        version="1.1",
        headers=headers,
        host=request.authority,
        keep_alive=True,
        upgrade=False,
        chunked=not request.end_stream and request.content_length is None,
        content_length=request.content_length,
    )


def _response_fields(headers: Headers) -> list[tuple[bytes, bytes]]:
    """Lower-case names; connection-specific headers cannot exist in HTTP/2 and are dropped."""
    fields = []
    for name, value in headers:
        lower = name.lower()
        if lower not in CONNECTION_SPECIFIC and lower != b"te":
            fields.append((lower, value))
    return fields


# -- the connection -------------------------------------------------------------------------------


class _Stream:
    __slots__ = (
        "refused", "request_ended", "content_length", "received", "unconsumed",
        "trailers_in", "head_sent", "pending", "pending_bytes", "end_queued", "trailers_out", "ended_out",
    )

    def __init__(self, refused: bool, request_ended: bool, content_length: int | None) -> None:
        self.refused = refused  # answered by a refusal: its body is discarded
        self.request_ended = request_ended
        self.content_length = content_length
        self.received = 0  # request body bytes (no padding)
        self.unconsumed = 0  # handed to the exchange, not yet consumed()
        self.trailers_in: Headers = ()
        self.head_sent = False  # the final (non-1xx) response head
        self.pending: deque[memoryview] = deque()  # response bytes waiting for the peer's window
        self.pending_bytes = 0
        self.end_queued = False  # the exchange has ended the response (data or trailers)
        self.trailers_out: list[tuple[bytes, bytes]] | None = None
        self.ended_out = False  # our END_STREAM went out


class Http2Server:
    def __init__(self, limits: Http2Limits = Http2Limits()) -> None:
        self.limits = limits
        self.closed = False  # a GOAWAY for an error went out or came in: write outgoing() and close
        self.draining = False  # our graceful GOAWAY went out
        self.pending_total = 0
        self._h2 = H2Connection(
            H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_inbound_headers=False,
                normalize_inbound_headers=False,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                split_outbound_cookies=False,
            )
        )
        self._streams: dict[int, _Stream] = {}
        self._out: list[bytes] = []  # our own frames, in order with h2's (see _queue_raw)
        self._inbound = b""  # an incomplete frame
        self._preface_left = _PREFACE_BYTES
        self._block_bytes = 0  # of the header block being received (HEADERS + CONTINUATIONs)
        self._reset_debt = 0  # resets (theirs, or ours for their fault) less the streams finished since
        self._replies_unsent = 0  # SETTINGS/PING ACKs queued since the last outgoing()
        self._last_stream_id = 0  # highest stream processed (what a GOAWAY announces)
        self._ready: dict[int, None] = {}  # streams with response data or an end to frame, in order
        self._window_opened = False

    # -- set-up and output ------------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue our preface SETTINGS (and the connection window beyond the RFC's 65,535)."""
        limits, h2 = self.limits, self._h2
        advertised = {
            SettingCodes.HEADER_TABLE_SIZE: limits.header_table_bytes,
            SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            SettingCodes.MAX_FRAME_SIZE: limits.max_frame_bytes,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_bytes,
        }
        h2.local_settings = Settings(client=False, initial_values=advertised)
        h2.initiate_connection()
        # What h2 enforces: one stream more than advertised (see the module comment), the rest as
        # advertised, applied now rather than at the peer's ACK: none of them is below the RFC default
        # a peer may assume before it has read our SETTINGS (except streams, which we refuse ourselves).
        enforced = dict(advertised)
        enforced[SettingCodes.MAX_CONCURRENT_STREAMS] = limits.max_concurrent_streams + 1
        h2.local_settings = Settings(client=False, initial_values=enforced)
        h2.max_inbound_frame_size = limits.max_frame_bytes
        h2.decoder.max_header_list_size = limits.header_block_bytes
        h2.decoder.max_allowed_table_size = limits.header_table_bytes
        if limits.connection_window > 65535:
            h2.increment_flow_control_window(limits.connection_window - 65535)

    def outgoing(self) -> bytes:
        """Everything queued, in order, for one write. Call it only while the transport accepts
        writes: response data is framed here, as far as the peer's windows allow, so what a slow
        reader has not taken stays in `pending()` where the shell's watermark sees it."""
        self._replies_unsent = 0
        if self._ready:
            ready = list(self._ready)
            self._ready.clear()
            streams = self._streams
            for sid in ready:
                stream = streams.get(sid)
                if stream is not None:
                    self._flush(sid, stream)
        if self._out:
            self._out.append(self._h2.data_to_send())
            data = b"".join(self._out)
            self._out.clear()
            return data
        return self._h2.data_to_send()

    def _queue_raw(self, frame: bytes) -> None:
        self._out.append(self._h2.data_to_send())
        self._out.append(frame)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def pending(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        return stream.pending_bytes if stream is not None else 0

    def stalled(self) -> list[int]:
        """Streams with queued response data and no window to send it in."""
        window = self._h2.local_flow_control_window
        return [sid for sid, stream in self._streams.items() if stream.pending and window(sid) <= 0]

    # -- input ------------------------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        """Take decrypted bytes from the client; return the events they complete."""
        events: list[Event] = []
        if self.closed:
            return events
        self._window_opened = False
        if self._inbound:
            data = self._inbound + data
            self._inbound = b""
        pos = 0
        h2 = self._h2
        try:
            if self._preface_left:
                pos = min(self._preface_left, len(data))
                h2.receive_data(data[:pos])
                self._preface_left -= pos
            end_of_data = len(data)
            max_frame = self.limits.max_frame_bytes
            while end_of_data - pos >= 9:
                length = int.from_bytes(data[pos : pos + 3], "big")
                if length > max_frame:
                    self._fail(ErrorCodes.FRAME_SIZE_ERROR, f"a {length}-byte frame exceeds {max_frame}", events)
                    return events
                end = pos + 9 + length
                if end > end_of_data:
                    break
                if not self._screen(data, pos, length, events):
                    return events
                self._translate(h2.receive_data(data[pos:end]), events)
                pos = end
                if self.closed:
                    return events
        except ProtocolError as error:
            # h2 has queued its GOAWAY with the error's code.
            self._end(int(error.error_code), str(error) or type(error).__name__, events)
            return events
        self._inbound = data[pos:]
        if self._window_opened:
            events.append(WINDOW_OPENED)
        return events

    def _screen(self, data: bytes, pos: int, length: int, events: list[Event]) -> bool:
        """Checks on a whole frame before h2 parses it; False when the connection ended."""
        kind, flags = data[pos + 3], data[pos + 4]
        limits = self.limits
        if kind == _HEADERS or kind == _CONTINUATION:
            self._block_bytes = length if kind == _HEADERS else self._block_bytes + length
            if self._block_bytes > limits.header_block_bytes:
                self._fail(ErrorCodes.ENHANCE_YOUR_CALM, "header block too large (CONTINUATION flood)", events)
                return False
        elif kind == _DATA:
            sid = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            stream = self._streams.get(sid)
            if stream is not None and stream.content_length is not None:
                body = length - (data[pos + 9] + 1 if flags & _PADDED and length else 0)
                total = stream.received + body
                if total > stream.content_length or (flags & _END_STREAM and total != stream.content_length):
                    self._reset_broken(sid, events)  # h2 then credits the frame to the connection window
                    return not self.closed
        elif kind == _RST_STREAM:
            self._count_reset("too many stream resets (rapid reset)", events)
            return not self.closed
        elif (kind == _SETTINGS or kind == _PING) and not flags & _ACK:
            self._replies_unsent += 1
            if self._replies_unsent > limits.control_reply_cap:
                self._fail(ErrorCodes.ENHANCE_YOUR_CALM, "too many SETTINGS/PING frames unread", events)
                return False
        return True

    def _translate(self, received: list[h2_events.Event], events: list[Event]) -> None:
        for event in received:
            if self.closed:
                return
            if isinstance(event, h2_events.RequestReceived):
                self._request(event, events)
            elif isinstance(event, h2_events.DataReceived):
                self._data(event, events)
            elif isinstance(event, h2_events.StreamEnded):
                self._request_ended(event.stream_id, events)
            elif isinstance(event, h2_events.TrailersReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    try:
                        stream.trailers_in = parse_trailers(event.headers)
                    except Malformed:
                        self._reset_broken(event.stream_id, events)
            elif isinstance(event, h2_events.StreamReset):
                if self._close_stream(event.stream_id):
                    events.append(StreamReset(event.stream_id, int(event.error_code)))
            elif isinstance(event, h2_events.WindowUpdated):
                self._windows_opened(event.stream_id)
            elif isinstance(event, h2_events.RemoteSettingsChanged):
                if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                    self._windows_opened(0)
            elif isinstance(event, h2_events.ConnectionTerminated):
                reason = (event.additional_data or b"").decode("latin-1") or "peer sent GOAWAY"
                self._end(int(event.error_code or 0), reason, events)
                return

    def _request(self, event: h2_events.RequestReceived, events: list[Event]) -> None:
        sid, h2 = event.stream_id, self._h2
        end_stream = event.stream_ended is not None
        if self.draining:
            h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)  # after our GOAWAY: the client may retry elsewhere
            return
        if len(self._streams) >= self.limits.max_concurrent_streams:  # h2's own count walks every stream
            h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            self._count_reset("too many streams over the concurrency limit", events)
            return
        self._last_stream_id = sid
        try:
            request = parse_request(sid, event.headers, end_stream, self.limits)
        except Malformed:
            h2.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            self._count_reset("too many malformed requests", events)
            return
        except Refused as refusal:
            self._streams[sid] = _Stream(True, end_stream, None)
            events.append(StreamRefused(sid, refusal.status, refusal.reason))
            return
        self._streams[sid] = _Stream(False, end_stream, request.content_length)
        events.append(request)

    def _data(self, event: h2_events.DataReceived, events: list[Event]) -> None:
        sid, size = event.stream_id, len(event.data)
        stream = self._streams.get(sid)
        credit = event.flow_controlled_length - size  # padding is never forwarded
        if stream is None or stream.refused:
            credit += size
        else:
            stream.received += size
            stream.unconsumed += size
            if size:
                events.append(StreamData(sid, event.data))
        if credit:
            self._h2.acknowledge_received_data(credit, sid)

    def _request_ended(self, sid: int, events: list[Event]) -> None:
        stream = self._streams.get(sid)
        if stream is None or stream.request_ended:
            return  # reset meanwhile, or a request head with END_STREAM (reported in StreamRequest)
        stream.request_ended = True
        if stream.refused:
            self._maybe_finish(sid, stream)
            return
        if stream.content_length is not None and stream.received != stream.content_length:
            self._reset_broken(sid, events)  # trailers ended a body shorter than announced
            return
        events.append(StreamEnd(sid, stream.trailers_in))
        self._maybe_finish(sid, stream)

    # -- stream bookkeeping -----------------------------------------------------------------------

    def _reset_broken(self, sid: int, events: list[Event]) -> None:
        """The client broke the protocol on this stream: RST PROTOCOL_ERROR, the exchange stops."""
        if self._close_stream(sid):
            self._h2.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            events.append(StreamReset(sid, int(ErrorCodes.PROTOCOL_ERROR)))
            self._count_reset("too many broken streams", events)

    def _count_reset(self, reason: str, events: list[Event]) -> None:
        """A stream ended by a client reset or by our reset for its fault: past the budget, GOAWAY."""
        self._reset_debt += 1
        if self._reset_debt > self.limits.reset_cap:
            self._fail(ErrorCodes.ENHANCE_YOUR_CALM, reason, events)

    def _close_stream(self, sid: int) -> bool:
        """Forget a stream that ends abnormally: drop its queue, credit what was never consumed."""
        stream = self._streams.pop(sid, None)
        if stream is None:
            return False
        self.pending_total -= stream.pending_bytes
        if stream.unconsumed:
            self._h2.acknowledge_received_data(stream.unconsumed, sid)
        return True

    def _maybe_finish(self, sid: int, stream: _Stream) -> None:
        if stream.ended_out and stream.request_ended:
            del self._streams[sid]
            if self._reset_debt:
                self._reset_debt -= 1
            if stream.unconsumed:
                self._h2.acknowledge_received_data(stream.unconsumed, sid)

    def _ended_out(self, sid: int, stream: _Stream) -> None:
        stream.ended_out = True
        if not stream.request_ended:
            # Response complete before the request (§8.1): stop the body, the stream is done.
            self._h2.reset_stream(sid, ErrorCodes.NO_ERROR)
            stream.request_ended = True
        self._maybe_finish(sid, stream)

    # -- send side --------------------------------------------------------------------------------

    def send_head(self, stream_id: int, status: int, headers: Headers, end_stream: bool = False) -> None:
        """Response head (1xx allowed before the final one). Names are lower-cased here."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if stream.head_sent:
            raise RuntimeError(f"stream {stream_id}: a second response head")
        if status >= 200:
            stream.head_sent = True
        elif end_stream:
            raise RuntimeError(f"stream {stream_id}: an interim response cannot end the stream")
        fields = [(b":status", b"%d" % status)]
        fields += _response_fields(headers)
        self._h2.send_headers(stream_id, fields, end_stream=end_stream)
        if end_stream:
            stream.end_queued = True
            self._ended_out(stream_id, stream)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Queue response data; outgoing() frames what the peer's windows allow (see pending())."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self._check_body_allowed(stream_id, stream)
        if data:
            stream.pending.append(memoryview(data))
            stream.pending_bytes += len(data)
            self.pending_total += len(data)
        stream.end_queued = end_stream
        self._ready[stream_id] = None

    def send_trailers(self, stream_id: int, headers: Headers) -> None:
        """Trailers end the response; they go out after the data still queued."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self._check_body_allowed(stream_id, stream)
        stream.trailers_out = _response_fields(headers)
        stream.end_queued = True
        self._ready[stream_id] = None

    @staticmethod
    def _check_body_allowed(stream_id: int, stream: _Stream) -> None:
        """The exchange's order of calls is a contract: breaking it is our bug, not the peer's."""
        if not stream.head_sent:
            raise RuntimeError(f"stream {stream_id}: response body or trailers before the head")
        if stream.end_queued:
            raise RuntimeError(f"stream {stream_id}: response already ended")

    def reset(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        """End a stream now (backend failed mid-response, a deadline passed): RST_STREAM."""
        if self._close_stream(stream_id):
            self._h2.reset_stream(stream_id, error_code)

    def consumed(self, stream_id: int, size: int) -> None:
        """The exchange forwarded `size` request-body bytes: only now reopen the windows."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return  # closed: what it never consumed was credited then
        size = min(size, stream.unconsumed)
        if size:
            stream.unconsumed -= size
            self._h2.acknowledge_received_data(size, stream_id)

    def goaway(self, error_code: int = ErrorCodes.NO_ERROR) -> None:
        """NO_ERROR: graceful drain (streams in flight finish). Anything else ends the connection."""
        if self.closed:
            return
        if error_code != ErrorCodes.NO_ERROR:
            self._h2.close_connection(error_code, last_stream_id=self._last_stream_id)
            self.closed = True
            return
        if not self.draining:
            frame = GoAwayFrame(0)
            frame.last_stream_id = self._last_stream_id
            frame.error_code = ErrorCodes.NO_ERROR
            self._queue_raw(frame.serialize())
            self.draining = True

    def _windows_opened(self, sid: int) -> None:
        """A WINDOW_UPDATE (or a larger initial window) for one stream, or for all (0)."""
        if sid:
            stream = self._streams.get(sid)
            candidates = [(sid, stream)] if stream is not None else []
        else:
            candidates = list(self._streams.items())
        for sid, stream in candidates:
            if stream.pending:
                self._ready[sid] = None
                self._window_opened = True

    def _flush(self, sid: int, stream: _Stream) -> None:
        h2 = self._h2
        pending = stream.pending
        before = stream.pending_bytes
        while pending:
            window = min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size)
            if window <= 0:
                break
            chunk = pending[0]
            if len(chunk) > window:
                piece, pending[0] = chunk[:window], chunk[window:]
            else:
                piece = pending.popleft()
            last = not pending and stream.end_queued and stream.trailers_out is None
            h2.send_data(sid, piece, end_stream=last)
            stream.pending_bytes -= len(piece)
        moved = before - stream.pending_bytes
        self.pending_total -= moved
        if pending or not stream.end_queued or stream.ended_out:
            return
        if stream.trailers_out is not None:
            h2.send_headers(sid, stream.trailers_out, end_stream=True)
        elif not moved:
            h2.end_stream(sid)  # the end came with no data of its own
        self._ended_out(sid, stream)

    # -- connection end ---------------------------------------------------------------------------

    def _fail(self, code: ErrorCodes, reason: str, events: list[Event]) -> None:
        """A defence tripped: GOAWAY with `code`, nothing more is read."""
        self._h2.close_connection(code, last_stream_id=self._last_stream_id)
        self._end(int(code), reason, events)

    def _end(self, code: int, reason: str, events: list[Event]) -> None:
        self.closed = True
        self._streams.clear()
        self.pending_total = 0
        self._inbound = b""
        events.append(ConnectionEnded(code, reason))
