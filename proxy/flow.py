"""The part both connection shells share: parsed events queued for one consumer, with flow control.

Theory of operation
-------------------
A protocol's `data_received` parses bytes into `events`; one coroutine (the connection's
handler) takes them with `next_event()`. Memory per connection stays bounded because every
buffer a byte can wait in is counted, and reading stops while the count is high:

    backend socket ─► upstream events ─► handler ─► `_out` ─► TLS ─► client transport buffer
    client socket  ─► TLS ─► request events (pipelined requests) ─► handler ─► backend socket

- Reads land in one loop-wide buffer (`asyncio.BufferedProtocol`), of which a protocol offers
  only the room left under READ_HIGH_WATER (at least MIN_READ_SIZE, at most READ_SIZE), so a read
  never brings more than the budget allows however much the kernel holds (uvloop's own reads
  are 256 KiB). A client that keeps up gets full-size reads; one that lags, small ones.
- After a read that queued events, a protocol pauses reading when its unconsumed bytes plus its
  `backlog()` exceed READ_HIGH_WATER, or when more than MAX_QUEUED_EVENTS events wait. (Never
  with an empty queue: bytes a parser holds for a partial head need more bytes, not a consumer.) `backlog()` is what its
  events already became further on: for the client connection, and for the backend connection it
  has borrowed, that is the client's pending response pieces plus its transport's write buffer.
  So a client that stops reading stops us reading its backend, and its own pipelined requests.
- Reading resumes when the queue is empty and the backlog is at most READ_LOW_WATER. That is
  checked when the consumer empties the queue, when it is about to wait for an event, and when
  the client's transport resumes writing (`backlog_shrank()`).

No stall: a paused protocol whose queue is empty waits only on the backlog. The consumer flushes
its pending pieces before it waits, so the backlog is then the transport's write buffer alone; it
exceeds READ_LOW_WATER only above WRITE_HIGH_WATER, where the transport has paused writing and
will call `resume_writing` once it is down to WRITE_LOW_WATER, which re-checks. Hence
READ_LOW_WATER >= WRITE_HIGH_WATER (asserted below).

Writing uses the transport's water marks (set to WRITE_HIGH_WATER / WRITE_LOW_WATER): `drain()`
waits while the transport is paused. The kernel's socket buffers do the real buffering; ours only
need to cover the time until the next `resume_writing`.

Sizes (per connection; compare HAProxy's `tune.bufsize` 16 KiB per direction and nginx's
`proxy_buffer_size` 4-8 KiB with `proxy_buffering off`): a read may cross the high-water mark
by MIN_READ_SIZE, so at most READ_HIGH_WATER + MIN_READ_SIZE bytes are queued or on their way out
per connection, plus the TLS layer's one record (proxy.tls). Measured with `make bench`'s
slow-readers row and tests/hostile/test_slow_readers.py.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

READ_SIZE = 64 * 1024  # the largest read: 16 handler wake-ups per MiB of body (uvloop: 256 KiB)
MIN_READ_SIZE = 4 * 1024  # the smallest read offered while the connection is near its budget
READ_HIGH_WATER = 64 * 1024  # queued + on the way out; HAProxy holds 2 x 16 KiB per stream
READ_LOW_WATER = 32 * 1024  # resume reading once no more than this waits on the way out
MAX_QUEUED_EVENTS = 64  # 32 tiny pipelined requests: their event objects outweigh their bytes
WRITE_HIGH_WATER = 32 * 1024  # transport write buffer: pause the writer above this...
WRITE_LOW_WATER = 8 * 1024  # ...and let it go on below this (the kernel buffer has the rest)
assert READ_LOW_WATER >= WRITE_HIGH_WATER, "a paused reader must be woken by resume_writing"

_read_buffer = memoryview(bytearray(READ_SIZE))  # one event-loop thread: filled and parsed in turn


class ConnectionGone(Exception):
    """The peer closed or reset the connection."""


class Failure:
    """Queued in place of an event: raised to the consumer at its turn, after earlier events."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class FlowControlled(asyncio.BufferedProtocol):
    # Slots: an idle connection holds these and nothing else. `__dict__` stays (created only when a
    # subclass sets an attribute of its own that is not a slot), `__weakref__` for the fast path's sweeper.
    __slots__ = (
        "loop", "transport", "events", "closed", "read_eof", "_unconsumed_bytes", "_reading_paused", "_waiter",
        "_writing_paused", "_drain_waiter", "__dict__", "__weakref__",
    )  # fmt: skip

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.events: deque[Any] = deque()
        self.closed = False
        self.read_eof = False  # the peer half-closed: nothing more will arrive, writing still works
        self._unconsumed_bytes = 0
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # -- protocol side ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports don't subclass asyncio's
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        room = READ_HIGH_WATER - self._unconsumed_bytes - self.backlog()
        return _read_buffer if room >= READ_SIZE else _read_buffer[: max(room, MIN_READ_SIZE)]

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_read_buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(ConnectionGone())
            self._drain_waiter.exception()  # mark retrieved: nobody may be waiting any more

    def eof_received(self) -> bool | None:
        self.read_eof = True
        self._wake()
        return True  # keep the transport open so queued requests can still be answered

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def backlog(self) -> int:
        """Bytes taken from this queue that still wait further on (see the module comment)."""
        return 0

    def queued(self, byte_count: int) -> None:
        """Call after parsing `byte_count` bytes into events."""
        self._unconsumed_bytes += byte_count
        if not self.events:
            return  # bytes held in the parser (a partial head, bounded by http1): only more can end it
        self._wake()
        if not self._reading_paused and self.transport is not None and (
            self._unconsumed_bytes + self.backlog() > READ_HIGH_WATER or len(self.events) > MAX_QUEUED_EVENTS
        ):
            self._reading_paused = True
            self.transport.pause_reading()

    def backlog_shrank(self) -> None:
        """Resume reading if paused, the queue is empty and the backlog is low again."""
        if (
            self._reading_paused
            and not self.events
            and not self.closed
            and self.transport is not None
            and self.backlog() <= READ_LOW_WATER
        ):
            self._reading_paused = False
            self.transport.resume_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError())

    # -- consumer side ------------------------------------------------------------------------

    def ready_event(self) -> Any:
        """The next event if one is already queued, else None, without suspending.

        Hot paths write `self.ready_event() or await self.next_event(t)`: most events arrive
        together (head, body, end), and skipping the coroutine call saves ~1 µs per event.
        """
        return self._pop() if self.events else None

    async def next_event(self, timeout: float) -> Any:
        """The next event; TimeoutError after `timeout` s without one; ConnectionGone at EOF."""
        while not self.events:
            if self.closed or self.read_eof:
                raise ConnectionGone()
            if self._reading_paused:
                self.backlog_shrank()  # the consumer flushed before waiting: maybe read again
            waiter = self._waiter = self.loop.create_future()
            timer = self.loop.call_later(timeout, self._expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return self._pop()

    def _pop(self) -> Any:
        event = self.events.popleft()
        if not self.events:
            self._unconsumed_bytes = 0
            if self._reading_paused:
                self.backlog_shrank()
        if type(event) is Failure:
            raise event.error
        return event

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionGone()
        if self._writing_paused:
            self._drain_waiter = self.loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
