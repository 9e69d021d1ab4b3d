"""Client connections: bytes → TLS → HTTP/1.1 requests → `exchange` → responses, in order.

Theory of operation
-------------------
Each accepted connection is a `ClientConnection` protocol. `data_received` runs TLS
(`proxy.tls.ServerTls`) and the request parser (`proxy.http1`) and queues events. While the
connection is on the fast path (`_fast`, `proxy.fast_path`) there is no handler coroutine: the
queued request is taken in the callback (`_next_request`), sent to an idle pooled backend
connection and answered from that connection's callback (`fast_done`); idle and head deadlines
are timestamps the loop's one sweeper checks (`deadline_reached`). Any request the fast path
cannot take, or hands over, starts the handler (`_serve`), which takes events one request at a
time and hands each head to `proxy.exchange.exchange`, and goes back to the fast path once the
queue is empty. Either way pipelined requests are answered strictly in order (the next one is
taken only after the previous response was written), and reading pauses while the queue is
ahead of its consumer (`proxy.flow`). This class is the HTTP/1.1 `ClientSide`:
it turns the exchange's response heads and body pieces into HTTP/1.1 framing (the plan is
`decisions.plan_http1_response`) and owns the connection's timers and writes. When ALPN picks
`h2`, the connection hands its plaintext to an `Http2Session` instead (`proxy.http2_session`)
and this class only keeps the TLS pump.

Writes to the client are coalesced: response pieces collect in `_out` and go through TLS and the
socket in one `SSL_write` + one `transport.write` when the handler is about to wait for anything
(or every `_FLUSH_AT` bytes of a large body). With small keep-alive responses this turns head +
body into one TLS record and one syscall per response, or per pipelined burst.

Timeouts: the TLS handshake must finish within `handshake`; a request head must arrive within
`header_read` of its first byte (slowloris); a keep-alive connection may sit `idle` between
requests (the handler's waits are timers; the fast path's the same limits as timestamps). On drain (SIGTERM) idle connections close at once and busy ones after their current
response.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

from proxy import fast_path, memory, metrics
from proxy.client_auth import ClientVerification, verification_of
from proxy.deadlines import Deadline, DeadlineSweeper, deadline_sweeper
from proxy.decisions import http1_connection_continues, plan_http1_response
from proxy.exchange import HttpDate, exchange, hsts_header
from proxy.flow import ConnectionGone, Failure, FlowControlled
from proxy.http2_session import Http2Session
from proxy.proxy_protocol import ProxyHeaderError, ProxyHeaderReader, count_refusal
from proxy.http1 import (
    LAST_CHUNK,
    Body,
    EndOfMessage,
    Headers,
    PeerError,
    RequestHead,
    RequestParser,
    ResponseHead,
    TunnelData,
    client_response_head,
    encode_chunk,
    simple_response,
)
from proxy.serving import Listener, ServingState
from proxy.tls import ServerTls, TlsFailure, TlsState
from proxy.tls.offload import async_job_watcher
from proxy.upstream import UpstreamConnection

LOG = logging.getLogger("ingress_proxy")

_FLUSH_AT = 64 * 1024  # flush a streamed body every 64 KiB: four TLS records, one write
TUNNEL_IDLE_SECONDS = 3600.0  # an upgraded (WebSocket) connection may be quiet this long
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
HANDSHAKE_ABANDONED = "closed by the client"  # the handshake-failure reason when its FIN came first

# Connections whose TLS handshake is paused in an async engine job: OpenSSL still owns their
# stack, so they must outlive a vanished client until the job finishes (shared/NOTES.md §1).
_PAUSED_IN_ASYNC_JOB: set[ClientConnection] = set()


class ClientConnection(FlowControlled):
    # Slots, and the parser made at the first request byte: idle TLS connections are most of the
    # open ones (bench row idle-rss). Attributes added elsewhere still work (FlowControlled's __dict__).
    __slots__ = (
        "protocol", "server", "listener", "tls", "parser", "client_ip", "_out", "_out_size", "_awaiting_head",
        "_head_timer", "_handshake_timer", "_async_fds", "_parse_failed", "_handler", "http2", "upstream",
        "_rechunk", "_held_large_buffers", "_fast", "_in_flight", "_idle_deadline", "_head_deadline",
        "deadline_queued", "sweeper", "_proxy_header", "client_verification",
    )  # fmt: skip
    request_trailers: Headers = ()  # HTTP/1.1 chunked trailers are not relayed

    def __init__(self, server: ServingState, listener: Listener) -> None:
        super().__init__()
        self.protocol = "http/1.1"  # "h2" once ALPN chose it
        self.server = server
        self.listener = listener
        self.tls: ServerTls | None = None
        self.parser: RequestParser | None = None  # made when the first request byte arrives
        self.client_ip = b"-"
        self._proxy_header: ProxyHeaderReader | None = None  # reading the PROXY protocol header first
        self._out: list[bytes] = []
        self._out_size = 0
        self._awaiting_head = True
        self._head_timer: asyncio.TimerHandle | None = None
        self._handshake_timer: Deadline | None = None  # one sweeper's entry, not a loop timer each
        self._async_fds: list[int] = []
        self._parse_failed = False
        self._handler: asyncio.Task[None] | None = None
        self.http2: Http2Session | None = None  # set when ALPN chose h2
        self.client_verification: ClientVerification | None = None  # set after the handshake (client auth hosts)
        self.upstream: UpstreamConnection | None = None  # in use by the current request
        self._rechunk = False  # the response being sent goes out chunked
        self._held_large_buffers = False  # writing paused once: its buffers reached the high-water mark
        # The fast path (proxy.fast_path): serving with no handler coroutine, deadlines as timestamps.
        self._fast = False  # HTTP/1.1 requests are taken by the fast path; no handler runs
        self._in_flight: fast_path.FastExchange | None = None  # the fast path's request, sent to its backend
        self._idle_deadline = 0.0  # fast and idle: close at this loop time...
        self._head_deadline = 0.0  # ...or answer 408 at this one, once a head has begun (0: none)
        self.deadline_queued = 0.0  # the sweeper's entry for us (0: none)
        self.sweeper: DeadlineSweeper = deadline_sweeper(self.loop)  # the loop's one: handshake, idle, head, in flight

    # -- protocol side ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0].encode() if peer else b"-"
        self.server.connections.add(self)
        metrics.open_connections(self.listener.name).inc()
        generation = self.server.generation
        if generation.configuration.proxy_protocol and self.listener.name in generation.configuration.proxy_protocol:
            self._proxy_header = ProxyHeaderReader()  # the header, then TLS, within the handshake timeout
        if self.listener.tls:  # the protocol is known once ALPN has spoken: see _handshake_done
            self.tls = ServerTls(generation.tls.default)
        else:
            self._serve_http1()
        if self.tls is not None or self._proxy_header is not None:
            self._handshake_timer = self.sweeper.call_later(
                generation.configuration.timeouts.handshake, self._handshake_expired
            )

    def data_received(self, data: bytes) -> None:
        if self._proxy_header is not None:
            data = self._read_proxy_header(data)
            if not data:
                return
        tls = self.tls
        if tls is not None:
            handshaking = tls.state is TlsState.HANDSHAKING
            try:
                data = tls.receive(data)
            except TlsFailure as failure:
                self._tls_failed(failure, handshaking)
                return
            self._write_tls_output()
            if handshaking:
                self._after_handshake_step()
            if data:
                self._feed(data)
            if tls.state is TlsState.PEER_CLOSED:  # close_notify, after what came before it: answer that, then close
                self._peer_closed()
            return
        self._feed(data)

    def _read_proxy_header(self, data: bytes) -> bytes:
        """Take the PROXY header off the front of the stream; return the bytes after it, if any."""
        assert self._proxy_header is not None and self.transport is not None
        try:
            parsed = self._proxy_header.feed(data)
        except ProxyHeaderError as error:
            self._refuse_proxy_header(error.reason)
            return b""
        if parsed is None:
            return b""
        header, rest = parsed
        self._proxy_header = None
        if header.source is not None:
            self.client_ip = header.source
        if self.tls is None and self._handshake_timer is not None:
            self._handshake_timer.cancel()  # plain HTTP: the header was the whole handshake
        return rest

    def _proxy_header_input_ended(self) -> None:
        """FIN before the PROXY header was complete: close now, not at the handshake timeout."""
        assert self._proxy_header is not None and self.transport is not None
        try:
            self._proxy_header.input_ended()
        except ProxyHeaderError as error:
            self._refuse_proxy_header(error.reason)
            return
        self._proxy_header = None
        self.transport.abort()  # it sent nothing at all (a TCP health check): nothing to count

    def _refuse_proxy_header(self, reason: str) -> None:
        assert self.transport is not None
        count_refusal(self.listener.name, self.client_ip, reason)
        self._proxy_header = None
        self.transport.abort()

    def _peer_closed(self) -> None:
        if self.read_eof:
            return  # said once; ciphertext after the close_notify is ignored
        if self.http2 is not None:
            self.read_eof = True
            self.http2.input_ended()
        else:
            self.eof_received()

    def _feed(self, data: bytes) -> None:
        if self.http2 is not None:
            self.http2.receive(data)
            return
        if self._parse_failed:
            return
        parser = self.parser
        if parser is None:
            parser = self.parser = RequestParser(self.events)
        try:
            parser.feed(data)
        except PeerError as error:
            self._parse_failed = True
            self.events.append(Failure(error))
        if self._fast:  # the fast path: no handler is waiting for these events
            self.queued(len(data))
            if self._in_flight is not None:
                return  # pipelined: taken once the response in flight was written
            if self.events:
                self._next_request()
            elif self._head_deadline == 0.0:  # the first bytes of a head: header_read runs from now
                self._head_deadline = self.loop.time() + self.server.generation.configuration.timeouts.header_read
                self.sweeper.watch(self, self._head_deadline)
            return
        if self._awaiting_head and self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self.server.generation.configuration.timeouts.header_read, self._head_too_slow
            )
        self.queued(len(data))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server.connections.discard(self)
        metrics.open_connections(self.listener.name).dec()
        for timer in (self._head_timer, self._handshake_timer):
            if timer is not None:
                timer.cancel()
        if self._handler is not None and not self._handler.done():
            self._handler.cancel()  # nobody to answer: stop waiting for the backend too
        if self._in_flight is not None:
            self._in_flight.abandon()
            self._in_flight = None
        if self.http2 is not None:
            self.http2.connection_lost()
        if self._held_large_buffers:
            memory.release_freed_memory_soon(self.loop)

    # -- TLS handshake ------------------------------------------------------------------------

    def _write_tls_output(self) -> None:
        assert self.tls is not None and self.transport is not None
        ciphertext = self.tls.outgoing()
        if ciphertext and not self.closed:
            self.transport.write(ciphertext)

    def _after_handshake_step(self) -> None:
        tls = self.tls
        assert tls is not None
        if tls.waiting_for_async:
            self._watch_async_job()
        elif tls.state is TlsState.OPEN:
            if self._handshake_timer is not None:
                self._handshake_timer.cancel()
            key_source = self.server.generation.tls.key_source(tls.connection.get_context())
            metrics.handshake_series(tls.version, key_source, tls.resumed).inc()
            self._handshake_done()

    def _handshake_done(self) -> None:
        """Start the protocol ALPN chose: HTTP/2, or HTTP/1.1 (also when the client offered none)."""
        assert self.tls is not None
        self.client_verification = verification_of(self.tls.connection)
        if self.tls.alpn_selected == b"h2":
            self.protocol = "h2"
            self.http2 = Http2Session(self, self.server)
            self.http2.write()
        else:
            self._serve_http1()

    def _watch_async_job(self) -> None:
        assert self.tls is not None
        metrics.TLS_ASYNC_PAUSES.inc()
        _PAUSED_IN_ASYNC_JOB.add(self)
        self._async_fds = self.tls.async_wait_fds()
        async_job_watcher(self.loop).watch(self._async_fds, self._async_job_ready)

    def _async_job_ready(self) -> None:
        assert self.tls is not None
        async_job_watcher(self.loop).forget(self._async_fds)
        _PAUSED_IN_ASYNC_JOB.discard(self)
        try:
            plaintext = self.tls.resume_handshake()
        except TlsFailure as failure:
            self._tls_failed(failure, handshaking=True)
            return
        if self.closed:  # the client left while the job ran: finish the job, then let go
            if self.tls.waiting_for_async:
                self._watch_async_job()
            else:
                self.tls.close()
            return
        timer = self._handshake_timer
        if timer is not None and timer.when() <= self.loop.time() and self.tls.state is TlsState.HANDSHAKING:
            # The handshake timeout fell while the job was paused (ASYNC_PAUSED is not HANDSHAKING,
            # and a paused connection must not be dropped): apply it now that the job is back.
            self._handshake_expired()
            return
        if self.read_eof and self.tls.state is TlsState.HANDSHAKING:  # the client closed while it ran
            self._handshake_abandoned()
            return
        self._write_tls_output()
        self._after_handshake_step()
        if plaintext:
            self._feed(plaintext)

    def _tls_failed(self, failure: TlsFailure, handshaking: bool) -> None:
        if handshaking:
            metrics.TLS_HANDSHAKE_FAILURES.labels(failure.reason[:60]).inc()
        LOG.debug("TLS failure from %s: %s", self.client_ip.decode(), failure.reason)
        if self.transport is not None and self.tls is not None:
            self._write_tls_output()  # the alert, if OpenSSL queued one
            self.transport.close()

    def _handshake_abandoned(self) -> None:
        """The client closed its side before the handshake ended: it can never send its Finished,
        so let go now instead of at the handshake timeout. (While a job is paused in the engine the
        connection waits for it; `_async_job_ready` comes back here.)"""
        metrics.TLS_HANDSHAKE_FAILURES.labels(HANDSHAKE_ABANDONED).inc()
        if self.transport is not None:
            self.transport.abort()

    def _handshake_expired(self) -> None:
        if self._proxy_header is not None and self.transport is not None:
            self._refuse_proxy_header("no complete PROXY header within the handshake timeout")
        elif self.tls is not None and self.tls.state is TlsState.HANDSHAKING and self.transport is not None:
            metrics.TLS_HANDSHAKE_FAILURES.labels("timeout").inc()
            self.transport.abort()

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._awaiting_head and not self._parse_failed:
            self._parse_failed = True
            self.events.append(Failure(PeerError(408, "request head not received in time")))
            self._wake()
            if self._fast and self._in_flight is None:  # armed by a handler that went back to the fast path
                self._start_handler(None)

    # -- writing ------------------------------------------------------------------------------

    def backlog(self) -> int:
        """Response bytes not yet with the kernel: pending pieces plus the transport's buffer."""
        if self.closed or self.transport is None:
            return 0
        return self._out_size + self.transport.get_write_buffer_size()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._held_large_buffers = True

    def resume_writing(self) -> None:
        super().resume_writing()
        self.backlog_shrank()
        if self.upstream is not None:
            self.upstream.backlog_shrank()
        if self.http2 is not None:
            self.http2.writable_again()

    def _send(self, data: bytes) -> None:
        self._out.append(data)
        self._out_size += len(data)

    def _flush(self) -> None:
        if not self._out or self.closed or self.transport is None:
            self._out.clear()
            self._out_size = 0
            return
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        self._out_size = 0
        if self.tls is not None:
            if not self.tls.sendable:
                return  # we closed (or TLS broke): nothing more can go out
            self.tls.send(data)
            data = self.tls.outgoing()
        self.transport.write(data)

    async def _flush_and_drain(self) -> None:
        self._flush()
        await self._drain_client()

    async def _drain_client(self) -> None:
        """Wait while the client does not read. One that stalls our writes for `idle` seconds is
        dropped (nginx's send_timeout): else it would hold a backend connection forever."""
        if not self._writing_paused or self.closed:
            await self.drain()
            return
        try:
            async with asyncio.timeout(self.server.generation.configuration.timeouts.idle):
                await self.drain()
        except TimeoutError:
            self.closed = True
            if self.transport is not None:
                sock = self.transport.get_extra_info("socket")
                if sock is not None:  # RST: the kernel drops the megabytes it queued for this client
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.transport.abort()
            raise ConnectionGone() from None

    # -- HTTP/2 (the session writes plaintext through us) -------------------------------------

    def write_plaintext(self, data: bytes) -> None:
        self._send(data)
        self._flush()

    def close_transport(self) -> None:
        self._close()

    def _close(self) -> None:
        self._flush()  # after the client's close_notify too (PEER_CLOSED); dropped if TLS cannot send
        if self.closed or self.transport is None:
            return
        if self.tls is not None and not self.tls.waiting_for_async:
            if self.tls.state is not TlsState.BROKEN:
                self.tls.close()
                self._write_tls_output()
        self.transport.close()

    def drain_now(self) -> None:
        """Server drain: close at once if idle between requests; else after the current response
        (HTTP/2: a graceful GOAWAY, then close once the streams in flight have finished)."""
        if self.http2 is not None:
            self.http2.drain()
        elif self._awaiting_head and not self.events and self._head_timer is None and self._head_deadline == 0.0:
            self._close()

    # -- the handler --------------------------------------------------------------------------

    def _serve_http1(self) -> None:
        """HTTP/1.1 from here on: by the fast path while it can take the requests, else the handler."""
        if fast_path.ENABLED:
            self._fast_idle()
        else:
            self._start_handler(None)

    def _start_handler(self, resume: fast_path.FastExchange | None) -> None:
        self._fast = False
        self._handler = self.loop.create_task(self._serve(resume))

    async def _serve(self, resume: fast_path.FastExchange | None = None) -> None:
        """The general path: one request at a time through `exchange`; `resume` is a request the
        fast path routed (and maybe sent) and handed over. Returns to the fast path once the
        queue is empty and the connection fit for it."""
        state = self.server
        back_to_fast = False
        try:
            if resume is not None and not http1_connection_continues(resume.head, await resume.resume(), state.draining):
                return
            while not state.draining or self.events:
                self._awaiting_head = True
                if not self.events:
                    self._flush()
                    if self._writing_paused:  # the last response must reach a reader, not a staller
                        await self._drain_client()
                    if fast_path.ENABLED and not self.events and self._fit_for_fast_path():
                        back_to_fast = True
                        return
                head = self.ready_event() or await self.next_event(state.generation.configuration.timeouts.idle)
                self._awaiting_head = False
                if self._head_timer is not None:
                    self._head_timer.cancel()
                    self._head_timer = None
                if not head.has_body:  # take its EndOfMessage
                    self.ready_event() or await self.next_event(state.generation.configuration.timeouts.idle)
                keep = await exchange(self, state, head)
                if not http1_connection_continues(head, keep, state.draining):
                    break
        except PeerError as error:
            self._send(simple_response(error.status, HttpDate.now(), close=True, extra=hsts_header(self.listener, state.generation)))
            LOG.debug("refused request from %s: %s", self.client_ip.decode(), error.reason)
        except (ConnectionGone, TimeoutError, TlsFailure) as error:
            LOG.debug("connection from %s ended: %r", self.client_ip.decode(), error)
        except Exception:  # a bug must cost one connection, never the process
            LOG.exception("connection handler failed")
        finally:
            # The task keeps its CancelledError, whose traceback holds our frames: without this
            # cycle breaker every buffer of a dropped client waits for a full garbage collection.
            self._handler = None
            if back_to_fast:
                self._fast_idle()
            else:
                if self.upstream is not None:
                    self.upstream.abandon()
                self._close()

    def _fit_for_fast_path(self) -> bool:
        return not (
            self.closed or self.read_eof or self._parse_failed or (self.parser is not None and self.parser.tunnel) or self.server.draining
        )

    # -- the fast path (proxy.fast_path) ------------------------------------------------------

    def _fast_idle(self) -> None:
        """Between requests on the fast path: the idle deadline runs from now."""
        self._fast = True
        self._awaiting_head = True
        self._idle_deadline = self.loop.time() + self.server.generation.configuration.timeouts.idle
        self.sweeper.watch(self, self._idle_deadline)

    def _next_request(self) -> None:
        """Fast and idle: take the first queued request by the fast path, or start the handler."""
        if self.closed:
            return
        events = self.events
        if not events:
            if self.read_eof:
                self._close()  # as the handler would on ConnectionGone
            return
        head = events[0]
        if self._writing_paused or self.server.draining or type(head) is not RequestHead or not fast_path.start(self, head):
            self._start_handler(None)

    def took_head(self) -> None:
        """The fast path took the head at the front of the queue (its events are consumed)."""
        self._awaiting_head = False
        self._head_deadline = 0.0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def fast_sent(self, exchange_: fast_path.FastExchange) -> None:
        self._in_flight = exchange_

    def fast_hand_over(self, exchange_: fast_path.FastExchange) -> None:
        self._in_flight = None
        self._start_handler(exchange_)

    def fast_response(self, head: bytes, body: list[bytes]) -> None:
        self._send(head)
        for piece in body:
            self._send(piece)

    def fast_done(self, continues: bool) -> None:
        """The fast path wrote a whole response: flush it, then the next request (or close)."""
        self._in_flight = None
        try:
            self._flush()
        except TlsFailure:  # the client closed its TLS session while we waited for the backend
            continues = False
        if not continues:
            self._close()
        elif self._writing_paused:  # a client that does not read: the handler drains it or drops it
            self._start_handler(None)
        else:
            self._fast_idle()
            self._next_request()

    def deadline_reached(self, now: float) -> None:
        """The sweeper's call for our idle or head deadline (only while fast and idle)."""
        if self.closed or not self._fast or self._in_flight is not None:
            return
        if self._head_deadline and self._head_deadline <= now:
            self._head_deadline = 0.0
            self._parse_failed = True
            self.events.append(Failure(PeerError(408, "request head not received in time")))
            self._start_handler(None)
        elif self._idle_deadline <= now:
            self._close()  # as the handler's idle wait would
        else:
            self.sweeper.watch(self, min(self._idle_deadline, self._head_deadline or self._idle_deadline))

    def eof_received(self) -> bool | None:
        if self._proxy_header is not None:
            self._proxy_header_input_ended()
            return None  # aborted: nothing of this connection is left to answer
        if self.tls is not None and self.tls.state is TlsState.HANDSHAKING:
            self._handshake_abandoned()
            return None
        keep_open = super().eof_received()
        if self._fast and self._in_flight is None:
            self.loop.call_soon(self._next_request)  # after any plaintext that came with the close
        return keep_open

    # -- ClientSide (proxy.exchange) ----------------------------------------------------------

    async def next_body_event(self, timeout: float) -> Body | EndOfMessage:
        if not self.events:
            self._flush()  # e.g. our 100 Continue: the client waits for it before sending
        event = await self.next_event(timeout)
        if type(event) is not Body and type(event) is not EndOfMessage:
            raise PeerError(400, "unexpected data in request body")
        return event  # type: ignore[no-any-return]

    def invite_body(self, head: RequestHead) -> None:
        if any(name.lower() == b"expect" for name, _ in head.headers):
            self._send(_CONTINUE)  # we stream the body ourselves, so we invite it ourselves

    def flush(self) -> None:
        self._flush()

    def answer_locally(self, head: RequestHead, status: int, extra: bytes, body: bytes = b"") -> bool:
        self._send(simple_response(status, HttpDate.now(), head.has_body, extra, head.method == b"HEAD", body))
        return not head.has_body  # an unread body would be taken for the next request: close instead

    def send_interim(self, head: RequestHead, response: ResponseHead) -> None:
        if head.version == "1.1" and response.status != 100:
            self._send(client_response_head(response, False, True, HttpDate.now(), b""))

    def start_response(self, head: RequestHead, response: ResponseHead, extra: bytes) -> tuple[bool, bool]:
        plan = plan_http1_response(head, response, self.server.draining)
        self._rechunk = plan.rechunk
        self._send(client_response_head(response, plan.rechunk, plan.keep_alive and head.keep_alive, HttpDate.now(), extra))
        return plan.tunnel, plan.keep_alive

    def send_body(self, data: bytes) -> None:
        self._send(encode_chunk(data) if self._rechunk else data)

    async def body_sent(self) -> None:
        if self._out_size >= _FLUSH_AT:
            await self._flush_and_drain()

    @property
    def write_blocked(self) -> bool:
        return self._writing_paused

    async def writable(self) -> None:
        await self._drain_client()

    def end_response(self) -> None:
        if self._rechunk:
            self._send(LAST_CHUNK)

    def send_trailers(self, trailers: Headers) -> None:
        """Trailers from an HTTP/2 backend are dropped for HTTP/1.1 clients; the response ends as usual."""
        self.end_response()

    def abort_response(self) -> None:
        """Nothing to send: the exchange ends the connection, which cuts the body short."""

    async def tunnel(self, upstream: UpstreamConnection) -> None:
        """Copy bytes both ways after a 101 until either side closes or stays silent too long."""
        self._flush()

        async def client_to_backend() -> None:
            while True:
                event = await self.next_event(TUNNEL_IDLE_SECONDS)
                if type(event) is TunnelData:
                    upstream.write(event.data)
                    async with asyncio.timeout(TUNNEL_IDLE_SECONDS):  # a backend that stopped reading
                        await upstream.drain()

        async def backend_to_client() -> None:
            while True:
                event = await upstream.next_event(TUNNEL_IDLE_SECONDS)
                if type(event) is TunnelData:
                    self._send(event.data)
                    await self._flush_and_drain()

        pumps = [self.loop.create_task(client_to_backend()), self.loop.create_task(backend_to_client())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            upstream.close()
