"""Per-route policy in routes-file mode through the real process: `ingress-proxy serve --routes FILE`
(one process for the module's one test, every policy key on some route) → real aiohttp backends,
asked by curl. The in-process tests (tests/e2e/test_route_policy.py, HTTP/1.1 and HTTP/2 clients;
tests/e2e/test_policy_http2_backends.py, h2c/gRPC backends) go deeper per behaviour; this module
proves the routes file's spelling of each one reaches the data plane of the process users run.
Its Kubernetes-mode twin is tests/kubernetes_e2e/test_policy.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import trustme

from tests.e2e.test_route_policy import curl, header
from tests.hostile.proxy_process import Ports, ProxyProcess, listen_section, write_certificate

pytestmark = pytest.mark.e2e

ROUTES = [  # (host, policy, backend)
    ("shop.test", {
        "upstream_host": "internal.test", "request_headers": {"set": {"X-Env": "prod"}, "remove": ["Cookie"]},
        "response_headers": {"set": {"Cache-Control": "no-store"}, "add": {"X-Frame-Options": "DENY"}},
        "read_timeout": 1, "cors": {"allow_origins": ["https://app.test"]},
    }, "app"),
    ("moved.test", {"redirect": {"to": "https://new.test/", "code": 308}}, "app"),
    ("root.test", {"app_root": "/app"}, "app"),
    ("denied.test", {"deny_sources": ["127.0.0.0/8"]}, "app"),
    ("real.test", {"allow_sources": ["203.0.113.0/24"]}, "app"),
    ("rate.test", {"limit_rps": 0.01, "limit_burst": 1}, "app"),  # one token per 100 s: no timing in the test
    ("canary.test", {"canary": {"backend": "canary", "weight": 1000, "weight_total": 1000, "header": "X-Canary"}}, "app"),
    ("sticky.test", {"affinity": {"cookie_name": "route", "max_age": 60}}, "sticky"),
]  # fmt: skip


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


async def test_every_policy_key_through_the_real_process(ca: trustme.CA, start_backend, tmp_path: Path, ca_file: str) -> None:
    app, canary = await start_backend("app"), await start_backend("canary")
    sticky = [await start_backend(f"sticky-{number}") for number in range(3)]
    certificate = write_certificate(ca, tmp_path, "site", *(host for host, _, _ in ROUTES))
    ports = Ports()
    document = {
        "listen": listen_section(ports),
        "tls": {"certificates": [certificate.entry()]},
        "trusted_proxies": ["127.0.0.0/8"],  # the test client's X-Forwarded-For is believed
        "routes": [{"host": host, "policy": policy, "paths": [{"path": "/", "backend": backend}]} for host, policy, backend in ROUTES],
        "backends": {
            "app": {"endpoints": [str(app.address)]},
            "canary": {"endpoints": [str(canary.address)]},
            "sticky": {"endpoints": [str(backend.address) for backend in sticky]},
        },
    }
    process = await asyncio.to_thread(ProxyProcess, tmp_path, ports, document)
    try:
        port = process.ports.https

        async def ask(host: str, target: str = "/", *options: str) -> dict:
            return await curl(port, ca_file, "--http1.1", host, target, *options)

        shop = await ask("shop.test", "/x", "-H", "X-Env: dev", "-H", "Cookie: secret=1", "-H", "Origin: https://app.test")
        seen = json.loads(shop["body"])
        assert header(seen, "Host") == ["internal.test"] and header(seen, "X-Env") == ["prod"] and header(seen, "Cookie") == []
        assert shop["headers"]["cache-control"] == "no-store" and shop["headers"]["x-frame-options"] == "DENY"
        assert shop["headers"]["access-control-allow-origin"] == "https://app.test"
        preflight = await ask("shop.test", "/x", "-X", "OPTIONS", "-H", "Origin: https://app.test", "-H", "Access-Control-Request-Method: PUT")
        assert preflight["status"] == 200 and "PUT" in preflight["headers"]["access-control-allow-methods"]
        assert (await ask("shop.test", "/slow/3"))["status"] == 504  # read_timeout 1 s

        moved = await ask("moved.test", "/a?b")
        assert (moved["status"], moved["headers"]["location"]) == (308, "https://new.test/")
        root = await ask("root.test", "/")
        assert (root["status"], root["headers"]["location"]) == (302, "/app")

        assert (await ask("denied.test"))["status"] == 403
        assert (await ask("real.test"))["status"] == 403
        real = await ask("real.test", "/", "-H", "X-Forwarded-For: 203.0.113.5")
        assert real["status"] == 200 and header(json.loads(real["body"]), "X-Real-IP") == ["203.0.113.5"]

        statuses = [(await ask("rate.test", "/", "-H", "X-Forwarded-For: 192.0.2.1"))["status"] for _ in range(2)]
        assert statuses == [200, 429]
        assert (await ask("rate.test", "/", "-H", "X-Forwarded-For: 192.0.2.2"))["status"] == 200  # per client

        assert json.loads((await ask("canary.test"))["body"])["backend"] == "canary"  # 1000 of weight_total 1000
        assert json.loads((await ask("canary.test", "/", "-H", "X-Canary: never"))["body"])["backend"] == "app"

        first = await ask("sticky.test")
        pair = first["headers"]["set-cookie"].split(";")[0]
        served = json.loads(first["body"])["backend"]
        for _ in range(4):
            assert json.loads((await ask("sticky.test", "/", "-H", f"Cookie: {pair}"))["body"])["backend"] == served
        assert process.metric("ingress_proxy_policy_answers_total", status="429") == 1
    finally:
        assert await asyncio.to_thread(process.stop) == 0
    assert process.tracebacks() == []
