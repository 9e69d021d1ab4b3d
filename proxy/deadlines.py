"""Many deadlines, one timer per event loop: every client connection's TLS handshake timeout, and
the fast path's (`proxy.fast_path`) requests in flight and its connections' idle and head deadlines.

Theory of operation
-------------------
A uvloop TimerHandle is a libuv timer started, stopped and closed: py-spy on the full-handshake
bench rows showed `call_later` in connection_made and its `cancel` after the handshake costing
about 18 µs per connection together, and the fast path would pay as much again per request for its
response deadline. So deadlines here are data, and one `DeadlineSweeper` per event loop keeps a
single loop timer armed at the earliest deadline it knows plus `SWEEP_RESOLUTION`: deadlines that
fall close together share one wake-up, and each fires between its time and `SWEEP_RESOLUTION`
later, never early. Three kinds of deadline, each kept the way its owner uses it:

- `call_later(delay, callback)` → a `Deadline` entry in the heap: the handshake timeout, which
  every TLS (or PROXY protocol) connection sets and nearly every one cancels. `Deadline.cancel()`
  only drops the callback, so a finished or closed connection is not kept alive by it; the sweep
  discards cancelled entries when it reaches them. It answers `cancel()` and `when()` like an
  asyncio TimerHandle, so the connection code that held a TimerHandle works unchanged.
- `watch(connection, when)` → a weak reference in the heap: a connection idle on the fast path
  (its idle deadline, or its head deadline once a head began). Its deadline moves on every
  request, nearly always later; the connection records the time of its queued entry
  (`deadline_queued`) and only an earlier time queues a new one. An entry whose time is no longer
  the connection's `deadline_queued` is stale and skipped; a due one calls `deadline_reached`,
  which acts or watches again for the later time. A connection that is gone costs nothing.
- `add_in_flight(exchange)` → a member of the `in_flight` set: a fast-path request sent to its
  backend, with `deadline` fixed when it was sent. It leaves the set itself (`discard`) when its
  response was written or handed over, so a heap entry per request would pile up stale ones;
  instead each sweep scans the set (a few requests: those waiting for a backend right now), calls
  `expired()` on the due ones (which discard themselves) and re-arms for the earliest of the rest.

One sweeper per event loop (tests run many loops), made on first use by `deadline_sweeper`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import weakref
from collections.abc import Callable
from typing import Protocol

SWEEP_RESOLUTION = 0.05  # seconds a deadline may fire late (the hostile tests allow 0.1 s past header_read)


class Deadline:
    __slots__ = ("_when", "_callback")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self._when = when
        self._callback: Callable[[], object] | None = callback

    def when(self) -> float:
        """The loop time the deadline falls at (as `asyncio.TimerHandle.when`)."""
        return self._when

    def cancel(self) -> None:
        self._callback = None

    def cancelled(self) -> bool:
        return self._callback is None


class Watched(Protocol):
    """What `watch` needs of a connection (proxy.downstream.ClientConnection)."""

    deadline_queued: float  # the time of its entry in the heap; 0.0: none

    def deadline_reached(self, now: float) -> None: ...


class InFlight(Protocol):
    """What `add_in_flight` needs of a request (proxy.fast_path.FastExchange)."""

    deadline: float  # loop time; fixed once added

    def expired(self) -> None: ...  # must leave `in_flight`


class DeadlineSweeper:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, Deadline | weakref.ref[Watched]]] = []
        self._order = itertools.count()  # ties in time keep the order they were set in, never compare entries
        self.in_flight: set[InFlight] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._fires_at = 0.0  # when the timer fires (valid while _timer is set)

    def call_later(self, delay: float, callback: Callable[[], object]) -> Deadline:
        when = self._loop.time() + delay
        deadline = Deadline(when, callback)
        heapq.heappush(self._heap, (when, next(self._order), deadline))
        self._fire_by(when)
        return deadline

    def watch(self, connection: Watched, when: float) -> None:
        """Make sure `connection.deadline_reached` runs at or after `when` (within SWEEP_RESOLUTION)."""
        queued = connection.deadline_queued
        if queued == 0.0 or when < queued:
            connection.deadline_queued = when
            heapq.heappush(self._heap, (when, next(self._order), weakref.ref(connection)))
            self._fire_by(when)

    def add_in_flight(self, exchange: InFlight) -> None:
        self.in_flight.add(exchange)
        self._fire_by(exchange.deadline)

    def pending(self) -> int:
        """Entries in the heap, cancelled and stale ones included (for tests)."""
        return len(self._heap)

    def _fire_by(self, when: float) -> None:
        fires_at = when + SWEEP_RESOLUTION
        if self._timer is None:
            self._fires_at = fires_at
            self._timer = self._loop.call_at(fires_at, self._sweep)
        elif fires_at < self._fires_at:
            self._timer.cancel()
            self._fires_at = fires_at
            self._timer = self._loop.call_at(fires_at, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        now = self._loop.time()
        in_flight = self.in_flight
        if in_flight:
            for exchange in [exchange for exchange in in_flight if exchange.deadline <= now]:
                exchange.expired()
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, entry = heapq.heappop(heap)
            if isinstance(entry, Deadline):
                callback = entry._callback
                if callback is not None:
                    entry._callback = None
                    callback()
            else:
                connection = entry()
                if connection is not None and connection.deadline_queued == when:
                    connection.deadline_queued = 0.0
                    connection.deadline_reached(now)
        if heap:  # callbacks may have armed the timer already: _fire_by keeps the earlier time
            self._fire_by(heap[0][0])
        if in_flight:
            self._fire_by(min(exchange.deadline for exchange in in_flight))


_sweepers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, DeadlineSweeper] = weakref.WeakKeyDictionary()


def deadline_sweeper(loop: asyncio.AbstractEventLoop) -> DeadlineSweeper:
    """The sweeper of `loop` (one per event loop, made on first use)."""
    sweeper = _sweepers.get(loop)
    if sweeper is None:
        sweeper = _sweepers[loop] = DeadlineSweeper(loop)
    return sweeper
