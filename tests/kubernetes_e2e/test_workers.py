"""`serve --kubernetes --workers 2` through the real CLI: one watcher feeds two workers.

Which process answered a request is read from the kernel, not from anything the proxy says: the
client's TCP connection is looked up in /proc/net/tcp (by its local port) and its socket inode in
each process's /proc/PID/fd. The same tables show which processes talk to the API server (only the
watcher may: it alone holds the Lease and writes status).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.kubernetes_e2e.conftest import (
    START_TIMEOUT,
    Cluster,
    ControllerProcess,
    StartBackends,
    StartController,
    eventually,
)
from tests.kubernetes_e2e.objects import endpoint_slice, ingress, ingress_class, service

CHANGE_DEADLINE = 5.0  # generous: two workers and a watcher share this 2-core machine with other tests
MAX_CONNECTIONS_TO_MEET_A_WORKER = 200  # the kernel picks the accepting worker; give both a fair chance
LISTEN_STATE = "0A"  # /proc/net/tcp's st column for a listening socket


# --- the kernel's view -------------------------------------------------------------------------


def children(parent: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found.add(int(entry.name))
    return found


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for descriptor in descriptors:
        try:
            target = os.readlink(descriptor)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


@dataclass(frozen=True)
class TcpSocket:
    local_port: int
    remote_port: int
    state: str
    inode: int


def tcp_sockets() -> list[TcpSocket]:
    sockets = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
            sockets.append(TcpSocket(int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state, inode))
    return sockets


@dataclass(frozen=True)
class Processes:
    watcher: int
    workers: frozenset[int]


def processes(controller: ControllerProcess) -> Processes:
    """The master's children: the workers hold the https listener, the watcher does not."""
    (listener,) = [s.inode for s in tcp_sockets() if s.local_port == controller.https_port and s.state == LISTEN_STATE]
    workers = frozenset(pid for pid in children(controller.process.pid) if listener in socket_inodes(pid))
    (watcher,) = children(controller.process.pid) - workers
    return Processes(watcher, workers)


async def settled(controller: ControllerProcess) -> Processes | None:
    """`processes(controller)`, or None while a child is being replaced (exited, not yet forked)."""
    try:
        return processes(controller)
    except ValueError:
        return None


def owner(server_port: int, client_port: int, candidates: frozenset[int]) -> int | None:
    """Which of `candidates` holds the server end of the connection from `client_port`."""
    inodes = {s.inode for s in tcp_sockets() if s.local_port == server_port and s.remote_port == client_port}
    owners = [pid for pid in candidates if socket_inodes(pid) & inodes]
    return owners[0] if len(owners) == 1 else None


def talking_to(port: int, candidates: set[int]) -> set[int]:
    """The processes among `candidates` with a TCP connection to `port` (the API server)."""
    inodes = {s.inode for s in tcp_sockets() if s.remote_port == port}
    return {pid for pid in candidates if socket_inodes(pid) & inodes}


# --- a keep-alive HTTP/1.1 client that knows its connection -----------------------------------


class KeepAlive:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.local_port: int = writer.get_extra_info("sockname")[1]

    @classmethod
    async def open(cls, port: int) -> KeepAlive:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def get(self, host: str, path: str = "/") -> tuple[int, Any]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:] if line)}
        assert headers.get("connection", "").lower() != "close", headers
        body = await asyncio.wait_for(self.reader.readexactly(int(headers["content-length"])), 5)
        return status, json.loads(body) if headers.get("content-type", "").startswith("application/json") else body

    async def backend(self, host: str) -> str | None:
        status, body = await self.get(host)
        return body.get("backend") if status == 200 and isinstance(body, dict) else None

    def close(self) -> None:
        self.writer.close()


async def one_connection_per_worker(port: int, workers: frozenset[int]) -> dict[int, KeepAlive]:
    """Open connections until each worker holds one; the others are closed again."""
    held: dict[int, KeepAlive] = {}
    spare: list[KeepAlive] = []
    try:
        for _ in range(MAX_CONNECTIONS_TO_MEET_A_WORKER):
            connection = await KeepAlive.open(port)
            await connection.get("probe.invalid")  # answered (404): accepted by a worker by now
            pid = owner(port, connection.local_port, workers)
            if pid is not None and pid not in held:
                held[pid] = connection
                if set(held) == workers:
                    return held
            else:
                spare.append(connection)
        raise AssertionError(f"{MAX_CONNECTIONS_TO_MEET_A_WORKER} connections never reached every worker: {set(held)} of {workers}")
    finally:
        for connection in spare:
            connection.close()


async def until_both(connections: dict[int, KeepAlive], host: str, expected: str, what: str) -> None:
    for pid, connection in connections.items():
        await eventually(lambda: connection.backend(host), lambda name: name == expected, CHANGE_DEADLINE, f"{what} (worker {pid})")


# --- the tests ---------------------------------------------------------------------------------


