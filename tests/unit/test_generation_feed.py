"""proxy/generation_feed.py: frames, endpoint folding, and a watcher feeding workers over a real
Unix socket (both ends in this event loop; the sinks record what a ProxyServer would be given)."""

from __future__ import annotations

import asyncio
import pickle
import socket
from pathlib import Path

import pytest

from config.model import Address, Certificate, Configuration, PathType, PemKey, Problem
from proxy import generation_feed
from proxy.generation_feed import (
    FEED_SOCKET_NAME,
    FRAME_HEADER,
    EndpointsFrame,
    FeedServer,
    FeedSource,
    ProblemsFrame,
    PublishFrame,
    bind_feed,
    encode,
    read_frame,
    with_endpoints,
)
from tests.conftest import simple_configuration
from tests.kubernetes.conftest import RecordingSink

A, B, C = Address("10.0.0.1", 80), Address("10.0.0.2", 80), Address("10.0.0.3", 80)
TIMEOUT = 10.0


def configuration(blue: tuple[Address, ...] = (A,), green: tuple[Address, ...] = (B,), **settings: object) -> Configuration:
    return simple_configuration(
        {"blue": list(blue), "green": list(green)}, {"app.example": [("/", PathType.PREFIX, "blue")]}, **settings
    )


@pytest.mark.parametrize(
    ("backend", "endpoints", "expected"),
    [
        ("blue", (C,), configuration(blue=(C,))),
        ("blue", (), configuration(blue=())),
        ("green", (A, C), configuration(green=(A, C))),
        ("absent", (C,), configuration()),
        ("blue", (A,), configuration()),
    ],
    ids=["replace", "empty", "other-backend", "unknown-backend", "same-endpoints"],
)
def test_with_endpoints(backend: str, endpoints: tuple[Address, ...], expected: Configuration) -> None:
    assert with_endpoints(configuration(), backend, endpoints) == expected


def reader_of(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def test_frames_round_trip_secrets_included() -> None:
    key = PemKey(b"-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n")
    certificate = Certificate(b"-----BEGIN CERTIFICATE-----\n", key, ("app.example",), "Secret default/app")
    frames = [
        PublishFrame(configuration(certificates=(certificate,)), 7),
        EndpointsFrame("blue", (C,)),
        ProblemsFrame((Problem("Secret default/app", "certificate left out: no key"),), 7),
    ]
    reader = reader_of(b"".join(encode(frame) for frame in frames))
    assert [await read_frame(reader) for _ in range(4)] == [*frames, None]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (encode(EndpointsFrame("blue", ()))[:5], "truncated frame header"),
        (encode(EndpointsFrame("blue", ()))[:-1], "truncated frame"),
        (FRAME_HEADER.pack(generation_feed.MAX_FRAME_BYTES + 1), "exceeds"),
        (FRAME_HEADER.pack(len(pickle.dumps("x"))) + pickle.dumps("x"), "unexpected frame str"),
    ],
    ids=["short-header", "short-payload", "oversized", "not-a-frame"],
)
async def test_broken_streams_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ConnectionError, match=message):
        await read_frame(reader_of(data))


class Watcher:
    """A FeedServer on its own copy of the master's listening socket, as a watcher process has."""

    def __init__(self, listening: socket.socket) -> None:
        self.problems: list[tuple[Problem, ...]] = []
        self.sink = FeedServer(on_problems=self.problems.append)
        self.task = asyncio.create_task(self.sink.serve(listening.dup()))

    async def stop(self) -> None:  # the process dies: its copy of the socket and its connections close
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def until(predicate: object, timeout: float = TIMEOUT) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_every_worker_gets_every_change_and_a_late_one_the_current_state(tmp_path: Path) -> None:
    listening = bind_feed(tmp_path)
    watcher = Watcher(listening)
    sinks = [RecordingSink(), RecordingSink()]
    sources = [asyncio.create_task(FeedSource(tmp_path / FEED_SOCKET_NAME).run(sink)) for sink in sinks]
    try:
        watcher.sink.publish(configuration())
        await until(lambda: all(sink.configurations == [configuration()] for sink in sinks))
        watcher.sink.update_endpoints("blue", (C,))
        await until(lambda: all(sink.endpoint_updates == [("blue", (C,))] for sink in sinks))
        watcher.sink.publish(configuration(blue=(C,)))  # what the workers serve already: not rebuilt
        watcher.sink.update_endpoints("green", (A,))
        await until(lambda: all(len(sink.endpoint_updates) == 2 for sink in sinks))
        assert all(sink.configurations == [configuration()] for sink in sinks)

        late = RecordingSink()  # a restarted worker: one publish, endpoint updates folded in
        sources.append(asyncio.create_task(FeedSource(tmp_path / FEED_SOCKET_NAME).run(late)))
        await until(lambda: late.configurations == [configuration(blue=(C,), green=(A,))])
        assert late.endpoint_updates == []
    finally:
        for task in sources:
            task.cancel()
        await asyncio.gather(*sources, return_exceptions=True)
        await watcher.stop()
        listening.close()


