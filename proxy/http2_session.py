"""HTTP/2 on one client connection: the sans-IO core's events → one `exchange` per stream.

Theory of operation
-------------------
When ALPN picks `h2`, the TLS shell (`downstream.ClientConnection`) hands every decrypted byte
to `Http2Session.receive`, which feeds the core (`proxy.http2.Http2Server`) and dispatches its
events: a `StreamRequest` starts an exchange task with an `Http2Stream` as its `ClientSide`; body
pieces and the end go to that stream's queue; a reset cancels its task (which closes the backend
connection it held). After every turn the session writes the core's `outgoing()` through TLS in
one write — and only while the transport accepts writes, so what a slow reader has not taken
stays queued in the core, where `pending()` counts it.

Memory per stream is bounded both ways by the same rules as HTTP/1.1: request bodies by the
windows the core grants (reopened by `consumed()` only for bytes the exchange forwarded), response
bodies by `PENDING_HIGH_WATER`: above it the stream's exchange stops reading its backend until
window updates (or a resumed transport) move the data, and a stream stalled for `idle` seconds
is reset with CANCEL. Requests go to HTTP/1.1 backends as HTTP/1.1 (`http2.as_http1_head`) and to
HTTP/2 backends as streams (`exchange._proxy_http2`, with the request's trailers); responses come
back as HTTP/2 with headers re-derived from our parse (`response_fields`), and with the backend's
trailers when it sent some (`send_trailers`: gRPC's status travels there).

Connection end: a protocol error or a defence in the core sends GOAWAY and closes; drain
(SIGTERM) sends a graceful GOAWAY and closes once the streams in flight have finished; a
connection without streams for `idle` seconds gets a GOAWAY and is closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes

from proxy.exchange import HttpDate, exchange
from proxy.flow import ConnectionGone
from proxy.http1 import (
    END_OF_MESSAGE,
    HOP_BY_HOP,
    Body,
    EndOfMessage,
    Headers,
    PeerError,
    RequestHead,
    ResponseHead,
    connection_tokens,
    simple_body,
)
from proxy.http2 import (
    ConnectionEnded,
    Http2Server,
    StreamData,
    StreamEnd,
    StreamRefused,
    StreamRequest,
    StreamReset,
    WindowOpened,
    as_http1_head,
)
from proxy.upstream import UpstreamConnection

if TYPE_CHECKING:
    from proxy.downstream import ClientConnection
    from proxy.serving import ServingState

LOG = logging.getLogger("ingress_proxy")

PENDING_HIGH_WATER = 64 * 1024  # response bytes queued per stream before we stop reading its backend
_RESPONSE_DERIVED = HOP_BY_HOP | {b"content-length", b"host"}


def response_fields(response: ResponseHead, date: bytes, extra: bytes) -> Headers:
    """The HTTP/2 response headers: end-to-end ones from the backend, our framing, Server and Date.

    As for HTTP/1.1 (`http1.client_response_head`) nothing that frames the message is copied from
    the backend: Content-Length comes from our parse, hop-by-hop and Connection-named headers go."""
    named = connection_tokens(response.headers)
    fields = [(name.lower(), value) for name, value in response.headers]
    fields = [(name, value) for name, value in fields if name not in _RESPONSE_DERIVED and name not in named]
    if response.content_length is not None and response.status != 204:
        fields.append((b"content-length", b"%d" % response.content_length))
    if not any(name == b"server" for name, _ in fields):
        fields.append((b"server", b"ingress-proxy"))
    if not any(name == b"date" for name, _ in fields):
        fields.append((b"date", date))
    return (*fields, *extra_fields(extra))


def extra_fields(extra: bytes) -> Headers:
    """Pre-serialised header lines ("Name: value\\r\\n"...) as HTTP/2 fields."""
    fields = []
    for line in extra.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b":")
            fields.append((name.strip().lower(), value.strip()))
    return tuple(fields)


class Http2Session:
    def __init__(self, connection: ClientConnection, state: ServingState) -> None:
        self.connection = connection
        self.state = state
        self.core = Http2Server()
        self.streams: dict[int, Http2Stream] = {}
        self._idle_timer: asyncio.TimerHandle | None = None
        self._input_ended = False  # the client's close_notify came: close once the streams are done
        self.core.initiate()
        self._arm_idle_timer()

    # -- input ----------------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        for event in self.core.receive(data):
            kind = type(event)
            if kind is StreamData:
                stream = self.streams.get(event.stream_id)  # type: ignore[union-attr]
                if stream is not None:
                    stream.deliver(Body(event.data))  # type: ignore[union-attr]
            elif kind is StreamRequest:
                self._start(event)  # type: ignore[arg-type]
            elif kind is StreamEnd:
                stream = self.streams.get(event.stream_id)  # type: ignore[union-attr]
                if stream is not None:
                    stream.request_trailers = event.trailers  # type: ignore[union-attr]  # relayed to HTTP/2 backends
                    stream.deliver(END_OF_MESSAGE)
            elif kind is StreamReset:
                stream = self.streams.pop(event.stream_id, None)  # type: ignore[union-attr]
                if stream is not None:
                    stream.gone()
            elif kind is WindowOpened:
                for stream in self.streams.values():
                    stream.wake_writer()
                    if stream.upstream is not None:
                        stream.upstream.backlog_shrank()
            elif kind is StreamRefused:
                self._refuse(event)  # type: ignore[arg-type]
            elif kind is ConnectionEnded:
                LOG.debug("HTTP/2 connection from %s ended: %s", self.connection.client_ip.decode(), event.reason)  # type: ignore[union-attr]
                self.write()
                self.connection.close_transport()
                return
        self.write()

    def _start(self, request: StreamRequest) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        stream = Http2Stream(self, request)
        self.streams[request.stream_id] = stream
        stream.task = self.connection.loop.create_task(stream.run())

    def _refuse(self, refused: StreamRefused) -> None:
        body = simple_body(refused.status)
        headers = plain_text_fields(len(body))
        self.core.send_head(refused.stream_id, refused.status, headers)
        self.core.send_data(refused.stream_id, body, end_stream=True)

    # -- output ---------------------------------------------------------------------------------

    def write(self) -> None:
        """Send what the core has queued, unless the transport is full: then it stays counted there."""
        connection = self.connection
        if connection.closed or connection._writing_paused:
            return
        data = self.core.outgoing()
        if data:
            connection.write_plaintext(data)

    def writable_again(self) -> None:
        self.write()
        for stream in self.streams.values():
            stream.wake_writer()
            if stream.upstream is not None:
                stream.upstream.backlog_shrank()

    def stream_finished(self, stream: Http2Stream) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        self.write()
        if not self.streams:
            if (self.core.draining and self.core.open_streams == 0) or self._input_ended:
                self.connection.close_transport()
            else:
                self._arm_idle_timer()

    # -- lifecycle ------------------------------------------------------------------------------

    def _arm_idle_timer(self) -> None:
        idle = self.state.generation.configuration.timeouts.idle
        self._idle_timer = self.connection.loop.call_later(idle, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if not self.streams:
            self.drain()

    def drain(self) -> None:
        """Graceful GOAWAY: streams in flight finish, then the connection closes."""
        self.core.goaway(ErrorCodes.NO_ERROR)
        self.write()
        if not self.streams:
            self.connection.close_transport()

    def input_ended(self) -> None:
        """The client's close_notify: no more frames will come. Streams in flight finish (we may
        still send after the peer's close_notify), then the connection closes."""
        self._input_ended = True
        if not self.streams:
            self.connection.close_transport()

    def connection_lost(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        for stream in list(self.streams.values()):
            stream.gone()
        self.streams.clear()


class Http2Stream:
    """One request/response on an HTTP/2 connection: the `ClientSide` its exchange talks to."""

    protocol = "h2"

    def __init__(self, session: Http2Session, request: StreamRequest) -> None:
        self.session = session
        self.stream_id = request.stream_id
        self.request = request
        connection = session.connection
        self.listener = connection.listener
        self.client_ip = connection.client_ip
        self.client_verification = connection.client_verification
        self.upstream: UpstreamConnection | None = None
        self.request_trailers: Headers = ()
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self._body: deque[Body | EndOfMessage] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._head_sent_with_end = False

    async def run(self) -> None:
        head = as_http1_head(self.request)
        try:
            await exchange(self, self.session.state, head)
        except (PeerError, ConnectionGone, TimeoutError) as error:
            LOG.debug("HTTP/2 stream %d from %s ended: %r", self.stream_id, self.client_ip.decode(), error)
            self.session.core.reset(self.stream_id, ErrorCodes.CANCEL)
        except asyncio.CancelledError:
            pass  # the stream or the connection went away
        except Exception:  # a bug must cost one stream, never the connection or the process
            LOG.exception("HTTP/2 stream handler failed")
            self.session.core.reset(self.stream_id, ErrorCodes.INTERNAL_ERROR)
        finally:
            if self.upstream is not None:
                self.upstream.close()
            self._credit_unread_body()
            self.session.stream_finished(self)

    # -- fed by the session ---------------------------------------------------------------------

    def deliver(self, event: Body | EndOfMessage) -> None:
        self._body.append(event)
        self._wake()

    def gone(self) -> None:
        self.closed = True
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def wake_writer(self) -> None:
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, timeout: float) -> None:
        self._waiter = self.session.connection.loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._waiter
        finally:
            self._waiter = None

    def _credit_unread_body(self) -> None:
        unread = sum(len(event.data) for event in self._body if type(event) is Body)
        if unread:
            self.session.core.consumed(self.stream_id, unread)
        self._body.clear()

    # -- ClientSide ------------------------------------------------------------------------------

    async def next_body_event(self, timeout: float) -> Body | EndOfMessage:
        while not self._body:
            if self.closed:
                raise ConnectionGone()
            self.session.write()
            await self._wait(timeout)
        event = self._body.popleft()
        if type(event) is Body:
            self.session.core.consumed(self.stream_id, len(event.data))  # the exchange forwards it now
        return event

    def invite_body(self, head: RequestHead) -> None:
        """Nothing to do: HTTP/2 clients send bodies within the windows we grant."""

    def flush(self) -> None:
        self.session.write()

    def backlog(self) -> int:
        return self.session.core.pending(self.stream_id)

    @property
    def write_blocked(self) -> bool:
        return self.session.core.pending(self.stream_id) > PENDING_HIGH_WATER

    async def writable(self) -> None:
        """Wait for window updates (or a resumed transport) to move this stream's queue below the
        watermark; a stream stalled for `idle` seconds is reset (a reader that never reads)."""
        session = self.session
        idle = session.state.generation.configuration.timeouts.idle
        while self.write_blocked:
            if self.closed:
                raise ConnectionGone()
            try:
                await self._wait(idle)
            except TimeoutError:
                session.core.reset(self.stream_id, ErrorCodes.CANCEL)
                self.closed = True
                raise ConnectionGone() from None
            session.write()

    def answer_locally(self, head: RequestHead, status: int, extra: bytes, body: bytes = b"") -> bool:
        body = body or simple_body(status)
        core = self.session.core
        head_only = head.method == b"HEAD"  # its content-length describes the body not sent
        core.send_head(self.stream_id, status, (*plain_text_fields(len(body)), *extra_fields(extra)), head_only)
        if not head_only:
            core.send_data(self.stream_id, body, end_stream=True)
        self._head_sent_with_end = True
        return True

    def send_interim(self, head: RequestHead, response: ResponseHead) -> None:
        if response.status != 100:  # 100 Continue is HTTP/1.1's business; 103 Early Hints pass on
            self.session.core.send_head(self.stream_id, response.status, response_fields(response, HttpDate.now(), b""))

    def start_response(self, head: RequestHead, response: ResponseHead, extra: bytes) -> tuple[bool, bool]:
        end = not response.has_body
        self.session.core.send_head(self.stream_id, response.status, response_fields(response, HttpDate.now(), extra), end)
        self._head_sent_with_end = end
        return False, True

    def send_body(self, data: bytes) -> None:
        self.session.core.send_data(self.stream_id, data)

    async def body_sent(self) -> None:
        self.session.write()
        if self.write_blocked:
            await self.writable()

    def end_response(self) -> None:
        if not self._head_sent_with_end:
            self.session.core.send_data(self.stream_id, b"", end_stream=True)

    def send_trailers(self, trailers: Headers) -> None:
        self.session.core.send_trailers(self.stream_id, trailers)
        self._head_sent_with_end = True

    def abort_response(self) -> None:
        self.session.core.reset(self.stream_id, ErrorCodes.INTERNAL_ERROR)

    async def tunnel(self, upstream: UpstreamConnection) -> None:
        raise PeerError(400, "no upgrade over HTTP/2")  # as_http1_head never asks for one


def plain_text_fields(length: int) -> Headers:
    return (
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % length),
        (b"server", b"ingress-proxy"),
        (b"date", HttpDate.now()),
    )
