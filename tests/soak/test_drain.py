"""Graceful drain: SIGTERM during load loses no accepted request, and the process exits 0.

"Accepted" is judged by the backend, which records every request that reached it: each one must
have come back to its client as a 200. Requests in flight at SIGTERM (slow ones, still waiting
for the backend) must complete. Clients that arrive after the listeners closed get a refused or
closed connection, never a 5xx and never a truncated response.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from pathlib import Path

import aiohttp
import trustme

from tests.hostile.proxy_process import Ports, routes_document, write_certificate
from tests.soak.conftest import SERVER_NAME, Traffic, scaled

DRAIN_SECONDS = 5.0
SLOW_SECONDS = 1.5


async def _slow_request(port: int, tls: ssl.SSLContext) -> tuple[int, str]:
    connector = aiohttp.TCPConnector(ssl=tls, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=15)) as session:
        url = f"https://127.0.0.1:{port}/slow/{SLOW_SECONDS}"
        async with session.get(url, server_hostname=SERVER_NAME, headers={"Host": SERVER_NAME}) as response:
            return response.status, await response.text()


async def test_sigterm_under_load_loses_no_accepted_request(
    start_soak_proxy, start_backend, soak_ca: trustme.CA, client_tls, tmp_path: Path
):
    backend = await start_backend("app")
    certificate = write_certificate(soak_ca, tmp_path, "drain", SERVER_NAME)
    rounds = scaled(1)
    totals = {"slow": 0, "ok": 0, "refused": 0, "recorded": 0}
    for _ in range(rounds):
        ports = Ports()
        routes = routes_document(
            ports, {"app": [str(backend.address)]}, [("/", "app")], [certificate.entry()], {"drain": DRAIN_SECONDS}
        )
        proxy = await start_soak_proxy(ports, routes)
        ports = proxy.ports  # fresh ones if a port was taken meanwhile
        backend.received.clear()
        slow = [asyncio.create_task(_slow_request(ports.https, client_tls)) for _ in range(8)]
        traffic = Traffic(ports.https, client_tls, path="/drain", keep_alive_clients=4, new_connection_clients=2).start()
        await asyncio.sleep(0.5)
        ok_before_signal = traffic.ok
        signalled = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(proxy.process.wait, DRAIN_SECONDS + 5)
        exit_seconds = time.monotonic() - signalled
        await asyncio.sleep(0.2)
        await traffic.stop()
        slow_results = await asyncio.gather(*slow)
        assert exit_code == 0, proxy.stderr()[-3000:]
        assert exit_seconds < DRAIN_SECONDS, "drain should end when the last request in flight ends"
        assert slow_results == [(200, "late")] * 8, "a request in flight at SIGTERM was lost"
        recorded = len(backend.received)
        assert recorded == traffic.ok, f"backend saw {recorded} requests, clients got {traffic.ok} answers"
        assert ok_before_signal > 0
        assert all("connection" in failure.lower() or "Connect" in failure for failure in traffic.failures), traffic.failures[:5]
        assert not any(failure[:1].isdigit() for failure in traffic.failures), "a client got an error status during drain"
        totals["slow"] += len(slow_results)
        totals["ok"] += traffic.ok
        totals["refused"] += len(traffic.failures)
        totals["recorded"] += recorded
    print(f"\ndrain: {rounds} SIGTERMs, {totals} (refused = connection-level refusals after the listeners closed)")
