"""HTTP/2 to backends (h2c over TCP, h2 over TLS): pooled connections carrying many streams, and gRPC.

Theory of operation
-------------------
An `Http2Upstream` is one connection to one endpoint, client side of the `h2` state machine
(sans-IO, the library the server core uses), optionally under a `ClientTls` (ALPN must say h2,
else the connection is refused: a backend that cannot speak h2 never gets HTTP/1.1 bytes it did
not agree to). Each request is one `UpstreamStream`: the exchange sends its head, body pieces
(within the backend's flow-control windows: `send_data` waits for WINDOW_UPDATE) and end or
trailers, and reads events (`ResponseStarted`, `Body`, `ResponseTrailers`, `EndOfMessage`,
`StreamReset`). Received DATA is acknowledged (`consumed`) only once the exchange has passed it to
the client, so a slow client slows the backend through HTTP/2's own windows and memory per stream
stays bounded by the window we advertise.

`Http2Pool` holds the connections of one (endpoint, transport): a request takes the first
connection with a free stream under the backend's SETTINGS_MAX_CONCURRENT_STREAMS, else opens one
more (one opening at a time; requests arriving meanwhile wait for it rather than each opening
its own). A connection takes streams only once the backend's first SETTINGS frame arrived (before, its stream
limit is unknown). A connection that received GOAWAY takes no new streams; streams above its last
id are refused (REFUSED_STREAM: never processed, so retried whatever the method, RFC 9113 §8.7). A connection without streams for
`IDLE_SECONDS` is closed.

The request head is re-derived from the parse as for HTTP/1.1 (`request_fields`): pseudo-headers
from the parsed method, target and Host; no hop-by-hop or Connection-named field, no client
X-Forwarded-* but ours; `te: trailers` (which gRPC requires) is the only `te` ever sent.

gRPC (pure helpers below, table-tested): a request is gRPC when its content-type is
application/grpc[+proto|;...] (gRPC-Web is not: it is HTTP/1.1-compatible by design);
`grpc-timeout` bounds the whole exchange; errors the proxy makes on a gRPC request are HTTP 200
with `grpc-status` (Envoy's mapping: 503/502 → UNAVAILABLE, 504 → DEADLINE_EXCEEDED, 404 →
UNIMPLEMENTED, ...), since gRPC clients read the status from there, not from :status.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

from config.model import Address
from proxy.decisions import FailureKind
from proxy.flow import ConnectionGone
from proxy.http1 import END_OF_MESSAGE, HOP_BY_HOP, Body, EndOfMessage, Headers, PeerError, RequestHead, ResponseHead
from proxy.http1 import CLIENT_CERTIFICATE_HEADERS, connection_tokens
from proxy.upstream_tls import ClientTls, TlsState, UpstreamTlsFailure, UpstreamTransport

IDLE_SECONDS = 30.0  # as proxy.upstream: below common backend idle timeouts
STREAM_WINDOW = 256 * 1024  # what one response stream may have in flight before the client reads it
CONNECTION_WINDOW = 4 * 1024 * 1024  # all streams of one backend connection together
MAX_CONNECTIONS_PER_ENDPOINT = 64  # a backend allowing 1 stream each still gets 64 requests at once

_FORWARDED_BY_US = frozenset(
    (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"x-real-ip")
) | CLIENT_CERTIFICATE_HEADERS
_NOT_COPIED = HOP_BY_HOP | _FORWARDED_BY_US | {b"host", b"content-length", b"expect", b"http2-settings"}


# -- gRPC, pure -----------------------------------------------------------------------------------

GRPC_OK, GRPC_UNKNOWN, GRPC_DEADLINE_EXCEEDED, GRPC_UNIMPLEMENTED, GRPC_INTERNAL, GRPC_UNAVAILABLE = 0, 2, 4, 12, 13, 14
_GRPC_STATUS_FOR_HTTP = {
    400: GRPC_INTERNAL,
    401: 16,  # UNAUTHENTICATED
    403: 7,  # PERMISSION_DENIED
    404: GRPC_UNIMPLEMENTED,
    429: GRPC_UNAVAILABLE,
    502: GRPC_UNAVAILABLE,
    503: GRPC_UNAVAILABLE,
    504: GRPC_DEADLINE_EXCEEDED,
}
_GRPC_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])")  # gRPC over HTTP/2 spec: TimeoutValue TimeoutUnit
_GRPC_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def is_grpc(headers: Headers) -> bool:
    for name, value in headers:
        if name.lower() == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/grpc" or media.startswith(b"application/grpc+")
    return False


def grpc_timeout(headers: Headers) -> float | None:
    """The request's `grpc-timeout` in seconds; None when absent or malformed (then ignored)."""
    for name, value in headers:
        if name.lower() == b"grpc-timeout":
            match = _GRPC_TIMEOUT.fullmatch(value.strip())
            return int(match.group(1)) * _GRPC_TIMEOUT_UNITS[match.group(2)] if match else None
    return None


