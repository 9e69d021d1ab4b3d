"""DeadlineSweeper (proxy/deadlines.py): many deadlines on one loop timer, never early, in order."""

from __future__ import annotations

import asyncio
import gc
import weakref

from proxy.deadlines import SWEEP_RESOLUTION, DeadlineSweeper, deadline_sweeper


async def _until(condition, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def test_deadlines_fire_in_deadline_order_and_never_early() -> None:
    loop = asyncio.get_running_loop()
    sweeper = DeadlineSweeper(loop)
    fired: list[tuple[str, float, float]] = []  # (name, when, fired at)

    def arm(name: str, delay: float) -> None:
        deadline = sweeper.call_later(delay, lambda: fired.append((name, deadline.when(), loop.time())))

    arm("late", 0.15)
    arm("early", 0.02)  # set after a later one: re-arms the timer sooner
    arm("middle", 0.08)
    await _until(lambda: len(fired) == 3)
    assert [name for name, _, _ in fired] == ["early", "middle", "late"]
    assert all(at >= when for _, when, at in fired)
    assert sweeper.pending() == 0


async def test_a_cancelled_deadline_never_fires_and_lets_its_owner_go() -> None:
    sweeper = DeadlineSweeper(asyncio.get_running_loop())
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
    await _until(lambda: calls == ["other"])
    await asyncio.sleep(SWEEP_RESOLUTION * 2)
    assert calls == ["other"] and deadline.cancelled()


async def test_many_deadlines_share_one_loop_timer() -> None:
    sweeper = DeadlineSweeper(asyncio.get_running_loop())
    fired: list[int] = []
    sweeper.call_later(0.05, lambda: fired.append(0))
    timer = sweeper._timer
    for index in range(1, 200):
        sweeper.call_later(0.05, lambda index=index: fired.append(index))
    assert sweeper._timer is timer, "later deadlines must not re-arm the timer"
    await _until(lambda: len(fired) == 200)
    assert fired == list(range(200))


async def test_a_callback_may_set_the_next_deadline() -> None:
    sweeper = deadline_sweeper(asyncio.get_running_loop())
    assert deadline_sweeper(asyncio.get_running_loop()) is sweeper
    fired: list[str] = []

    def first() -> None:
        fired.append("first")
        sweeper.call_later(0.01, lambda: fired.append("second"))

    sweeper.call_later(0.01, first)
    sweeper.call_later(0.3, lambda: fired.append("third"))
    await _until(lambda: len(fired) == 3)
    assert fired == ["first", "second", "third"]
