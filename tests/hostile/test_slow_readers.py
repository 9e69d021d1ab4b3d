"""Slow readers cost bounded memory, and give it back (issue 10, item 6).

The attack is `make bench`'s slow-readers row (bench/slow_readers.py): each client completes a
TLS handshake, pipelines 3 requests for a body far larger than any buffer of ours, and then reads
nothing. The proxy must stop reading the backend (and the client) once its buffers for that
connection are full, drop the reader after `idle` seconds of stalled writes, and hand the memory
back. Before the fix, each reader cost ~640 KiB of RSS here and none of it came back.

A proxy of its own (not the folder's shared one): `idle` must outlast the time it takes to open
all readers and watch RSS settle, and the measurement must not see other tests' traffic.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from bench import slow_readers
from proxy.memory import TRIM_DELAY_SECONDS, TRIM_INTERVAL_SECONDS
from tests.hostile.backends import BackendZoo
from tests.hostile.clients import SERVER_NAME
from tests.hostile.proxy_process import Ports, ProxyProcess, routes_document, write_certificate

STALLED_READERS = 150
BODY_BYTES = 1024 * 1024  # per request, as in the issue: 3 MiB per reader, far beyond our buffers
IDLE_SECONDS = 6.0  # opening 150 readers and the settle take ~4 s; then the proxy drops them
# Issue 10's targets are 150 KiB and 10 %. 1,000 readers cost ~140 KiB each (`make bench`, and
# tests/soak at SOAK_SCALE=10); 150 readers here measure 175-185 KiB (fixed costs spread over
# fewer readers), and 8-20 % stays behind (pymalloc arenas). These bounds fail on the old code (~290 KiB here, 86 % kept) and leave room
# for a busy machine while that gap is open (README, "Slow readers").
MAX_GROWTH_PER_READER = 256 * 1024
MAX_RESIDUE_SHARE = 0.35  # RSS after the readers were dropped, above the pre-attack figure
# Dropped after IDLE_SECONDS of stalled writes; proxy.memory trims 1 s after the first drop and
# again at most TRIM_INTERVAL_SECONDS later for the rest; slack for a busy machine.
DROP_WAIT_SECONDS = IDLE_SECONDS + TRIM_DELAY_SECONDS + TRIM_INTERVAL_SECONDS + 3.0


@pytest.fixture
def slow_reader_proxy(zoo: BackendZoo, hostile_ca: trustme.CA, tmp_path: Path) -> Iterator[ProxyProcess]:
    certificate = write_certificate(hostile_ca, tmp_path, "slow", SERVER_NAME)
    timeouts = {"handshake": 10.0, "header_read": 10.0, "idle": IDLE_SECONDS, "backend_response": 10.0, "drain": 2.0}
    ports = Ports()
    document = routes_document(ports, {"app": [str(zoo.app.address)]}, [("/", "app")], [certificate.entry()], timeouts)
    proxy = ProxyProcess(tmp_path, ports, document)
    yield proxy
    assert proxy.stop() == 0, proxy.stderr()[-3000:]
    assert proxy.tracebacks() == [], proxy.stderr()[-5000:]


async def test_stalled_readers_cost_bounded_memory_and_give_it_back(
    slow_reader_proxy: ProxyProcess, trusted_client: ssl.SSLContext
) -> None:
    proxy = slow_reader_proxy
    open_connections: list[float] = []

    def rss() -> int:
        open_connections.append(proxy.metric("ingress_proxy_open_connections", listener="https"))
        return proxy.rss_bytes()

    result = await slow_readers.attack(
        proxy.ports.https, trusted_client, SERVER_NAME, f"/stream/{BODY_BYTES}", "/honest",
        STALLED_READERS, rss, DROP_WAIT_SECONDS, leave_to_proxy=True,
    )
    growth_per_reader = result.bytes_per_reader
    residue = result.rss_after - result.rss_before
    print(
        f"{result.held} stalled readers: RSS {result.rss_before / 2**20:.1f} → {result.rss_held / 2**20:.1f} MiB "
        f"({growth_per_reader / 1024:.1f} KiB each), {result.rss_after / 2**20:.1f} MiB after the proxy dropped "
        f"them; {len(result.honest_latencies)} honest requests, p95 {result.honest_p95_ms:.0f} ms"
    )
    assert result.failed == 0 and result.held == STALLED_READERS
    assert max(open_connections) >= STALLED_READERS, "the readers never reached the proxy"
    assert growth_per_reader <= MAX_GROWTH_PER_READER
    assert open_connections[-1] == 0, "the proxy kept stalled readers past its idle timeout"
    assert residue <= MAX_RESIDUE_SHARE * result.rss_before, f"{residue / 2**20:.1f} MiB not returned"
    assert result.honest_failures == [] and result.honest_latencies, "honest clients went unserved"
