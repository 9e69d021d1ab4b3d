"""The generation feed: how one watcher process hands every published generation to N workers.

Theory of operation
-------------------
`ingress-proxy serve --kubernetes --workers N` runs one *watcher* process (the only one that talks
to the Kubernetes API: it watches, translates, holds the leader Lease and writes Ingress status)
and N *workers* (the data plane, as in standalone `--workers`). The master (proxy/workers.py)
binds, before it forks, the data-plane listeners and one more: a Unix stream socket in a private
directory (mode 0700, created by the master), the *feed*. The watcher inherits the feed socket and
accepts on it; every worker connects to its path.

* `FeedServer` is the watcher's `ConfigurationSink`. `publish` and `update_endpoints` encode the
  change once as a frame and write it to every connected worker. It also keeps the *current*
  configuration with every endpoint update folded in (`with_endpoints`), so a worker that connects
  late — a restarted one — gets the current generation as its first frame, at once.
* `FeedSource` is each worker's `RouteSource`: it reads frames and publishes them into the
  worker's own ProxyServer, which builds the crypto runtime and TLS contexts in that process
  (engines and engine/provider keys are loaded after fork, per worker, as OpenSSL requires).
  A configuration equal to the one it serves is not rebuilt (a restarted watcher republishes the
  same table). The problems of each build (a key that does not load) go back as a frame; the
  watcher hands them to `on_problems` (the Kubernetes source turns them into Events). Building is
  thus asynchronous to `FeedServer.publish`, which returns no problems itself. When the watcher dies the worker keeps serving its last generation and connects
  again; the connection waits in the feed socket's backlog (the master keeps it open) until the
  restarted watcher accepts it and sends the current state after its first full sync.

Frames are an 8-byte big-endian length and a pickle of a frozen `config.model` value. Pickle is
fine here because both ends are processes of one pod running one code base, forked from one
master: there is no version skew, and only processes of our own user can reach the socket (the
directory is 0700 and the watcher checks SO_PEERCRED's uid). Secrets in the model (private keys,
engine URIs with PINs) thus never leave the pod's own processes and never touch a disk.

A worker that stops reading (stuck, or stopped by a debugger) must not grow the watcher's memory
without bound: past `MAX_BUFFERED_BYTES` of unsent frames its connection is closed; it connects
again and starts from the current state, which loses nothing since every frame is idempotent
once the current configuration is resent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import pickle
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from config.model import Address, Configuration, Problem
from config.source import ConfigurationSink

LOG = logging.getLogger("ingress_proxy.generation_feed")

FEED_SOCKET_NAME = "feed.sock"
FRAME_HEADER = struct.Struct(">Q")
# Far above any route table (certificates included) a cluster publishes: a larger length is a
# corrupt stream, and reading it would only exhaust memory.
MAX_FRAME_BYTES = 1 << 30
# Two full configurations queued for a worker that does not read: then it starts over (see above).
MAX_BUFFERED_BYTES = 256 << 20
RECONNECT_DELAY_SECONDS = 0.2  # a worker retrying a feed that is not there yet (master still forking)


@dataclass(frozen=True)
class PublishFrame:
    configuration: Configuration
    number: int  # the watcher's count of publishes; problems come back with it


@dataclass(frozen=True)
class EndpointsFrame:
    backend: str
    endpoints: tuple[Address, ...]


@dataclass(frozen=True)
class ProblemsFrame:
    """Worker → watcher: what building the configuration of publish `number` found."""

    problems: tuple[Problem, ...]
    number: int


Frame = PublishFrame | EndpointsFrame | ProblemsFrame


def encode(frame: Frame) -> bytes:
    payload = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME_HEADER.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """The next frame, or None at a clean end of stream (the watcher went away)."""
    try:
        header = await reader.readexactly(FRAME_HEADER.size)
    except asyncio.IncompleteReadError as error:
        if error.partial:
            raise ConnectionError("generation feed: truncated frame header") from None
        return None
    (length,) = FRAME_HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise ConnectionError(f"generation feed: frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ConnectionError("generation feed: truncated frame") from None
    frame = _unpickle(payload)
    if not isinstance(frame, (PublishFrame, EndpointsFrame, ProblemsFrame)):
        raise ConnectionError(f"generation feed: unexpected frame {type(frame).__name__}")
    return frame


def _unpickle(payload: bytes) -> object:
    """`pickle.loads` with the cyclic GC held off: a route table is tens of thousands of new objects
    and no cycles, yet their allocation triggers collections that rescan the whole heap — 5,000
    Ingresses decoded in 100-185 ms with the collector on, 13-18 ms with it off (this machine)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return pickle.loads(payload)
    finally:
        if collecting:
            gc.enable()


