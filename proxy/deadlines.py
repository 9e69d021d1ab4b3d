"""Many deadlines, one timer: `DeadlineSweeper.call_later` in place of `loop.call_later` for the
TLS handshake timeout, which every client connection sets and nearly every one cancels.

Theory of operation. A uvloop TimerHandle is a libuv timer started, stopped and closed: py-spy on
the full-handshake bench rows showed `call_later` in connection_made and its `cancel` after the
handshake costing about 18 µs per connection together. Here a deadline is a small `Deadline` entry
in one heap per event loop; the sweeper keeps a single loop timer armed at the earliest entry plus
`SWEEP_RESOLUTION`, so connections that arrive together share one wake-up. A sweep calls each due
entry that is still live, in deadline order, and re-arms for the next one. `Deadline.cancel()` only
drops the entry's callback (so a finished or closed connection is not kept alive by it); the
sweep discards cancelled entries when it reaches them. A deadline therefore fires between its time
and `SWEEP_RESOLUTION` later, never early.

`Deadline` answers `cancel()` and `when()` like an asyncio TimerHandle, so the connection code that
held a TimerHandle keeps working unchanged. One sweeper per event loop (tests run many loops).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import weakref
from collections.abc import Callable

SWEEP_RESOLUTION = 0.05  # seconds a deadline may fire late: handshake timeouts are whole seconds


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


class DeadlineSweeper:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()  # ties in time keep the order they were set in
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = 0.0  # the deadline the timer was armed for (valid while _timer is set)

    def call_later(self, delay: float, callback: Callable[[], object]) -> Deadline:
        when = self._loop.time() + delay
        deadline = Deadline(when, callback)
        heapq.heappush(self._heap, (when, next(self._order), deadline))
        if self._timer is None or when < self._armed_for:
            self._arm(when)
        return deadline

    def pending(self) -> int:
        """Entries in the heap, cancelled ones included (for tests)."""
        return len(self._heap)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_for = when
        self._timer = self._loop.call_at(when + SWEEP_RESOLUTION, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        heap = self._heap
        now = self._loop.time()
        while heap and heap[0][0] <= now:
            deadline = heapq.heappop(heap)[2]
            callback = deadline._callback
            if callback is not None:
                deadline._callback = None
                callback()
        if heap and (self._timer is None or heap[0][0] < self._armed_for):  # a callback may have armed one
            self._arm(heap[0][0])


_sweepers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, DeadlineSweeper] = weakref.WeakKeyDictionary()


def deadline_sweeper(loop: asyncio.AbstractEventLoop) -> DeadlineSweeper:
    """The sweeper of `loop` (one per event loop, made on first use)."""
    sweeper = _sweepers.get(loop)
    if sweeper is None:
        sweeper = _sweepers[loop] = DeadlineSweeper(loop)
    return sweeper
