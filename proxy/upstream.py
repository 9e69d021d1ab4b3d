"""Connections to backend endpoints and the keep-alive pools that reuse them.

An `UpstreamConnection` carries one request at a time (no upstream pipelining): the handler calls
`begin_request(method)`, writes the request, then reads response events. Afterwards it is
`reusable` only if the response ended cleanly and both sides allow keep-alive; it then waits in
its endpoint's `EndpointPool` (most recently used first, so surplus connections age out) until
the next request or until the pool's idle timeout closes it. A backend that closes an idle
connection simply removes it from the pool.
"""

from __future__ import annotations

import asyncio
import socket

from config.model import Address
from proxy.flow import ConnectionGone, Failure, FlowControlled
from proxy.http1 import PeerError, ResponseParser

MAX_IDLE_PER_ENDPOINT = 64  # like nginx `keepalive 64`: more idle sockets than this get closed
IDLE_SECONDS = 30.0  # below common backend keep-alive timeouts (nginx 75 s, aiohttp 75 s, Go 90 s)


class UpstreamConnection(FlowControlled):
    def __init__(self, address: Address) -> None:
        super().__init__()
        self.address = address
        self.parser: ResponseParser | None = None
        self.pool: EndpointPool | None = None  # set while idle in a pool
        self.requests_served = 0
        self.response_started = False  # any byte of the current response arrived

    def begin_request(self, method: bytes) -> None:
        self.parser = ResponseParser(method, self.events)
        self.requests_served += 1
        self.response_started = False

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


class EndpointPool:
    """Idle keep-alive connections to one endpoint."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self._idle: list[UpstreamConnection] = []
        self._idle_timers: dict[UpstreamConnection, asyncio.TimerHandle] = {}

    def take(self) -> UpstreamConnection | None:
        while self._idle:
            connection = self._idle.pop()
            self._idle_timers.pop(connection).cancel()
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
        self._idle.append(connection)
        self._idle_timers[connection] = connection.loop.call_later(IDLE_SECONDS, connection.close)

    def discard(self, connection: UpstreamConnection) -> None:
        if connection in self._idle_timers:
            self._idle_timers.pop(connection).cancel()
            self._idle.remove(connection)

    def close_all(self) -> None:
        for connection in list(self._idle):
            connection.close()


async def connect(address: Address, timeout: float) -> UpstreamConnection:
    """Open a new connection; raises OSError or TimeoutError."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, protocol = await loop.create_connection(lambda: UpstreamConnection(address), address.host, address.port)
    sock = protocol.transport.get_extra_info("socket") if protocol.transport else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return protocol
