"""The loop's one DeadlineSweeper (proxy/deadlines.py), as a table of behaviours: each row sets
deadlines of the three kinds (handshake callbacks, watched connections, requests in flight) on a
fresh sweeper and checks that each is acted on once, in order, never early, and that what is
cancelled, stale or gone costs nothing."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Awaitable, Callable

import pytest

from proxy.deadlines import SWEEP_RESOLUTION, DeadlineSweeper, deadline_sweeper

PATIENCE_SECONDS = 10.0  # how long a test waits for what must happen: generous, it never waits it out


class WatchedConnection:
    """What the sweeper needs of a ClientConnection."""

    def __init__(self) -> None:
        self.deadline_queued = 0.0
        self.reached: list[float] = []

    def deadline_reached(self, now: float) -> None:
        self.reached.append(now)


class ExchangeInFlight:
    """What the sweeper needs of a FastExchange."""

    def __init__(self, sweeper: DeadlineSweeper, deadline: float) -> None:
        self.sweeper = sweeper
        self.deadline = deadline
        self.expired_at: list[float] = []

    def expired(self) -> None:
        self.expired_at.append(asyncio.get_running_loop().time())
        self.sweeper.in_flight.discard(self)  # as FastExchange._hand_over does


async def until(condition: Callable[[], object]) -> None:
    async with asyncio.timeout(PATIENCE_SECONDS):
        while not condition():
            await asyncio.sleep(0.005)


def now() -> float:
    return asyncio.get_running_loop().time()


async def callbacks_fire_in_deadline_order_and_never_early(sweeper: DeadlineSweeper) -> None:
    fired: list[tuple[str, float, float]] = []  # (name, when, fired at)

    def arm(name: str, delay: float) -> None:
        deadline = sweeper.call_later(delay, lambda: fired.append((name, deadline.when(), now())))

    arm("late", 0.15)
    arm("early", 0.02)  # set after a later one: re-arms the timer sooner
    arm("middle", 0.08)
    await until(lambda: len(fired) == 3)
    assert [name for name, _, _ in fired] == ["early", "middle", "late"]
    assert all(at >= when for _, when, at in fired)
    assert sweeper.pending() == 0


async def a_cancelled_callback_never_fires_and_lets_its_owner_go(sweeper: DeadlineSweeper) -> None:
    calls: list[str] = []

    class Owner:
        def expired(self) -> None:
            calls.append("owner")

    owner = Owner()
    gone = weakref.ref(owner)
    deadline = sweeper.call_later(0.01, owner.expired)
    sweeper.call_later(0.03, lambda: calls.append("other"))
    deadline.cancel()
    del owner
    gc.collect()
    assert gone() is None, "a cancelled entry must not keep its connection alive"
    await until(lambda: calls == ["other"])
    await asyncio.sleep(SWEEP_RESOLUTION * 2)
    assert calls == ["other"] and deadline.cancelled()


async def many_deadlines_share_one_loop_timer(sweeper: DeadlineSweeper) -> None:
    fired: list[int] = []
    sweeper.call_later(0.05, lambda: fired.append(0))
    timer = sweeper._timer
    for index in range(1, 200):
        sweeper.call_later(0.05, lambda index=index: fired.append(index))
    connection = WatchedConnection()
    sweeper.watch(connection, now() + 0.05)
    sweeper.add_in_flight(ExchangeInFlight(sweeper, now() + 60.0))
    assert sweeper._timer is timer, "later deadlines, of any kind, must not re-arm the timer"
    await until(lambda: len(fired) == 200 and connection.reached)
    assert fired == list(range(200))


async def a_callback_may_set_the_next_deadline(sweeper: DeadlineSweeper) -> None:
    fired: list[str] = []

    def first() -> None:
        fired.append("first")
        sweeper.call_later(0.01, lambda: fired.append("second"))

    sweeper.call_later(0.01, first)
    sweeper.call_later(0.3, lambda: fired.append("third"))
    await until(lambda: len(fired) == 3)
    assert fired == ["first", "second", "third"]


async def each_watched_deadline_is_reached_once_and_never_early(sweeper: DeadlineSweeper) -> None:
    first, second = WatchedConnection(), WatchedConnection()
    start = now()
    sweeper.watch(first, start + 0.05)
    sweeper.watch(second, start + 0.2)
    await until(lambda: first.reached and second.reached)
    assert first.reached[0] >= start + 0.05 and second.reached[0] >= start + 0.2
    await asyncio.sleep(3 * SWEEP_RESOLUTION)
    assert len(first.reached) == len(second.reached) == 1
    assert first.deadline_queued == second.deadline_queued == 0.0  # both may queue again


async def a_later_watch_keeps_the_queued_entry_an_earlier_one_replaces_it(sweeper: DeadlineSweeper) -> None:
    later, earlier = WatchedConnection(), WatchedConnection()
    start = now()
    sweeper.watch(later, start + 0.05)
    sweeper.watch(later, start + 60.0)  # moved later: the connection re-queues when the entry fires
    sweeper.watch(earlier, start + 60.0)
    sweeper.watch(earlier, start + 0.1)  # moved earlier (a head began): a new entry
    await until(lambda: later.reached and earlier.reached)
    assert later.reached[0] < start + 60.0 and earlier.reached[0] >= start + 0.1
    assert earlier.deadline_queued == 0.0  # its 60 s entry is stale: it will be skipped, not acted on


async def a_watched_connection_that_is_gone_is_skipped(sweeper: DeadlineSweeper) -> None:
    gone, kept = WatchedConnection(), WatchedConnection()
    sweeper.watch(gone, now() + 0.05)
    sweeper.watch(kept, now() + 0.1)
    del gone
    gc.collect()
    await until(lambda: kept.reached)
    assert len(kept.reached) == 1


async def requests_in_flight_expire_at_their_deadline(sweeper: DeadlineSweeper) -> None:
    start = now()
    not_due, due = ExchangeInFlight(sweeper, start + 60.0), ExchangeInFlight(sweeper, start + 0.05)
    sweeper.add_in_flight(not_due)
    sweeper.add_in_flight(due)  # earlier than the armed timer: re-arms it sooner
    await until(lambda: due.expired_at)
    assert due.expired_at[0] >= start + 0.05 and not not_due.expired_at
    assert sweeper.in_flight == {not_due}
    assert sweeper._timer is not None and sweeper._timer.when() >= start + 60.0, "re-armed for the one left"


async def a_request_that_left_in_time_is_never_expired(sweeper: DeadlineSweeper) -> None:
    start = now()
    answered, late = ExchangeInFlight(sweeper, start + 0.05), ExchangeInFlight(sweeper, start + 0.1)
    sweeper.add_in_flight(answered)
    sweeper.add_in_flight(late)
    sweeper.in_flight.discard(answered)  # its response was written (FastExchange._finish)
    await until(lambda: late.expired_at)
    assert not answered.expired_at and not sweeper.in_flight


async def all_three_kinds_share_the_timer_and_none_fires_early(sweeper: DeadlineSweeper) -> None:
    start = now()
    connection, exchange = WatchedConnection(), ExchangeInFlight(sweeper, start + 0.25)
    handshake_fired: list[float] = []
    sweeper.add_in_flight(exchange)
    sweeper.watch(connection, start + 0.15)
    handshake = sweeper.call_later(0.02, lambda: handshake_fired.append(now()))
    await until(lambda: handshake_fired and connection.reached and exchange.expired_at)
    assert handshake_fired[0] >= handshake.when() and connection.reached[0] >= start + 0.15
    assert exchange.expired_at[0] >= start + 0.25
    assert sweeper._timer is None and not sweeper.in_flight and sweeper.pending() == 0  # nothing left to wake for


BEHAVIOURS: list[Callable[[DeadlineSweeper], Awaitable[None]]] = [
    callbacks_fire_in_deadline_order_and_never_early,
    a_cancelled_callback_never_fires_and_lets_its_owner_go,
    many_deadlines_share_one_loop_timer,
    a_callback_may_set_the_next_deadline,
    each_watched_deadline_is_reached_once_and_never_early,
    a_later_watch_keeps_the_queued_entry_an_earlier_one_replaces_it,
    a_watched_connection_that_is_gone_is_skipped,
    requests_in_flight_expire_at_their_deadline,
    a_request_that_left_in_time_is_never_expired,
    all_three_kinds_share_the_timer_and_none_fires_early,
]


@pytest.mark.parametrize("behaviour", BEHAVIOURS, ids=lambda behaviour: behaviour.__name__)
async def test_sweeper(behaviour: Callable[[DeadlineSweeper], Awaitable[None]]) -> None:
    await behaviour(DeadlineSweeper(asyncio.get_running_loop()))


async def test_one_sweeper_per_loop() -> None:
    loop = asyncio.get_running_loop()
    assert deadline_sweeper(loop) is deadline_sweeper(loop)
