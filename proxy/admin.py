"""The admin listener: Prometheus /metrics, liveness /healthz, readiness /readyz."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
import os

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess

from config.model import Address


async def start_admin(address: Address, is_ready: Callable[[], bool]) -> web.AppRunner:
    registry = REGISTRY
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # --workers N: add up every worker's samples
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)

    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if is_ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, address.host, address.port, reuse_address=True).start()
    return runner
