"""Per-route policy in Kubernetes mode, end to end: ingress-nginx annotations and ConfigMap keys on
objects in the fake API server → `ingress-proxy serve --kubernetes` (the real process) → real
aiohttp backends that echo what reached them, asked by aiohttp clients. The routes-file side of
the same behaviours is tests/e2e/test_route_policy.py (and, through the real CLI, its
`test_the_routes_file_policy_through_the_real_process`); tests/paired/ proves both sources give
equal tables.

One API server, one controller and one set of Ingresses for the whole module (each Ingress carries
several annotations), so the module costs one process start. PROXY protocol and client
certificates (auth-tls-*) have their own modules.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import trustme
from aiohttp import web

from tests.fake_apiserver import FakeApiServer
from tests.kubernetes_e2e.conftest import (
    Backend,
    Cluster,
    ControllerProcess,
    client_tls,
    launch_controller,
    open_cluster,
    start_backend_group,
)
from tests.kubernetes_e2e.objects import configmap, endpoint_slice, ingress, ingress_class, service, tls_secret

pytestmark = pytest.mark.asyncio(loop_scope="module")
NGINX = "nginx.ingress.kubernetes.io/"
TLS_HOSTS = ("shop.example", "root.example")

INGRESSES: dict[str, tuple[str, str, dict[str, str]]] = {  # name → (host, service, annotations)
    "shop": ("shop.example", "web", {
        "use-regex": "true", "rewrite-target": "/$2", "x-forwarded-prefix": "/api", "upstream-vhost": "internal.example",
        "request-set-headers": "X-Env: prod", "response-set-headers": "Cache-Control: no-store",
        "custom-headers": "shop-headers",  # a bare name: the Ingress's namespace
        "proxy-body-size": "1k", "proxy-read-timeout": "1", "enable-cors": "true", "cors-allow-origin": "https://app.example",
    }),
    "moved": ("moved.example", "web", {"permanent-redirect": "https://new.example/", "permanent-redirect-code": "308"}),
    "temp": ("temp.example", "web", {"temporal-redirect": "https://elsewhere.example/"}),
    "root": ("root.example", "web", {"app-root": "/app", "force-ssl-redirect": "true"}),
    "gate": ("gate.example", "web", {"denylist-source-range": "127.0.0.0/8"}),
    "real": ("real.example", "web", {"whitelist-source-range": "203.0.113.0/24"}),
    "rate": ("rate.example", "web", {"limit-rps": "0.01", "limit-burst-multiplier": "1"}),  # one token per 100 s
    "busy": ("busy.example", "web", {"limit-connections": "1"}),
    "sticky": ("sticky.example", "pool", {"affinity": "cookie", "session-cookie-name": "route", "session-cookie-max-age": "60"}),
    "cart": ("cart.example", "web", {}),
    "cart-canary": ("cart.example", "canary", {
        "canary": "true", "canary-weight": "1000", "canary-weight-total": "1000", "canary-by-header": "X-Canary",
    }),  # fmt: skip
}
CONFIGMAPS = {
    "ingress-proxy": {  # the controller's
        "add-headers": "default/every-response", "proxy-set-headers": "default/every-request",
        "use-forwarded-headers": "true", "proxy-real-ip-cidr": "127.0.0.0/8",
    },
    "every-response": {"X-Global": "on"},
    "every-request": {"X-From-Configmap": "yes"},
    "shop-headers": {"X-Frame-Options": "DENY"},
    "unrelated": {"LOG_LEVEL": "debug"},  # never named: never kept
}  # fmt: skip


@dataclass
class Env:
    cluster: Cluster
    controller: ControllerProcess
    tls: ssl.SSLContext
    web: Backend


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    directory = tmp_path_factory.mktemp("k8s-policy")
    ca = trustme.CA()
    runners: list[web.AppRunner] = []
    async with FakeApiServer(allow_loopback=True, bookmark_interval=0.5) as server:
        async for cluster in open_cluster(server, directory / "kubeconfig"):
            groups = {"web": ["web"], "canary": ["canary"], "pool": ["pool-0", "pool-1", "pool-2"]}
            first_host = 2
            started: dict[str, list[Backend]] = {}
            await cluster.networking.create_ingress_class(ingress_class())
            for name, members in groups.items():
                backends = started[name] = await start_backend_group(members, runners, first_host)
                first_host += len(members)
                port = backends[0].port
                await cluster.core.create_namespaced_service("default", service(name, [("http", 80, port)]))
                slice_ = endpoint_slice(name, [backend.host for backend in backends], [("http", port)])
                await cluster.discovery.create_namespaced_endpoint_slice("default", slice_)
            await cluster.core.create_namespaced_secret("default", tls_secret("policy-tls", ca.issue_cert(*TLS_HOSTS)))
            for name, data in CONFIGMAPS.items():
                await cluster.core.create_namespaced_config_map("default", configmap(name, data))
            for name, (host, backend_service, annotations) in INGRESSES.items():
                body = ingress(
                    name, host, backend_service, annotations={NGINX + key: value for key, value in annotations.items()},
                    tls_secret="policy-tls" if host in TLS_HOSTS else None,
                )
                if annotations.get("use-regex") == "true":
                    path = body["spec"]["rules"][0]["http"]["paths"][0]
                    path.update(path="/api(/|$)(.*)", pathType="ImplementationSpecific")
                await cluster.networking.create_namespaced_ingress("default", body)
            controller = await launch_controller(cluster, directory / "controller.log", "--configmap", "default/ingress-proxy")
            try:
                yield Env(cluster, controller, client_tls(ca), started["web"][0])
            finally:
                await controller.stop()
                print(f"\n--- controller log (tail) ---\n{controller.log()[-6000:]}")
                for runner in runners:
                    await runner.cleanup()


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Any  # multidict: names without case
    body: Any  # parsed JSON (the backend's echo) or text (the proxy's own answers)


async def ask(env: Env, host: str, path: str = "/", *, method: str = "GET", headers: dict[str, str] | None = None,
              data: bytes | None = None, tls: bool = False) -> Reply:  # fmt: skip
    """One request on a fresh connection to the controller, Host (and SNI) = `host`."""
    port = env.controller.https_port if tls else env.controller.http_port
    scheme = "https" if tls else "http"
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=20)) as session:
        async with session.request(
            method, f"{scheme}://127.0.0.1:{port}{path}", headers={"Host": host, **(headers or {})}, data=data,
            ssl=env.tls if tls else False, server_hostname=host if tls else None, allow_redirects=False,
        ) as response:  # fmt: skip
            body: Any = await response.json() if response.content_type == "application/json" else await response.text()
            return Reply(response.status, response.headers, body)


async def test_rewrite_prefix_vhost_and_header_edits_from_annotations_and_configmaps(env: Env) -> None:
    reply = await ask(env, "shop.example", "/api/users/7?full=1", headers={"X-Env": "dev", "X-Forwarded-Prefix": "/forged"}, tls=True)
    assert reply.status == 200 and reply.body["backend"] == "web"
    seen = reply.body["headers"]
    assert reply.body["path"] == "/users/7?full=1"  # rewrite-target /$2 with use-regex
    assert seen["x-forwarded-prefix"] == "/api" and seen["host"] == "internal.example"  # x-forwarded-prefix, upstream-vhost
    assert seen["x-forwarded-host"].startswith("shop.example")
    assert seen["x-env"] == "prod"  # request-set-headers replaced the client's
    assert seen["x-from-configmap"] == "yes"  # ConfigMap proxy-set-headers → every request
    assert reply.headers["Cache-Control"] == "no-store"  # response-set-headers
    assert reply.headers["X-Frame-Options"] == "DENY"  # custom-headers (ConfigMap shop-headers)
    assert reply.headers["X-Global"] == "on"  # ConfigMap add-headers → every response
    plain = await ask(env, "cart.example", headers={"X-Canary": "never"})
    assert plain.headers["X-Global"] == "on" and "X-Frame-Options" not in plain.headers  # custom-headers: shop only


async def test_body_size_and_read_timeout_per_ingress(env: Env) -> None:
    assert (await ask(env, "shop.example", "/api/up", method="POST", data=b"x" * 1025, tls=True)).status == 413
    assert (await ask(env, "shop.example", "/api/up", method="POST", data=b"x" * 1024, tls=True)).status == 200
    assert (await ask(env, "shop.example", "/api/slow/3", tls=True)).status == 504  # proxy-read-timeout: 1 s (global: 60)
    assert (await ask(env, "cart.example", "/slow/1.5", headers={"X-Canary": "never"})).status == 200


async def test_cors_preflight_answered_by_the_proxy(env: Env) -> None:
    preflight = await ask(env, "shop.example", "/api/x", method="OPTIONS", tls=True, headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
    })  # fmt: skip
    assert preflight.status == 200 and preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    refused = await ask(env, "shop.example", "/api/x", method="OPTIONS", tls=True, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
    })  # fmt: skip
    assert refused.status == 403
    simple = await ask(env, "shop.example", "/api/x", headers={"Origin": "https://app.example"}, tls=True)
    assert simple.status == 200 and simple.headers["Access-Control-Allow-Origin"] == "https://app.example"


async def test_redirects_app_root_and_force_ssl_redirect(env: Env) -> None:
    moved = await ask(env, "moved.example", "/any?q=1")
    assert (moved.status, moved.headers["Location"]) == (308, "https://new.example/")
    temp = await ask(env, "temp.example", "/x")
    assert (temp.status, temp.headers["Location"]) == (302, "https://elsewhere.example/")
    forced = await ask(env, "root.example", "/page")
    assert forced.status == 308 and forced.headers["Location"] == f"https://root.example:{env.controller.https_port}/page"
    root = await ask(env, "root.example", "/", tls=True)
    assert (root.status, root.headers["Location"]) == (302, "/app")
    assert (await ask(env, "root.example", "/app", tls=True)).body["path"] == "/app"


async def test_source_ranges_judge_the_real_client_address(env: Env) -> None:
    assert (await ask(env, "gate.example")).status == 403  # denylist 127.0.0.0/8: the peer
    assert (await ask(env, "real.example")).status == 403  # whitelist 203.0.113.0/24
    # use-forwarded-headers + proxy-real-ip-cidr 127.0.0.0/8: the peer is trusted, so the client is
    # the X-Forwarded-For hop before it
    through = await ask(env, "real.example", headers={"X-Forwarded-For": "203.0.113.5"})
    assert through.status == 200 and through.body["headers"]["x-real-ip"] == "203.0.113.5"
    assert (await ask(env, "real.example", headers={"X-Forwarded-For": "198.51.100.1"})).status == 403


async def test_rate_and_connection_limits_per_client(env: Env) -> None:
    first = await ask(env, "rate.example", headers={"X-Forwarded-For": "192.0.2.10"})
    second = await ask(env, "rate.example", headers={"X-Forwarded-For": "192.0.2.10"})
    other_client = await ask(env, "rate.example", headers={"X-Forwarded-For": "192.0.2.11"})
    assert (first.status, second.status, other_client.status) == (200, 429, 200)
    assert second.headers["Retry-After"] == "1"

    held = asyncio.create_task(ask(env, "busy.example", "/slow/2.9", headers={"X-Forwarded-For": "192.0.2.20"}))
    try:
        while "/slow/2.9" not in env.web.received:  # in flight at the backend (bounded by the test timeout)
            await asyncio.sleep(0.01)
        assert (await ask(env, "busy.example", headers={"X-Forwarded-For": "192.0.2.20"})).status == 503
        assert (await ask(env, "busy.example", headers={"X-Forwarded-For": "192.0.2.21"})).status == 200
    finally:
        assert (await held).status == 200


async def test_canary_by_header_then_weight_out_of_weight_total(env: Env) -> None:
    # canary-weight 1000 of canary-weight-total 1000: every request without the header (with the
    # default total of 100 that weight would be refused, and the canary get nothing)
    assert {(await ask(env, "cart.example")).body["backend"] for _ in range(4)} == {"canary"}
    assert (await ask(env, "cart.example", headers={"X-Canary": "never"})).body["backend"] == "web"
    assert (await ask(env, "cart.example", headers={"X-Canary": "always"})).body["backend"] == "canary"


async def test_affinity_cookie_keeps_a_client_on_one_endpoint(env: Env) -> None:
    first = await ask(env, "sticky.example")
    cookie = first.headers["Set-Cookie"]
    assert cookie.startswith("route=") and "Max-Age=60" in cookie and "HttpOnly" in cookie
    pair = cookie.split(";")[0]
    for _ in range(5):  # round-robin would move on to the other two endpoints
        again = await ask(env, "sticky.example", headers={"Cookie": pair})
        assert again.body["backend"] == first.body["backend"] and "Set-Cookie" not in again.headers
    assert len({(await ask(env, "sticky.example")).body["backend"] for _ in range(3)}) == 3  # without it: balanced


async def test_problems_and_watched_configmaps(env: Env) -> None:
    """Nothing above was refused, and only the named ConfigMaps reached the cache."""
    assert await env.controller.metric("ingress_proxy_kubernetes_translation_problems") == 0
    assert await env.controller.metric("ingress_proxy_kubernetes_watched_objects", kind="ConfigMap (headers)") == 3
