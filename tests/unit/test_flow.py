"""proxy.flow's reading rules on a real transport (a socketpair), without HTTP or TLS.

`Probe` queues every read as one event and reports a backlog the test sets, standing in for the
client's pending response bytes. Each test checks `transport.is_reading()`, the transport's own
word on whether it reads.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from proxy.flow import MIN_READ_SIZE, READ_HIGH_WATER, READ_LOW_WATER, READ_SIZE, FlowControlled


class Probe(FlowControlled):
    def __init__(self, queue_events: bool = True) -> None:
        super().__init__()
        self.pending = 0  # what the test says is still on its way out
        self.queue_events = queue_events
        self.arrived = asyncio.Event()

    def backlog(self) -> int:
        return self.pending

    def data_received(self, data: bytes) -> None:
        if self.queue_events:
            self.events.append(data)
        self.queued(len(data))
        self.arrived.set()


@pytest.fixture
async def pair() -> AsyncIterator[tuple[socket.socket, socket.socket]]:
    ours, peer = socket.socketpair()
    yield ours, peer
    peer.close()


async def _connect(probe: Probe, sock: socket.socket) -> asyncio.Transport:
    transport, _ = await asyncio.get_running_loop().create_connection(lambda: probe, sock=sock)
    return transport  # type: ignore[return-value]


async def _receive(probe: Probe, peer: socket.socket, data: bytes) -> None:
    probe.arrived.clear()
    peer.send(data)
    await asyncio.wait_for(probe.arrived.wait(), 5)


async def test_reading_pauses_while_the_backlog_is_high_and_resumes_below_the_low_mark(pair) -> None:
    ours, peer = pair
    probe = Probe()
    transport = await _connect(probe, ours)
    probe.pending = READ_HIGH_WATER  # the client took nothing of what we sent it
    await _receive(probe, peer, b"x")
    assert not transport.is_reading()
    assert probe.ready_event() == b"x"  # the queue is empty now, but the backlog is still high
    assert not transport.is_reading()
    probe.pending = READ_LOW_WATER + 1
    probe.backlog_shrank()
    assert not transport.is_reading()
    probe.pending = READ_LOW_WATER  # e.g. resume_writing: the client read most of it
    probe.backlog_shrank()
    assert transport.is_reading()
    transport.close()


async def test_a_queue_that_is_ahead_of_its_consumer_pauses_until_emptied(pair) -> None:
    ours, peer = pair
    probe = Probe()
    transport = await _connect(probe, ours)
    await _receive(probe, peer, b"y" * (READ_HIGH_WATER // 2))
    assert transport.is_reading()
    probe.queued(READ_HIGH_WATER)  # as if a second read had queued this much more
    assert not transport.is_reading()
    probe.ready_event()
    assert transport.is_reading()  # nothing queued, nothing on its way out
    transport.close()


async def test_bytes_a_parser_holds_without_an_event_never_pause_reading(pair) -> None:
    """A partial response head produces no event: only more bytes can complete it."""
    ours, peer = pair
    probe = Probe(queue_events=False)
    transport = await _connect(probe, ours)
    probe.pending = READ_HIGH_WATER
    await _receive(probe, peer, b"H" * 1000)
    assert transport.is_reading()
    transport.close()


@pytest.mark.parametrize(
    ("backlog", "expected"),
    [
        (0, READ_SIZE),
        (READ_HIGH_WATER - 10_000, 10_000),
        (READ_HIGH_WATER - 100, MIN_READ_SIZE),
        (10 * READ_HIGH_WATER, MIN_READ_SIZE),
    ],
)
async def test_the_read_buffer_offered_is_the_room_left_in_the_budget(backlog: int, expected: int) -> None:
    probe = Probe()
    probe.pending = backlog
    assert len(probe.get_buffer(-1)) == expected
