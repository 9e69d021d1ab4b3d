"""Connections to backend endpoints and the keep-alive pools that reuse them.

An `UpstreamConnection` carries one request at a time (no upstream pipelining): the handler calls
`begin_request(method, client_backlog)`, writes the request, then reads response events; reading
pauses while the client is behind (`proxy.flow`). Afterwards it is `reusable` only if the
response ended cleanly and both sides allow keep-alive; it then waits in its endpoint's
`EndpointPool` (most recently used first, so surplus connections age out) until the next request
or until the pool's idle sweep closes it. A backend that closes an idle connection simply removes
it from the pool.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from config.model import Address
from proxy.flow import ConnectionGone, Failure, FlowControlled
from proxy.http1 import PeerError, ResponseParser

MAX_IDLE_PER_ENDPOINT = 64  # like nginx `keepalive 64`: more idle sockets than this get closed
IDLE_SECONDS = 30.0  # below common backend keep-alive timeouts (nginx 75 s, aiohttp 75 s, Go 90 s)


def _no_backlog() -> int:
    return 0


class UpstreamConnection(FlowControlled):
    def __init__(self, address: Address) -> None:
        super().__init__()
        self.address = address
        self.parser: ResponseParser | None = None
        self.pool: EndpointPool | None = None  # set while idle in a pool
        self.response_started = False  # any byte of the current response arrived
        self._client_backlog: Callable[[], int] = _no_backlog  # set per request (proxy.flow)

    def begin_request(self, method: bytes, client_backlog: Callable[[], int]) -> None:
        """`client_backlog`: what the client has not yet taken of earlier response bytes; reading
        pauses while it is high, so a client that stops reading stops us reading its backend."""
        self.parser = ResponseParser(method, self.events)
        self.response_started = False
        self._client_backlog = client_backlog

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
        self.queued(len(data))

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

    @property
    def reusable(self) -> bool:
        parser = self.parser
        return (
            not self.closed
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
        self.parser = None
        self.events.clear()


class EndpointPool:
    """Idle keep-alive connections to one endpoint, most recently used last.

    One sweep timer per pool (not one per connection: that would be a timer armed and cancelled
    on every request) closes connections idle for longer than IDLE_SECONDS, oldest first.
    """

    def __init__(self, address: Address) -> None:
        self.address = address
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


async def connect(address: Address, timeout: float) -> UpstreamConnection:
    """Open a new connection; raises OSError or TimeoutError."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, protocol = await loop.create_connection(lambda: UpstreamConnection(address), address.host, address.port)
    sock = protocol.transport.get_extra_info("socket") if protocol.transport else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return protocol
