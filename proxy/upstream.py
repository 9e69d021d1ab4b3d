"""Connections to backend endpoints and the keep-alive pools that reuse them.

An `UpstreamConnection` carries one request at a time (no upstream pipelining): the handler calls
`begin_request(method, client_backlog)`, writes the request, marks it `request_sent()` once its
last byte (head, or the body's end) is written, then reads response events; reading pauses while
the client is behind (`proxy.flow`). It waits in its endpoint's `EndpointPool` (most recently
used first, so surplus connections age out) until the next request or until the pool's idle
sweep closes it. A backend that closes an idle connection simply removes it from the pool.

The pool invariant, enforced in one place (`reusable`, checked by `EndpointPool.give_back`, the
only way into a pool): a connection goes back only when
- the request was completely sent (a connection whose request was cut could carry its tail into
  the next request),
- its final response was completely framed and read (`ResponseParser.complete`, every event
  consumed, not a tunnel, keep-alive allowed by the backend), and
- no byte arrived unasked: bytes after the response in the same read fail the parser, bytes
  while idle in the pool close the connection (`data_received`).
Anything else closes it, so the next request on a pooled connection can only ever read the
answer to itself, never one the backend still owed someone else.

TLS backends (`TlsUpstreamConnection`, issue 12) keep the invariant unchanged: TLS sits under the
parser (`proxy.upstream_tls.ClientTls`), so "bytes" above means plaintext; TLS records that carry
none (a TLS 1.3 NewSessionTicket while idle) are not bytes the backend owed anyone. A pool holds
connections of one (endpoint, transport) pair only (`PoolKey`), and `connect` returns only once
the handshake finished, so a request is never written before the backend was authenticated.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from config.model import Address
from proxy.decisions import FailureKind
from proxy.flow import ConnectionGone, Failure, FlowControlled
from proxy.http1 import PeerError, ResponseParser
from proxy.upstream_tls import ClientTls, TlsState, UpstreamTlsFailure, UpstreamTransport

if TYPE_CHECKING:
    from proxy.fast_path import FastExchange

# Where a pooled connection may be reused: its endpoint, and how it was set up (None: plain TCP).
PoolKey = tuple[Address, UpstreamTransport | None]

MAX_IDLE_PER_ENDPOINT = 512  # HTTP/2 multiplexes: 10 clients x 32 streams need 320 at once (at 64, one request in five paid a connect)
IDLE_SECONDS = 30.0  # below common backend keep-alive timeouts (nginx 75 s, aiohttp 75 s, Go 90 s)


def _no_backlog() -> int:
    return 0


class UpstreamConnection(FlowControlled):
    upstream_transport: UpstreamTransport | None = None  # plain TCP

    def __init__(self, address: Address) -> None:
        super().__init__()
        self.address = address
        self.parser: ResponseParser | None = None  # the current request's; None while idle
        self._response_parser: ResponseParser | None = None  # kept across requests (`ResponseParser.reset`)
        self.pool: EndpointPool | None = None  # set while idle in a pool
        self.response_started = False  # any byte of the current response arrived
        self.request_complete = False  # the last byte of the current request was written
        self._socket: socket.socket | None = None
        self._client_backlog: Callable[[], int] = _no_backlog  # set per request (proxy.flow)
        self.fast: FastExchange | None = None  # the fast path's request in flight: told of every event

    def begin_request(self, method: bytes, client_backlog: Callable[[], int]) -> None:
        """`client_backlog`: what the client has not yet taken of earlier response bytes; reading
        pauses while it is high, so a client that stops reading stops us reading its backend."""
        parser = self._response_parser
        if parser is None:
            parser = self._response_parser = ResponseParser(method, self.events)
        else:
            parser.reset(method)
        self.parser = parser
        self.response_started = False
        self.request_complete = False
        self._client_backlog = client_backlog

    def request_sent(self) -> None:
        self.request_complete = True

    def backlog(self) -> int:
        return self._client_backlog()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or self.pool is not None:
            self.close()  # bytes while idle: the backend is confused, never reuse this connection
            return
        self.response_started = True
        try:
            parser.feed(data)
        except PeerError as error:
            self.events.append(Failure(error))
            self.close()
        else:
            if not parser.complete and self._socket is not None:
                # A backend that writes head and body apart with Nagle on (Python's http.server)
                # sends the body only once its head is ACKed; Linux delays that ACK by up to 40 ms
                # on a connection it deems interactive. Quick-ACK now (the flag is not sticky, so
                # again on each partial read; a response complete in one read costs nothing).
                self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        self.queued(len(data))
        if self.fast is not None:
            self.fast.backend_progress()  # last: it may finish, pool us and send the next request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._socket = transport.get_extra_info("socket")

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._client_backlog = _no_backlog
        if self.pool is not None:
            self.pool.discard(self)
        elif self.parser is not None and not self.response_started:
            # Closed before answering: on a reused keep-alive connection this is the backend's
            # idle timeout racing our request, which the caller may safely retry.
            self.events.append(Failure(ConnectionGone()))
        elif self.parser is not None:
            try:
                self.parser.feed_eof()
            except PeerError as error:
                self.events.append(Failure(error))
        super().connection_lost(exc)
        if self.fast is not None:
            self.fast.backend_progress()

    @property
    def reusable(self) -> bool:
        parser = self.parser
        return (
            not self.closed
            and self.request_complete
            and parser is not None
            and parser.complete
            and not parser.tunnel
            and not self.events
            and parser.keep_alive
        )

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True

    def abandon(self) -> None:
        """Close and forget the exchange: nobody will read its events now. The parser holds the
        queue in a reference cycle (and a Failure queued at connection_lost would add one through
        its traceback), which would keep those bytes until a full garbage collection."""
        self.close()
        self.parser = self._response_parser = None
        self.events.clear()
    @property
    def pool_key(self) -> PoolKey:
        return self.address, self.upstream_transport

    def parked(self) -> None:
        """Going idle in a pool (TLS connections keep their session for the next connection)."""


class TlsUpstreamConnection(UpstreamConnection):
    """An UpstreamConnection whose bytes pass through a `ClientTls` first."""

    def __init__(self, address: Address, upstream_transport: UpstreamTransport) -> None:
        super().__init__(address)
        self.upstream_transport = upstream_transport
        self.tls: ClientTls = upstream_transport.client(address)
        self.handshake: asyncio.Future[None] = self.loop.create_future()
        self._session_kept = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        try:
            self.tls.start()
        except UpstreamTlsFailure as failure:
            self._handshake_failed(failure)
            return
        self._write_tls_output()

    def _write_tls_output(self) -> None:
        ciphertext = self.tls.outgoing()
        if ciphertext and self.transport is not None and not self.closed:
            self.transport.write(ciphertext)

    def _handshake_failed(self, failure: UpstreamTlsFailure) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(failure)
            self.handshake.exception()  # retrieved: `connect` may have given up waiting already
        self._write_tls_output()  # the alert, so the backend logs why
        self.close()

    def data_received(self, data: bytes) -> None:
        tls = self.tls
        handshaking = tls.state is TlsState.HANDSHAKING
        try:
            plaintext = tls.receive(data)
        except UpstreamTlsFailure as failure:
            if handshaking:
                self._handshake_failed(failure)
                return
            self._write_tls_output()
            if self.parser is not None and self.pool is None:
                self.events.append(Failure(failure))
                self.queued(0)
            self.close()
            return
        self._write_tls_output()
        if handshaking and tls.state is TlsState.OPEN and not self.handshake.done():
            self.handshake.set_result(None)
        if plaintext:
            super().data_received(plaintext)
        if tls.state is TlsState.PEER_CLOSED:  # close_notify: nothing more will come
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(
                UpstreamTlsFailure(FailureKind.TLS_HANDSHAKE_FAILED, "the backend closed the connection during the handshake")
            )
            self.handshake.exception()  # retrieved: `connect` may have given up waiting already
        super().connection_lost(exc)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        if self.tls.input_ended:
            raise ConnectionGone()  # the backend's close_notify raced our request: a stale keep-alive
        self.tls.send(data)
        self.transport.write(self.tls.outgoing())

    def close(self) -> None:
        if not self.closed and self.tls.state is not TlsState.BROKEN:
            self._keep_session()
            self.tls.close()
            self._write_tls_output()
        super().close()

    def parked(self) -> None:
        self._keep_session()

    def _keep_session(self) -> None:
        """Once per connection, idle or closing: by then a TLS 1.3 ticket came with the response."""
        if not self._session_kept and self.upstream_transport is not None and self.tls.state is TlsState.OPEN:
            self._session_kept = True
            self.upstream_transport.remember(self.address, self.tls)


class EndpointPool:
    """Idle keep-alive connections to one endpoint, most recently used last.

    One sweep timer per pool (not one per connection: that would be a timer armed and cancelled
    on every request) closes connections idle for longer than IDLE_SECONDS, oldest first.
    """

    def __init__(self, key: PoolKey) -> None:
        self.key = key
        self._idle: list[tuple[UpstreamConnection, float]] = []  # (connection, idle since)
        self._sweep: asyncio.TimerHandle | None = None

    def take(self) -> UpstreamConnection | None:
        while self._idle:
            connection, _ = self._idle.pop()
            connection.pool = None
            if not connection.closed:
                return connection
        return None

    def give_back(self, connection: UpstreamConnection) -> None:
        if not connection.reusable or len(self._idle) >= MAX_IDLE_PER_ENDPOINT:
            connection.close()
            return
        connection.pool = self
        connection.parser = None
        connection._client_backlog = _no_backlog  # idle: no client, and no reference cycle to one
        connection.parked()
        self._idle.append((connection, connection.loop.time()))
        if self._sweep is None:
            self._sweep = connection.loop.call_later(IDLE_SECONDS, self._expire_idle)

    def _expire_idle(self) -> None:
        self._sweep = None
        if not self._idle:
            return
        loop = self._idle[0][0].loop
        expired_before = loop.time() - IDLE_SECONDS
        while self._idle and self._idle[0][1] <= expired_before:
            connection, _ = self._idle.pop(0)
            connection.pool = None
            connection.close()
        if self._idle:
            self._sweep = loop.call_at(self._idle[0][1] + IDLE_SECONDS, self._expire_idle)

    def discard(self, connection: UpstreamConnection) -> None:
        self._idle = [entry for entry in self._idle if entry[0] is not connection]

    def close_all(self) -> None:
        for connection, _ in self._idle:
            connection.pool = None
            connection.close()
        self._idle.clear()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None


async def connect(
    address: Address, timeout: float, upstream_transport: UpstreamTransport | None = None, handshake_timeout: float = 0.0
) -> UpstreamConnection:
    """Open a new connection, and finish its TLS handshake when `upstream_transport` is given.

    Raises OSError or TimeoutError (TCP), UpstreamTlsFailure (TLS, its kind says why)."""
    loop = asyncio.get_running_loop()
    protocol: UpstreamConnection
    if upstream_transport is None:
        async with asyncio.timeout(timeout):
            _, protocol = await loop.create_connection(lambda: UpstreamConnection(address), address.host, address.port)
    else:
        # Built before connecting, so a transport that is not set up fails without a TCP connection.
        tls_protocol = TlsUpstreamConnection(address, upstream_transport)
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: tls_protocol, address.host, address.port)
        try:
            async with asyncio.timeout(handshake_timeout):
                await tls_protocol.handshake
        except TimeoutError:
            tls_protocol.close()
            raise UpstreamTlsFailure(FailureKind.TLS_HANDSHAKE_TIMEOUT, f"no handshake within {handshake_timeout} s") from None
        protocol = tls_protocol
    if protocol._socket is not None:
        protocol._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return protocol
