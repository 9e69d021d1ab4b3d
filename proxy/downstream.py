"""Client connections: bytes → TLS → HTTP/1.1 requests → a backend → the response, in order.

Theory of operation
-------------------
Each accepted connection is a `ClientConnection` protocol plus one handler coroutine.
`data_received` runs TLS (`proxy.tls.ServerTls`) and the request parser (`proxy.http1`) and only
queues events; the handler (`_serve`) takes them one request at a time, so pipelined requests
are answered strictly in order, and reading pauses while the queue is ahead of it
(`proxy.flow`). For every request the handler takes the *current* configuration generation,
routes the request, borrows a keep-alive connection to an endpoint (or opens one), streams the
request body to it and the response back, and returns the backend connection to its pool.

Writes to the client are coalesced: response pieces collect in `_out` and go through TLS and the
socket in one `SSL_write` + one `transport.write` when the handler is about to wait for anything
(or every `_FLUSH_AT` bytes of a large body). With small keep-alive responses this turns head +
body into one TLS record and one syscall per response, or per pipelined burst.

Failures map to the statuses users expect: no route 404; backend without endpoints 503;
connect refused / reset / garbage 502; no response head within the backend timeout 504. A
failure before any response byte was read is retried on the next endpoint when the request is
idempotent and has no body. Once a response head went to the client, a backend failure can only
cut the client connection.

Timeouts: the TLS handshake must finish within `handshake`; a request head must arrive within
`header_read` of its first byte (slowloris); a keep-alive connection may sit `idle` between
requests; backend reads wait `backend_response`. On drain (SIGTERM) idle connections close at
once and busy ones after their current response.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import socket
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from config.model import Address, Timeouts
from proxy import memory, metrics
from proxy.flow import ConnectionGone, Failure, FlowControlled
from proxy.http1 import (
    LAST_CHUNK,
    Body,
    EndOfMessage,
    PeerError,
    RequestHead,
    RequestParser,
    ResponseHead,
    TunnelData,
    client_response_head,
    encode_chunk,
    simple_response,
    upstream_request_head,
)
from proxy.tls import ServerTls, TlsFailure, TlsState
from proxy.upstream import UpstreamConnection, connect

if TYPE_CHECKING:
    from proxy.server import Generation, ProxyServer

LOG = logging.getLogger("ingress_proxy")
ACCESS_LOG = logging.getLogger("ingress_proxy.access")

IDEMPOTENT_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
_FLUSH_AT = 64 * 1024  # flush a streamed body every 64 KiB: four TLS records, one write
TUNNEL_IDLE_SECONDS = 3600.0  # an upgraded (WebSocket) connection may be quiet this long
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# Connections whose TLS handshake is paused in an async engine job: OpenSSL still owns their
# stack, so they must outlive a vanished client until the job finishes (shared/NOTES.md §1).
_PAUSED_IN_ASYNC_JOB: set[ClientConnection] = set()


@dataclass(frozen=True)
class Listener:
    name: str  # "https" or "http": metrics label and X-Forwarded-Proto
    tls: bool
    address: bytes  # "host:port" as bound: the Host for HTTP/1.0 requests that carry none


class _HttpDate:
    """The Date header value, formatted once per second."""

    second = 0
    value = b""

    @classmethod
    def now(cls) -> bytes:
        second = int(time.time())
        if second != cls.second:
            cls.second = second
            cls.value = email.utils.formatdate(second, usegmt=True).encode("ascii")
        return cls.value


class _BackendFailed(Exception):
    def __init__(self, status: int, kind: str) -> None:
        super().__init__(kind)
        self.status = status
        self.kind = kind


class _ClientFailed(Exception):
    """The client broke off or sent a bad body while we were forwarding its request."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class ClientConnection(FlowControlled):
    def __init__(self, server: ProxyServer, listener: Listener) -> None:
        super().__init__()
        self.server = server
        self.listener = listener
        self.tls: ServerTls | None = None
        self.parser = RequestParser(self.events)
        self.client_ip = b"-"
        self._out: list[bytes] = []
        self._out_size = 0
        self._awaiting_head = True
        self._head_timer: asyncio.TimerHandle | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._async_fds: list[int] = []
        self._parse_failed = False
        self._handler: asyncio.Task[None] | None = None
        self._upstream: UpstreamConnection | None = None  # in use by the current request
        self._held_large_buffers = False  # writing paused once: its buffers reached the high-water mark

    # -- protocol side ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0].encode() if peer else b"-"
        self.server.connections.add(self)
        metrics.OPEN_CONNECTIONS.labels(self.listener.name).inc()
        generation = self.server.generation
        if self.listener.tls:
            self.tls = ServerTls(generation.tls.default)
            self._handshake_timer = self.loop.call_later(
                generation.configuration.timeouts.handshake, self._handshake_expired
            )
        self._handler = self.loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
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
            if tls.state is TlsState.CLOSED:
                self.eof_received()
            if not data:
                return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        if self._parse_failed:
            return
        try:
            self.parser.feed(data)
        except PeerError as error:
            self._parse_failed = True
            self.events.append(Failure(error))
        if self._awaiting_head and self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self.server.generation.configuration.timeouts.header_read, self._head_too_slow
            )
        self.queued(len(data))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server.connections.discard(self)
        metrics.OPEN_CONNECTIONS.labels(self.listener.name).dec()
        for timer in (self._head_timer, self._handshake_timer):
            if timer is not None:
                timer.cancel()
        if self._handler is not None and not self._handler.done():
            self._handler.cancel()  # nobody to answer: stop waiting for the backend too
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

    def _watch_async_job(self) -> None:
        from proxy.offload import async_wait_fds

        assert self.tls is not None
        metrics.TLS_ASYNC_PAUSES.inc()
        _PAUSED_IN_ASYNC_JOB.add(self)
        self._async_fds = async_wait_fds(self.tls.connection)
        for fd in self._async_fds:
            self.loop.add_reader(fd, self._async_job_ready)

    def _async_job_ready(self) -> None:
        assert self.tls is not None
        for fd in self._async_fds:
            self.loop.remove_reader(fd)
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

    def _handshake_expired(self) -> None:
        if self.tls is not None and self.tls.state is TlsState.HANDSHAKING and self.transport is not None:
            metrics.TLS_HANDSHAKE_FAILURES.labels("timeout").inc()
            self.transport.abort()

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._awaiting_head and not self._parse_failed:
            self._parse_failed = True
            self.events.append(Failure(PeerError(408, "request head not received in time")))
            self._wake()

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
        if self._upstream is not None:
            self._upstream.backlog_shrank()

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

    def _close(self) -> None:
        self._flush()
        if self.closed or self.transport is None:
            return
        if self.tls is not None and not self.tls.waiting_for_async:
            if self.tls.state is not TlsState.BROKEN:
                self.tls.close()
                self._write_tls_output()
        self.transport.close()

    def drain_now(self) -> None:
        """Server drain: close at once if idle between requests; else after the current response."""
        if self._awaiting_head and not self.events and self._head_timer is None:
            self._close()

    # -- the handler --------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            while not self.server.draining or self.events:
                self._awaiting_head = True
                if not self.events:
                    self._flush()
                    if self._writing_paused:  # the last response must reach a reader, not a staller
                        await self._drain_client()
                head = self.ready_event() or await self.next_event(self.server.generation.configuration.timeouts.idle)
                self._awaiting_head = False
                if self._head_timer is not None:
                    self._head_timer.cancel()
                    self._head_timer = None
                if not await self._handle(head):
                    break
        except PeerError as error:
            self._send(simple_response(error.status, _HttpDate.now(), close=True))
            LOG.debug("refused request from %s: %s", self.client_ip.decode(), error.reason)
        except (ConnectionGone, TimeoutError, TlsFailure) as error:
            LOG.debug("connection from %s ended: %r", self.client_ip.decode(), error)
        except Exception:  # a bug must cost one connection, never the process
            LOG.exception("connection handler failed")
        finally:
            if self._upstream is not None:
                self._upstream.abandon()
            self._close()
            # The task keeps its CancelledError, whose traceback holds our frames: without this
            # cycle breaker every buffer of a dropped client waits for a full garbage collection.
            self._handler = None

    async def _handle(self, head: RequestHead) -> bool:
        """Answer one request; True when the connection may carry another."""
        started = self.loop.time()
        if not head.has_body:  # take its EndOfMessage
            self.ready_event() or await self.next_event(self.server.generation.configuration.timeouts.idle)
        generation = self.server.generation
        match = generation.router.route(head.host.decode("latin-1"), head.path)
        virtual_host = match.virtual_host
        host_label = (virtual_host.host or "*") if virtual_host else "-"
        backend = match.backend
        if not self.listener.tls and virtual_host is not None and virtual_host.redirect_to_https:
            status = 308
            keep = self._answer_locally(head, status, self._redirect_header(head))
        elif backend is None:
            status = 404
            keep = self._answer_locally(head, status)
        elif not (candidates := self.server.balancer.candidates(backend)):
            status = 503
            keep = self._answer_locally(head, status)
        else:
            status, keep = await self._proxy(head, backend, candidates, generation)
        elapsed = self.loop.time() - started
        backend_label = backend or "-"
        requests, durations = metrics.request_series(host_label, backend_label, status)
        requests.inc()
        durations.observe(elapsed)
        if ACCESS_LOG.isEnabledFor(logging.INFO):
            self._log_access(head, status, backend_label, elapsed, generation)
        return keep and head.keep_alive and head.version == "1.1" and not self.server.draining

    def _redirect_header(self, head: RequestHead) -> bytes:
        host = head.host.split(b":")[0] if not head.host.startswith(b"[") else head.host.split(b"]")[0] + b"]"
        port = self.server.https_port
        authority = host if port == 443 else b"%s:%d" % (host, port)
        return b"Location: https://%s%s\r\n" % (authority, head.target)

    def _answer_locally(self, head: RequestHead, status: int, extra: bytes = b"") -> bool:
        self._send(simple_response(status, _HttpDate.now(), close=head.has_body, extra=extra + self._hsts()))
        return not head.has_body  # an unread body would be taken for the next request: close instead

    def _hsts(self) -> bytes:
        hsts = self.server.generation.configuration.hsts
        if hsts is None or not self.listener.tls:
            return b""
        return b"Strict-Transport-Security: %s\r\n" % hsts.header_value().encode()

    async def _proxy(
        self, head: RequestHead, backend: str, candidates: list[Address], generation: Generation
    ) -> tuple[int, bool]:
        timeouts = generation.configuration.timeouts
        has_body = head.has_body
        retryable = head.method in IDEMPOTENT_METHODS and not has_body
        if has_body and any(name.lower() == b"expect" for name, _ in head.headers):
            self._send(_CONTINUE)  # we stream the body ourselves, so we invite it ourselves
        request = upstream_request_head(head, self.client_ip, self.listener.name.encode(), self.listener.address)
        balancer = self.server.balancer
        failure = _BackendFailed(502, "no endpoint")
        attempts = list(candidates)
        while attempts:
            address = attempts.pop(0)
            pool = balancer.pool(address)
            upstream = self._upstream = pool.take()
            reused = upstream is not None
            try:
                if upstream is None:
                    try:
                        upstream = self._upstream = await connect(address, timeouts.connect)
                    except TimeoutError:
                        raise _BackendFailed(504, "connect timeout") from None
                    except OSError:
                        raise _BackendFailed(502, "connect failed") from None
                upstream.begin_request(head.method, self.backlog)
                upstream.write(request)
                if has_body:  # never on a retry: only body-less requests are retried
                    await self._forward_request_body(head, upstream, timeouts.idle, timeouts.backend_response)
                response = await self._response_head(upstream, head, timeouts.backend_response)
            except _ClientFailed as failed:
                if upstream is not None:
                    upstream.close()
                raise failed.cause from None
            except _BackendFailed as error:
                failure = error
            except (PeerError, ConnectionGone) as error:
                failure = _BackendFailed(502, "reset" if isinstance(error, ConnectionGone) else "bad response")
            except TimeoutError:
                failure = _BackendFailed(504, "response timeout")
                retryable = False  # the backend may be working on it: never send it twice
            else:
                return response.status, await self._relay_response(head, upstream, response, backend, timeouts)
            if upstream is not None:
                upstream.close()
            metrics.UPSTREAM_ERRORS.labels(backend, failure.kind).inc()
            if reused and failure.kind == "reset" and retryable:
                attempts.insert(0, address)  # a keep-alive connection the backend had closed
            elif not retryable and failure.kind not in ("connect failed", "connect timeout"):
                break  # the request may have reached the backend
        # An unread request body would be parsed as the next request: close instead.
        self._send(simple_response(failure.status, _HttpDate.now(), close=has_body))
        return failure.status, not has_body

    async def _forward_request_body(
        self, head: RequestHead, upstream: UpstreamConnection, timeout: float, backend_timeout: float
    ) -> None:
        """Stream the request body (re-chunked if it came chunked) until its EndOfMessage.

        `timeout` bounds each wait for the client, `backend_timeout` each wait for a backend that
        does not read what we send (without it, both connections would hang forever)."""
        while True:
            if not self.events:
                self._flush()  # e.g. our 100 Continue: the client waits for it before sending
            try:
                event = await self.next_event(timeout)
            except TimeoutError:
                raise _ClientFailed(PeerError(408, "request body not received in time")) from None
            except (PeerError, ConnectionGone) as error:
                raise _ClientFailed(error) from None
            if type(event) is Body:
                upstream.write(encode_chunk(event.data) if head.chunked else event.data)
                if upstream._writing_paused:
                    try:
                        async with asyncio.timeout(backend_timeout):
                            await upstream.drain()
                    except ConnectionGone:
                        raise _BackendFailed(502, "reset while sending") from None
                    except TimeoutError:
                        raise _BackendFailed(504, "backend not reading") from None
            elif type(event) is EndOfMessage:
                if head.chunked:
                    upstream.write(LAST_CHUNK)
                return
            else:
                raise _ClientFailed(PeerError(400, "unexpected data in request body"))

    async def _response_head(self, upstream: UpstreamConnection, head: RequestHead, timeout: float) -> ResponseHead:
        """The final response head; 1xx interim responses are passed on to HTTP/1.1 clients, but
        do not extend `timeout` (a backend sending 103s forever would otherwise never time out)."""
        deadline = self.loop.time() + timeout
        while True:
            if not upstream.events:
                self._flush()
            event = upstream.ready_event() or await upstream.next_event(timeout)
            if type(event) is not ResponseHead:
                raise PeerError(502, "backend sent data before a response head")
            if event.status >= 200 or event.status == 101:
                return event
            upstream.ready_event() or await upstream.next_event(timeout)  # the interim response's EndOfMessage
            if self.loop.time() > deadline:
                raise TimeoutError
            if head.version == "1.1" and event.status != 100:
                self._send(client_response_head(event, False, True, _HttpDate.now(), b""))

    async def _relay_response(
        self, head: RequestHead, upstream: UpstreamConnection, response: ResponseHead, backend: str, timeouts: Timeouts
    ) -> bool:
        """Send the response to the client; True when the client connection may continue."""
        is_tunnel = response.status == 101 and head.upgrade
        unframed = response.has_body and response.content_length is None
        rechunk = unframed and head.version == "1.1"
        keep = (
            not is_tunnel
            and not (unframed and not rechunk)
            and not (head.upgrade and response.status != 101)
            and not self.server.draining
        )
        self._send(client_response_head(response, rechunk, keep and head.keep_alive, _HttpDate.now(), self._hsts()))
        if is_tunnel:
            await self._tunnel(upstream)
            return False
        try:
            while True:
                if not upstream.events:
                    self._flush()
                    if self._writing_paused:  # the backend waits for the client (proxy.flow)
                        await self._drain_client()
                event = upstream.ready_event() or await upstream.next_event(timeouts.backend_response)
                if type(event) is Body:
                    self._send(encode_chunk(event.data) if rechunk else event.data)
                    if self._out_size >= _FLUSH_AT:
                        del event  # encrypted now: don't keep the plaintext while the client drains
                        await self._flush_and_drain()
                elif type(event) is EndOfMessage:
                    if rechunk:
                        self._send(LAST_CHUNK)
                    break
        except (PeerError, ConnectionGone, TimeoutError) as error:
            upstream.close()
            if self.closed:
                raise ConnectionGone() from None
            metrics.UPSTREAM_ERRORS.labels(backend, "cut mid-body").inc()
            LOG.info("backend %s failed mid-response: %s", upstream.address, type(error).__name__)
            return False  # the client sees a truncated body: the only honest signal left
        self._upstream = None
        self.server.balancer.release(upstream)
        return keep

    async def _tunnel(self, upstream: UpstreamConnection) -> None:
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

    def _log_access(self, head: RequestHead, status: int, backend: str, elapsed: float, generation: Generation) -> None:
        fields = {
            "client": self.client_ip.decode(),
            "listener": self.listener.name,
            "host": head.host.decode("latin-1"),
            "method": head.method.decode("latin-1"),
            "target": head.target.decode("latin-1"),
            "status": status,
            "backend": backend,
            "duration_ms": round(elapsed * 1000, 3),
        }
        if generation.configuration.access_log_json:
            ACCESS_LOG.info(json.dumps(fields))
        else:
            ACCESS_LOG.info(
                '%(client)s %(listener)s "%(method)s %(host)s%(target)s" %(status)s %(backend)s %(duration_ms)sms', fields
            )