async def test_a_worker_follows_a_restarted_watcher_and_skips_what_it_already_serves(tmp_path: Path) -> None:
    listening = bind_feed(tmp_path)
    first = Watcher(listening)
    sink = RecordingSink()
    source = asyncio.create_task(FeedSource(tmp_path / FEED_SOCKET_NAME).run(sink))
    try:
        first.sink.publish(configuration())
        await until(lambda: len(sink.configurations) == 1)
        await first.stop()
        await asyncio.sleep(0.1)  # the worker sees the end of its feed and connects again (queued in the backlog)
        second = Watcher(listening)
        second.sink.publish(configuration())  # the new watcher's first full sync: same table
        second.sink.publish(configuration(blue=(C,)))
        await until(lambda: len(sink.configurations) == 2)
        assert sink.configurations == [configuration(), configuration(blue=(C,))]
        await second.stop()
    finally:
        source.cancel()
        await asyncio.gather(source, return_exceptions=True)
        listening.close()


async def test_a_worker_that_stops_reading_is_cut_off_not_buffered_forever(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generation_feed, "MAX_BUFFERED_BYTES", 4 << 20)
    listening = bind_feed(tmp_path)
    watcher = Watcher(listening)
    reader, writer = await asyncio.open_unix_connection(str(tmp_path / FEED_SOCKET_NAME))
    try:
        big = configuration(blue=tuple(Address(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 80) for i in range(20_000)))
        frame_size = len(encode(PublishFrame(big, 1)))
        await asyncio.sleep(0.1)  # accepted
        published = (8 << 20) // frame_size + 2
        for _ in range(published):  # the peer reads nothing meanwhile
            watcher.sink.publish(big)
            await asyncio.sleep(0)
        received = 0
        try:
            while await asyncio.wait_for(read_frame(reader), TIMEOUT) is not None:  # a stream never cut times out
                received += 1
        except ConnectionError:  # cut mid-frame
            pass
        assert received < published
    finally:
        writer.close()
        await watcher.stop()
        listening.close()


class KeyFailingSink(RecordingSink):
    """Building a configuration whose blue backend is on C finds a problem (as a bad key would)."""

    def publish(self, configuration: Configuration) -> tuple[Problem, ...]:
        super().publish(configuration)
        return (BUILD_PROBLEM,) if configuration.routes.backends[0].endpoints == (C,) else ()


BUILD_PROBLEM = Problem("Secret default/app", "certificate left out: the key does not match")


async def test_build_problems_come_back_to_the_watcher_and_stale_ones_are_dropped(tmp_path: Path) -> None:
    listening = bind_feed(tmp_path)
    watcher = Watcher(listening)
    sink = KeyFailingSink()
    source = asyncio.create_task(FeedSource(tmp_path / FEED_SOCKET_NAME).run(sink))
    try:
        watcher.sink.publish(configuration(blue=(C,)))
        await until(lambda: watcher.problems == [(BUILD_PROBLEM,)])
        # Two publishes before the worker answers: the answer about the first is stale on arrival.
        watcher.sink.publish(configuration(blue=(C,), green=(A,)))
        watcher.sink.publish(configuration())
        await until(lambda: len(sink.configurations) == 3)
        await until(lambda: watcher.problems[-1:] == [()])
        assert watcher.problems == [(BUILD_PROBLEM,), ()]
    finally:
        source.cancel()
        await asyncio.gather(source, return_exceptions=True)
        await watcher.stop()
        listening.close()
