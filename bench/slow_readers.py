"""Memory per stalled reader: clients that pipeline large responses, then stop reading.

The attack of issue 10: each client completes a TLS handshake, sends `PIPELINED` requests for a
large body in one write, and then reads nothing. A proxy that keeps reading its backend buffers
the responses; one with flow control holds a bounded amount per connection and lets the kernel's
socket buffers (not its RSS) absorb the rest. The client keeps its own share small: a 4 KiB
receive buffer set before connecting, and its TLS transport paused as soon as the requests are
sent.

While the readers are held, one honest client sends small requests one after another and records
each latency. Then the readers are closed (or left for the proxy to drop) and the proxy's RSS is
read again after `after_seconds`.
The same code drives the bench row (`bench.rows`) and the hostile and soak tests.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

CLIENT_RECEIVE_BUFFER = 4096  # the attacker's kernel buffer: keep what the attack costs it small
PIPELINED = 3  # requests per stalled reader, as in the attack
CONNECTS_IN_FLIGHT = 64
CONNECT_TIMEOUT_SECONDS = 20.0
SETTLE_SECONDS = 1.0  # the proxy fills the socket buffers and stops reading its backends
MIN_SETTLE_POLLS = 3  # hold the readers at least this many SETTLE_SECONDS (honest requests run)
MAX_SETTLE_POLLS = 20  # at most this many SETTLE_SECONDS waits for RSS to stop rising
SETTLED_GROWTH = 0.02  # RSS rose by less than this share in one wait: settled
HONEST_TIMEOUT_SECONDS = 10.0
HONEST_PAUSE_SECONDS = 0.02


@dataclass
class SlowReaderResult:
    requested: int
    held: int  # readers still open when the held RSS was read
    failed: int  # connections or handshakes that did not complete
    rss_before: int
    rss_held: int  # highest RSS seen while the readers were held
    rss_after: int  # `after_seconds` after they were closed
    honest_latencies: list[float] = field(default_factory=list)  # seconds, one per request
    honest_failures: list[str] = field(default_factory=list)

    @property
    def bytes_per_reader(self) -> float:
        return (self.rss_held - self.rss_before) / max(self.held, 1)

    @property
    def honest_p95_ms(self) -> float:
        if not self.honest_latencies:
            return float("nan")
        ordered = sorted(self.honest_latencies)
        return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000


def request_bytes(host: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


async def open_stalled_reader(
    port: int, context: ssl.SSLContext, server_name: str, request: bytes
) -> asyncio.StreamWriter:
    """One client: small receive buffer, handshake, `PIPELINED` requests, then no reading at all."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RECEIVE_BUFFER)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        _, writer = await asyncio.open_connection(sock=sock, ssl=context, server_hostname=server_name)
    except BaseException:
        sock.close()
        raise
    writer.write(request * PIPELINED)
    writer.transport.pause_reading()
    return writer


async def _honest_client(
    port: int, context: ssl.SSLContext, server_name: str, request: bytes, stop: asyncio.Event,
    result: SlowReaderResult,
) -> None:
    """Small requests on fresh connections (a new visitor each time), one at a time, until `stop`."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            async with asyncio.timeout(HONEST_TIMEOUT_SECONDS):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=context, server_hostname=server_name
                )
                try:
                    writer.write(request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
                    answer = await reader.read()
                finally:
                    writer.close()
            if not answer.startswith(b"HTTP/1.1 200 "):
                result.honest_failures.append(f"answer {answer[:40]!r}")
            else:
                result.honest_latencies.append(time.monotonic() - started)
        except (OSError, TimeoutError, ssl.SSLError) as error:
            result.honest_failures.append(f"{type(error).__name__}: {error}")
        await asyncio.sleep(HONEST_PAUSE_SECONDS)


async def _close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.transport.abort()  # the attacker just goes away: no close_notify to wait on
    await asyncio.sleep(0)


async def _settled_rss(rss: Callable[[], int]) -> int:
    """Wait until the proxy's RSS stops rising (its buffers are full); the highest figure seen."""
    highest = rss()
    for poll in range(MAX_SETTLE_POLLS):
        await asyncio.sleep(SETTLE_SECONDS)
        now = rss()
        rising = now > highest * (1 + SETTLED_GROWTH)
        highest = max(highest, now)
        if not rising and poll + 1 >= MIN_SETTLE_POLLS:
            break
    return highest


async def attack(
    port: int,
    context: ssl.SSLContext,
    server_name: str,
    large_path: str,
    small_path: str,
    count: int,
    rss: Callable[[], int],
    after_seconds: float,
    leave_to_proxy: bool = False,
) -> SlowReaderResult:
    """Hold `count` stalled readers, measure, drop them, measure again after `after_seconds`.

    `leave_to_proxy`: don't close the readers before that last measurement, so the proxy must
    drop them itself (its idle timeout, like nginx's send_timeout); they are closed afterwards."""
    large, small = request_bytes(server_name, large_path), request_bytes(server_name, small_path)
    in_flight = asyncio.Semaphore(CONNECTS_IN_FLIGHT)

    async def open_one() -> asyncio.StreamWriter:
        async with in_flight:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                return await open_stalled_reader(port, context, server_name, large)

    result = SlowReaderResult(count, 0, 0, rss(), 0, 0)
    outcomes = await asyncio.gather(*(open_one() for _ in range(count)), return_exceptions=True)
    writers = [outcome for outcome in outcomes if isinstance(outcome, asyncio.StreamWriter)]
    result.failed = count - len(writers)
    stop = asyncio.Event()
    honest = asyncio.create_task(_honest_client(port, context, server_name, small, stop, result))
    try:
        result.rss_held = await _settled_rss(rss)
        result.held = sum(1 for writer in writers if not writer.transport.is_closing())
    finally:
        stop.set()
        await honest
        if not leave_to_proxy:
            await _close_all(writers)
    await asyncio.sleep(after_seconds)
    result.rss_after = rss()
    if leave_to_proxy:
        await _close_all(writers)
    return result