def grpc_status_for(http_status: int) -> int:
    return _GRPC_STATUS_FOR_HTTP.get(http_status, GRPC_UNKNOWN)


def grpc_error_head(grpc_status: int, message: str) -> ResponseHead:
    """A "trailers-only" gRPC response: HTTP 200, the status in the (only) header block."""
    headers = (
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % grpc_status),
        (b"grpc-message", message.encode("ascii", "replace")),
    )
    return ResponseHead(200, b"OK", "2", headers, True, False, None, False)


# -- heads, re-derived ------------------------------------------------------------------------------


def request_fields(
    head: RequestHead,
    scheme: bytes,
    client_ip: bytes,
    proto: bytes,
    local_address: bytes,
    extra: Headers = (),
    host_header: bytes = b"",
    real_ip: bytes = b"",
    forwarded_for: bytes = b"",
) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 request header block for a backend, re-derived from the parse (see the theory).

    The parameters mean what they mean to `proxy.http1.upstream_request_head`: `extra`, fields a
    route policy adds (names as written: lower-cased here, as HTTP/2 requires), after ours;
    `host_header` replaces :authority (upstream-vhost; x-forwarded-host keeps the client's);
    `real_ip` (a trusted X-Forwarded-For's client) is sent instead of `client_ip`, and
    `forwarded_for`, when given, as x-forwarded-for (compute-full-forwarded-for)."""
    named = connection_tokens(head.headers)
    authority = head.host or local_address
    fields = [(b":method", head.method), (b":scheme", scheme), (b":authority", host_header or authority), (b":path", head.target)]
    te_trailers = False
    for name, value in head.headers:
        lower = name.lower()
        if lower in _NOT_COPIED or lower in named or lower[:1] == b":":
            if lower == b"te" and b"trailers" in value.lower():
                te_trailers = True
            continue
        fields.append((lower, value))
    if te_trailers or is_grpc(head.headers):
        fields.append((b"te", b"trailers"))
    if head.content_length is not None and not head.chunked:
        fields.append((b"content-length", b"%d" % head.content_length))
    port = local_address.rpartition(b":")[2]
    fields += [
        (b"x-forwarded-for", forwarded_for or real_ip or client_ip),
        (b"x-real-ip", real_ip or client_ip),
        (b"x-forwarded-proto", proto),
        (b"x-forwarded-host", authority),
        (b"x-forwarded-port", port),
        *head.vouched,
    ]
    for name, value in extra:
        fields.append((name.lower(), value))
    return fields


def response_head(fields: list[tuple[bytes, bytes]], method: bytes) -> ResponseHead:
    """A backend's HTTP/2 response header block as the exchange's ResponseHead (PeerError if bad)."""
    status = None
    headers = []
    content_length = None
    for name, value in fields:
        if name == b":status":
            status = value
        elif name[:1] == b":":
            raise PeerError(502, "backend sent a request pseudo-header in a response")
        elif name == b"content-length":
            if not value.isdigit() or (content_length is not None and int(value) != content_length):
                raise PeerError(502, "backend sent a bad content-length")
            content_length = int(value)
        else:
            headers.append((name, value))
    if status is None or not status.isdigit() or len(status) != 3:
        raise PeerError(502, "backend sent no valid :status")
    code = int(status)
    has_body = method != b"HEAD" and code not in (204, 304) and code >= 200
    return ResponseHead(code, _reason(code), "2", tuple(headers), True, False, content_length, has_body)


def _reason(code: int) -> bytes:
    """HTTP/2 has no reason phrase; an HTTP/1.1 client gets the standard one."""
    try:
        return HTTPStatus(code).phrase.encode("ascii")
    except ValueError:
        return b""


# -- events of one stream ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseStarted:
    fields: list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class ResponseTrailers:
    fields: Headers


@dataclass(frozen=True, slots=True)
class StreamReset:
    error_code: int


class UpstreamStream:
    """One request on an `Http2Upstream`: what the exchange sends and reads."""

    __slots__ = ("connection", "stream_id", "events", "finished", "_waiter", "_window_waiter")

    def __init__(self, connection: Http2Upstream, stream_id: int) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.events: deque[ResponseStarted | Body | ResponseTrailers | EndOfMessage | StreamReset | ConnectionGone] = deque()
        self.finished = False  # ended or reset, both ways as far as we are concerned
        self._waiter: asyncio.Future[None] | None = None
        self._window_waiter: asyncio.Future[None] | None = None

    # -- fed by the connection --------------------------------------------------------------------

    def push(self, event: Any) -> None:
        self.events.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def window_opened(self) -> None:
        if self._window_waiter is not None and not self._window_waiter.done():
            self._window_waiter.set_result(None)

    # -- used by the exchange ---------------------------------------------------------------------

    async def next_event(self, timeout: float) -> ResponseStarted | Body | ResponseTrailers | EndOfMessage | StreamReset:
        """The next event; TimeoutError after `timeout` s without one; ConnectionGone if the connection died."""
        while not self.events:
            self._waiter = self.connection.loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            finally:
                self._waiter = None
        event = self.events.popleft()
        if isinstance(event, ConnectionGone):
            self.finished = True
            raise event
        if type(event) in (EndOfMessage, StreamReset):
            self.finished = True
        return event

    def send_head(self, fields: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        self.connection.h2.send_headers(self.stream_id, fields, end_stream=end_stream)
        self.connection.flush()

    async def send_data(self, data: bytes, timeout: float) -> None:
        """Send request body bytes within the backend's windows; TimeoutError if it never opens them."""
        connection = self.connection
        view = memoryview(data)
        while view:
            if connection.closed:
                raise ConnectionGone()
            window = min(connection.h2.local_flow_control_window(self.stream_id), connection.h2.max_outbound_frame_size)
            if window <= 0:
                self._window_waiter = connection.loop.create_future()
                try:
                    async with asyncio.timeout(timeout):
                        await self._window_waiter
                finally:
                    self._window_waiter = None
                continue
            connection.h2.send_data(self.stream_id, view[:window].tobytes())
            view = view[window:]
            connection.flush()

    def end_request(self, trailers: Headers = ()) -> None:
        h2_connection = self.connection.h2
        if trailers:
            h2_connection.send_headers(self.stream_id, [(name.lower(), value) for name, value in trailers], end_stream=True)
        else:
            h2_connection.end_stream(self.stream_id)
        self.connection.flush()

    def consumed(self, size: int) -> None:
        """`size` response bytes reached the client: reopen the backend's windows by as much."""
        connection = self.connection
        if size and not connection.closed and not self.finished:
            try:
                connection.h2.acknowledge_received_data(size, self.stream_id)
            except h2.exceptions.StreamClosedError:
                return
            connection.flush()

    def cancel(self, error_code: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM to the backend (the client went away, a deadline passed)."""
        if not self.finished and not self.connection.closed:
            self.finished = True
            try:
                self.connection.h2.reset_stream(self.stream_id, error_code)
            except h2.exceptions.StreamClosedError:
                pass
            self.connection.flush()

    def release(self) -> None:
        """The exchange is done with this stream (whatever its state)."""
        self.cancel()
        self.connection.stream_done(self)


# -- one connection ---------------------------------------------------------------------------------


class Http2Upstream(asyncio.Protocol):
    def __init__(self, address: Address, transport: UpstreamTransport | None, pool: Http2Pool) -> None:
        self.loop = asyncio.get_running_loop()
        self.address = address
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.tls: ClientTls | None = transport.client(address) if transport is not None else None
        # Outbound checks off: `request_fields` builds lower-case names from values our parsers
        # already validated, and h2's checks cost about a third of sending a head. Inbound stay on.
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_inbound_headers=True,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config)
        self.streams: dict[int, UpstreamStream] = {}
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self.closed = False
        self.goaway = False
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- capacity ---------------------------------------------------------------------------------

    @property
    def has_capacity(self) -> bool:
        """Room for one more stream. Counted in `streams` (held until the exchange releases them, so
        never fewer than h2's open ones): h2's own `open_outbound_streams` walks every stream."""
        return (
            not self.closed
            and not self.goaway
            and self.ready.done()
            and len(self.streams) < self.h2.remote_settings.max_concurrent_streams
        )

    def open_stream(self) -> UpstreamStream:
        stream_id = self.h2.get_next_available_stream_id()
        stream = self.streams[stream_id] = UpstreamStream(self, stream_id)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        return stream

    def stream_done(self, stream: UpstreamStream) -> None:
        if self.streams.pop(stream.stream_id, None) is None:
            return
        if not self.streams and not self.closed:
            if self.goaway:
                self.close()
            else:
                self._idle_timer = self.loop.call_later(IDLE_SECONDS, self.close)
        self.pool.capacity_freed()

    # -- protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports don't subclass asyncio's
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.h2.initiate_connection()
        # Sent as a SETTINGS frame of its own: h2's preface carries the acknowledged values only, so
        # setting them before initiate_connection would make our windows and the backend's differ.
        self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW, h2.settings.SettingCodes.ENABLE_PUSH: 0})
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        if self.tls is None:
            self.flush()  # ready once the backend's SETTINGS arrive (see _dispatch)
            return
        try:
            self.tls.start()
        except UpstreamTlsFailure as failure:
            self._fail_handshake(failure)
            return
        self._write(self.tls.outgoing())

    def _fail_handshake(self, failure: UpstreamTlsFailure) -> None:
        if not self.ready.done():
            self.ready.set_exception(failure)
            self.ready.exception()  # retrieved: the opener may have given up waiting already
        if self.tls is not None:
            self._write(self.tls.outgoing())
        self.close()

    def data_received(self, data: bytes) -> None:
        tls = self.tls
        if tls is not None:
            handshaking = tls.state is TlsState.HANDSHAKING
            try:
                data = tls.receive(data)
            except UpstreamTlsFailure as failure:
                if handshaking:
                    self._fail_handshake(failure)
                else:
                    self.close()
                return
            self._write(tls.outgoing())
            if handshaking and tls.state is TlsState.OPEN:
                if tls.connection.get_alpn_proto_negotiated() != b"h2":
                    self._fail_handshake(UpstreamTlsFailure(FailureKind.TLS_HANDSHAKE_FAILED, "the backend did not agree to h2 (ALPN)"))
                    return
                self.flush()  # the connection preface, held until the handshake finished
            if not data:
                return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            self.close()
            return
        for event in events:
            self._dispatch(event)
        self.flush()

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            self._push(event.stream_id, ResponseStarted(event.headers))  # type: ignore[arg-type]
        elif isinstance(event, h2.events.DataReceived):
            self._push(event.stream_id, Body(event.data))  # type: ignore[arg-type]
            padding = event.flow_controlled_length - len(event.data)  # type: ignore[operator,arg-type]
            if padding and event.stream_id is not None:
                self.h2.acknowledge_received_data(padding, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            self._push(event.stream_id, ResponseTrailers(tuple(event.headers)))  # type: ignore[arg-type]
        elif isinstance(event, h2.events.StreamEnded):
            self._push(event.stream_id, END_OF_MESSAGE)
        elif isinstance(event, h2.events.StreamReset):
            self._push(event.stream_id, StreamReset(int(event.error_code or 0)))
        elif isinstance(event, h2.events.WindowUpdated):
            targets = self.streams.values() if not event.stream_id else [self.streams.get(event.stream_id)]
            for stream in targets:
                if stream is not None:
                    stream.window_opened()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if not self.ready.done():
                # Ready only now: until the backend's SETTINGS arrive its MAX_CONCURRENT_STREAMS is
                # unknown (h2 assumes unlimited), and streams over the limit would be refused.
                self.ready.set_result(None)
            for stream in self.streams.values():
                stream.window_opened()  # INITIAL_WINDOW_SIZE may have grown
            self.pool.capacity_freed()  # MAX_CONCURRENT_STREAMS may have grown
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = True
            last = event.last_stream_id if event.last_stream_id is not None else 0
            for stream_id, stream in list(self.streams.items()):
                if stream_id > last:
                    stream.push(StreamReset(ErrorCodes.REFUSED_STREAM))  # never processed: retry is safe

    def _push(self, stream_id: int | None, event: Any) -> None:
        stream = self.streams.get(stream_id) if stream_id is not None else None
        if stream is not None:
            stream.push(event)

    def flush(self) -> None:
        if self.closed or (self.tls is not None and self.tls.state is not TlsState.OPEN):
            return  # before the handshake finished: h2 keeps it and it goes out on the next flush
        data = self.h2.data_to_send()
        if not data:
            return
        if self.tls is not None:
            self.tls.send(data)
            data = self.tls.outgoing()
        self._write(data)

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(
                UpstreamTlsFailure(FailureKind.TLS_HANDSHAKE_FAILED, "the backend closed the connection during the handshake")
                if self.tls is not None
                else ConnectionGone()
            )
            self.ready.exception()
        for stream in self.streams.values():
            stream.push(ConnectionGone())
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self.pool.discard(self)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            if self.tls is not None and self.tls.sendable:
                self.tls.close()
                self.transport.write(self.tls.outgoing())
            self.transport.close()


# -- the pool of one (endpoint, transport) ---------------------------------------------------------


class Http2Pool:
    def __init__(self, address: Address, transport: UpstreamTransport | None) -> None:
        self.address = address
        self.transport = transport
        self.connections: list[Http2Upstream] = []
        self._opening: asyncio.Future[None] | None = None  # set while a connection is being opened
        self._capacity_waiters: deque[asyncio.Future[None]] = deque()

    async def open_stream(self, connect_timeout: float, handshake_timeout: float) -> UpstreamStream:
        """A new stream on a connection with room; raises OSError/TimeoutError (TCP) or UpstreamTlsFailure."""
        while True:
            for connection in self.connections:
                if connection.has_capacity:
                    return connection.open_stream()
            if self._opening is not None or len(self.connections) >= MAX_CONNECTIONS_PER_ENDPOINT:
                waiter = asyncio.get_running_loop().create_future()
                self._capacity_waiters.append(waiter)
                async with asyncio.timeout(connect_timeout + handshake_timeout):
                    await waiter
                continue
            await self._open(connect_timeout, handshake_timeout)

    async def _open(self, connect_timeout: float, handshake_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._opening = loop.create_future()
        try:
            connection = Http2Upstream(self.address, self.transport, self)
            async with asyncio.timeout(connect_timeout):
                await loop.create_connection(lambda: connection, self.address.host, self.address.port)
            try:
                async with asyncio.timeout(handshake_timeout):
                    await connection.ready
            except TimeoutError:
                connection.close()
                raise UpstreamTlsFailure(FailureKind.TLS_HANDSHAKE_TIMEOUT, f"no handshake within {handshake_timeout} s") from None
            self.connections.append(connection)
        finally:
            self._opening.set_result(None)
            self._opening = None
            self.capacity_freed()

    def capacity_freed(self) -> None:
        while self._capacity_waiters:
            waiter = self._capacity_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def discard(self, connection: Http2Upstream) -> None:
        if connection in self.connections:
            self.connections.remove(connection)
        self.capacity_freed()

    def close_all(self) -> None:
        for connection in list(self.connections):
            connection.close()
        self.connections.clear()
