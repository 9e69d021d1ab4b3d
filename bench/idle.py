"""Memory per idle TLS connection: open many handshaken connections, compare the proxy's RSS.

The client is asyncio on the generator core. A warm-up batch is opened and closed first so the
baseline already includes allocator arenas and lazily built per-process state; then `count`
connections complete their handshake and send nothing. After a settling pause (the proxy reads
the client's Finished and sends its tickets), the proxy's process-tree RSS is read, the
connections that the proxy closed meanwhile are counted as errors, and all are closed.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path

from bench.certs import SERVER_NAME
from bench.machine import tree_rss_bytes

HANDSHAKES_IN_FLIGHT = 64
WARM_UP_CONNECTIONS = 100
SETTLE_SECONDS = 1.0
CONNECT_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class IdleResult:
    requested: int
    held: int  # connections still open when RSS was read
    failed: int  # handshakes that did not complete
    dropped: int  # completed, then closed by the proxy before the RSS reading
    rss_before: int
    rss_after: int

    @property
    def bytes_per_connection(self) -> float:
        return (self.rss_after - self.rss_before) / max(self.held, 1)


def measure_idle_rss(port: int, ca: Path, proxy_pid: int, count: int) -> IdleResult:
    return asyncio.run(_measure(port, ca, proxy_pid, count))


async def _open(
    port: int, context: ssl.SSLContext, count: int
) -> tuple[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], int]:
    in_flight = asyncio.Semaphore(HANDSHAKES_IN_FLIGHT)

    async def open_one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with in_flight:
            return await asyncio.wait_for(
                asyncio.open_connection(
                    "127.0.0.1", port, ssl=context, server_hostname=SERVER_NAME
                ),
                CONNECT_TIMEOUT_SECONDS,
            )

    outcomes = await asyncio.gather(*(open_one() for _ in range(count)), return_exceptions=True)
    opened = [outcome for outcome in outcomes if isinstance(outcome, tuple)]
    return opened, count - len(opened)


async def _close(connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _reader, writer in connections:
        writer.close()
    await asyncio.gather(
        *(asyncio.wait_for(writer.wait_closed(), 5) for _reader, writer in connections),
        return_exceptions=True,
    )


async def _measure(port: int, ca: Path, proxy_pid: int, count: int) -> IdleResult:
    context = ssl.create_default_context(cafile=str(ca))
    warm_up, _ = await _open(port, context, WARM_UP_CONNECTIONS)
    await _close(warm_up)
    await asyncio.sleep(SETTLE_SECONDS)
    rss_before = tree_rss_bytes(proxy_pid)
    connections, failed = await _open(port, context, count)
    await asyncio.sleep(SETTLE_SECONDS)
    dropped = sum(1 for reader, _writer in connections if reader.at_eof())
    rss_after = tree_rss_bytes(proxy_pid)
    await _close(connections)
    return IdleResult(
        requested=count,
        held=len(connections) - dropped,
        failed=failed,
        dropped=dropped,
        rss_before=rss_before,
        rss_after=rss_after,
    )