def with_endpoints(configuration: Configuration, backend: str, endpoints: tuple[Address, ...]) -> Configuration:
    """`configuration` with `backend`'s endpoints replaced; unchanged if it has no such backend."""
    backends = tuple(
        dataclasses.replace(candidate, endpoints=endpoints) if candidate.name == backend else candidate
        for candidate in configuration.routes.backends
    )
    if backends == configuration.routes.backends:
        return configuration
    return dataclasses.replace(configuration, routes=dataclasses.replace(configuration.routes, backends=backends))


def bind_feed(directory: Path) -> socket.socket:
    """The feed's listening socket, bound by the master before it forks (directory: mode 0700)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(directory / FEED_SOCKET_NAME))
    sock.listen(64)
    sock.setblocking(False)
    return sock


class FeedServer:
    """The watcher's `ConfigurationSink`: fans every change out to the connected workers."""

    def __init__(self, on_problems: Callable[[tuple[Problem, ...]], None]) -> None:
        self.current: Configuration | None = None
        self.number = 0  # publishes so far: problems about an older one are stale
        self._on_problems = on_problems
        self._workers: set[asyncio.StreamWriter] = set()

    async def serve(self, listening: socket.socket) -> None:
        """Accept workers on the inherited feed socket until cancelled."""
        server = await asyncio.start_unix_server(self._accepted, sock=listening)
        try:
            async with server:
                await server.serve_forever()
        finally:  # the workers see the end of their feed now, not when this process exits
            for writer in list(self._workers):
                writer.transport.abort()
            self._workers.clear()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock: socket.socket = writer.get_extra_info("socket")
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid != os.getuid():
            LOG.error("generation feed: refused a peer of uid %d (not ours)", uid)
            writer.close()
            return
        self._workers.add(writer)
        if self.current is not None:
            self._send(writer, encode(PublishFrame(self.current, self.number)))
        try:
            while (frame := await read_frame(reader)) is not None:
                if isinstance(frame, ProblemsFrame) and frame.number == self.number:
                    self._on_problems(frame.problems)
        except ConnectionError as error:
            LOG.warning("%s; closing that worker's feed", error)
        finally:
            self._workers.discard(writer)
            writer.close()

    def _send(self, writer: asyncio.StreamWriter, frame: bytes) -> None:
        if writer.transport.get_write_buffer_size() + len(frame) > MAX_BUFFERED_BYTES:
            LOG.warning("generation feed: a worker stopped reading; closing its feed so it starts over")
            writer.transport.abort()
            self._workers.discard(writer)
            return
        writer.write(frame)

    def _broadcast(self, frame: Frame) -> None:
        encoded = encode(frame)
        for writer in list(self._workers):
            self._send(writer, encoded)

    # -- ConfigurationSink --------------------------------------------------------------------

    def publish(self, configuration: Configuration) -> tuple[Problem, ...]:
        """Problems from building (a key that does not load) come back later, to `on_problems`."""
        self.current = configuration
        self.number += 1
        self._broadcast(PublishFrame(configuration, self.number))
        return ()

    def update_endpoints(self, backend: str, endpoints: tuple[Address, ...]) -> None:
        if self.current is not None:
            self.current = with_endpoints(self.current, backend, endpoints)
        self._broadcast(EndpointsFrame(backend, endpoints))


class FeedSource:
    """A worker's `config.source.RouteSource`: whatever the watcher publishes, from its feed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.current: Configuration | None = None
        self._problems: tuple[Problem, ...] = ()  # what building `current` found

    async def run(self, sink: ConfigurationSink) -> None:
        # The master forwards SIGHUP to every child; here there is nothing to reload.
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, LOG.info, "SIGHUP: the watcher feeds every change")
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path))
            except OSError as error:
                LOG.debug("generation feed not reachable yet (%s); retrying", error)
                await asyncio.sleep(RECONNECT_DELAY_SECONDS)
                continue
            try:
                await self._follow(reader, writer, sink)
            except ConnectionError as error:
                LOG.error("%s; connecting again", error)
            finally:
                writer.close()
            LOG.info("the watcher went away; serving the last generation until it is back")

    async def _follow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sink: ConfigurationSink) -> None:
        while (frame := await read_frame(reader)) is not None:
            if isinstance(frame, PublishFrame):
                if frame.configuration != self.current:
                    self._problems = sink.publish(frame.configuration)
                    self.current = frame.configuration
                writer.write(encode(ProblemsFrame(self._problems, frame.number)))  # also to a restarted watcher
            elif isinstance(frame, EndpointsFrame) and self.current is not None:
                sink.update_endpoints(frame.backend, frame.endpoints)
                self.current = with_endpoints(self.current, frame.backend, frame.endpoints)