async def seed(cluster: Cluster, start_backends: StartBackends) -> list[str]:
    """Services blue and green (one endpoint each) and app.example → blue; returns green's spare host."""
    blue, green, green_spare = await start_backends(["blue", "green", "green-2"])
    await cluster.networking.create_ingress_class(ingress_class())
    for backend in (blue, green):
        await cluster.core.create_namespaced_service("default", service(backend.name, [("http", 80, backend.port)]))
        slice_ = endpoint_slice(backend.name, [backend.host], [("http", backend.port)])
        await cluster.discovery.create_namespaced_endpoint_slice("default", slice_)
    await cluster.networking.create_namespaced_ingress("default", ingress("app", "app.example", "blue"))
    return [green_spare.host, str(green_spare.port)]


async def test_both_workers_serve_every_change_and_one_survives_the_others_death(
    cluster: Cluster, start_controller: StartController, start_backends: StartBackends
) -> None:
    spare_host, spare_port = await seed(cluster, start_backends)
    controller = await start_controller(cluster, "--workers", "2", "--publish-status-address", "192.0.2.9")
    found = processes(controller)
    assert len(found.workers) == 2
    connections = await one_connection_per_worker(controller.http_port, found.workers)
    await until_both(connections, "app.example", "blue", "initial table")

    # An Ingress change (full rebuild) and an EndpointSlice change (fast path) reach both workers,
    # each on the keep-alive connection it already holds.
    await cluster.networking.replace_namespaced_ingress("app", "default", ingress("app", "app.example", "green"))
    await until_both(connections, "app.example", "green", "Ingress change")
    moved = endpoint_slice("green", [spare_host], [("http", int(spare_port))])
    await cluster.discovery.replace_namespaced_endpoint_slice("green-slice", "default", moved)
    await until_both(connections, "app.example", "green-2", "EndpointSlice change")

    # Status and the Lease: written and held by the watcher, the one child that talks to the API.
    await eventually(lambda: cluster.ingress_status("app"), lambda ips: ips == ["192.0.2.9"], CHANGE_DEADLINE, "status")
    assert talking_to(cluster.server.port, {found.watcher, *found.workers}) == {found.watcher}
    lease = await cluster.coordination.read_namespaced_lease("ingress-proxy-leader", "default")
    assert lease.spec.holder_identity

    # One worker dies: the other's keep-alive connection goes on; the restarted one serves the
    # current table (the endpoint update included) on fresh connections.
    victim, survivor = sorted(found.workers)
    os.kill(victim, signal.SIGKILL)
    assert await connections[survivor].backend("app.example") == "green-2"
    await eventually(
        lambda: settled(controller),
        lambda now: now is not None and len(now.workers) == 2 and victim not in now.workers,
        START_TIMEOUT,
        f"worker {victim} restarted\n{controller.log()}",
    )
    restarted = processes(controller)
    assert restarted.watcher == found.watcher and survivor in restarted.workers
    (newcomer,) = restarted.workers - {survivor}
    connections[victim].close()
    again = await one_connection_per_worker(controller.http_port, restarted.workers)
    assert await again[newcomer].backend("app.example") == "green-2"
    assert await connections[survivor].backend("app.example") == "green-2"
    for connection in [*connections.values(), *again.values()]:
        connection.close()
    assert controller.process.returncode is None
    assert await controller.stop() == 0


async def test_a_dead_watcher_is_restarted_while_the_workers_keep_serving(
    cluster: Cluster, start_controller: StartController, start_backends: StartBackends
) -> None:
    await seed(cluster, start_backends)
    controller = await start_controller(cluster, "--workers", "2", "--publish-status-address", "192.0.2.9")
    found = processes(controller)
    connections = await one_connection_per_worker(controller.http_port, found.workers)
    await until_both(connections, "app.example", "blue", "initial table")
    await eventually(lambda: cluster.ingress_status("app"), lambda ips: ips == ["192.0.2.9"], CHANGE_DEADLINE, "status")
    first_holder = (await cluster.coordination.read_namespaced_lease("ingress-proxy-leader", "default")).spec.holder_identity

    os.kill(found.watcher, signal.SIGKILL)
    for connection in connections.values():  # no watcher at this moment: the last generation serves
        assert await connection.backend("app.example") == "blue"
    await eventually(
        lambda: settled(controller),
        lambda now: now is not None and now.watcher != found.watcher,
        START_TIMEOUT,
        f"watcher restarted\n{controller.log()}",
    )
    assert processes(controller).workers == found.workers  # the workers were not touched

    await cluster.networking.replace_namespaced_ingress("app", "default", ingress("app", "app.example", "green"))
    await until_both(connections, "app.example", "green", "a change after the watcher restarted")
    restarted = processes(controller)
    assert talking_to(cluster.server.port, {restarted.watcher, *restarted.workers}) == {restarted.watcher}
    # The master chose the identity before forking: the restarted watcher takes its own Lease back.
    lease = await cluster.coordination.read_namespaced_lease("ingress-proxy-leader", "default")
    assert lease.spec.holder_identity == first_holder
    for connection in connections.values():
        connection.close()
    assert await controller.stop() == 0
