"""The fast path's one timer per loop (proxy.fast_path.Sweeper): every deadline is acted on once,
never before it passes; an entry a connection moved earlier replaces the later one; entries of
connections that are gone cost nothing."""

from __future__ import annotations

import asyncio
import gc

from proxy import fast_path

PATIENCE_SECONDS = 10.0  # how long a test waits for what must happen: generous, it never waits it out


class WatchedConnection:
    """What the sweeper needs of a ClientConnection."""

    def __init__(self) -> None:
        self.deadline_queued = 0.0
        self.reached: list[float] = []

    def deadline_reached(self, now: float) -> None:
        self.reached.append(now)


class ExchangeInFlight:
    def __init__(self, sweeper: fast_path.Sweeper, deadline: float) -> None:
        self.sweeper = sweeper
        self.deadline = deadline
        self.expired_at: list[float] = []

    def expired(self) -> None:
        self.expired_at.append(asyncio.get_running_loop().time())
        self.sweeper.in_flight.discard(self)  # as FastExchange._hand_over does


async def until(condition: object) -> None:
    async with asyncio.timeout(PATIENCE_SECONDS):
        while not condition():
            await asyncio.sleep(0.01)


async def test_each_deadline_is_reached_once_and_never_early() -> None:
    loop = asyncio.get_running_loop()
    sweeper = fast_path.Sweeper()
    first, second = WatchedConnection(), WatchedConnection()
    start = loop.time()
    sweeper.watch(first, start + 0.05)
    sweeper.watch(second, start + 0.2)
    await until(lambda: first.reached and second.reached)
    assert first.reached[0] >= start + 0.05 and second.reached[0] >= start + 0.2
    await asyncio.sleep(3 * fast_path.TICK_SECONDS)
    assert len(first.reached) == len(second.reached) == 1
    assert first.deadline_queued == second.deadline_queued == 0.0  # both may queue again


async def test_a_later_deadline_keeps_the_queued_entry_an_earlier_one_replaces_it() -> None:
    loop = asyncio.get_running_loop()
    sweeper = fast_path.Sweeper()
    later, earlier = WatchedConnection(), WatchedConnection()
    start = loop.time()
    sweeper.watch(later, start + 0.05)
    sweeper.watch(later, start + 60.0)  # moved later: the connection re-queues when the entry fires
    sweeper.watch(earlier, start + 60.0)
    sweeper.watch(earlier, start + 0.1)  # moved earlier (a head began): a new entry
    await until(lambda: later.reached and earlier.reached)
    assert later.reached[0] < start + 60.0 and earlier.reached[0] >= start + 0.1
    assert earlier.deadline_queued == 0.0  # its 60 s entry is stale: it will be skipped, not acted on


async def test_requests_in_flight_expire_at_their_deadline() -> None:
    loop = asyncio.get_running_loop()
    sweeper = fast_path.Sweeper()
    start = loop.time()
    due, not_due = ExchangeInFlight(sweeper, start + 0.05), ExchangeInFlight(sweeper, start + 60.0)
    sweeper.add_in_flight(due)
    sweeper.add_in_flight(not_due)
    await until(lambda: due.expired_at)
    assert due.expired_at[0] >= start + 0.05 and not not_due.expired_at
    assert sweeper.in_flight == {not_due}


async def test_a_connection_that_is_gone_is_skipped() -> None:
    sweeper = fast_path.Sweeper()
    gone, kept = WatchedConnection(), WatchedConnection()
    now = asyncio.get_running_loop().time()
    sweeper.watch(gone, now + 0.05)
    sweeper.watch(kept, now + 0.1)
    del gone
    gc.collect()
    await until(lambda: kept.reached)
    assert len(kept.reached) == 1
