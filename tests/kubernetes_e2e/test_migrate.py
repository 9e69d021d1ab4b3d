"""`ingress-proxy migrate` through the real CLI against the fake API server: read-only, every
annotation classified, the resulting routes listed, JSON equal to the text's content."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

from tests.kubernetes_e2e.conftest import Cluster
from tests.kubernetes_e2e.objects import configmap, ingress, ingress_class, service

PROXY_COMMAND = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "ingress-proxy")
NGINX = "nginx.ingress.kubernetes.io/"


async def migrate(cluster: Cluster, *flags: str) -> str:
    process = await asyncio.create_subprocess_exec(
        PROXY_COMMAND, "migrate", "--kubeconfig", str(cluster.kubeconfig), *flags,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_migrate_reports_each_annotation_and_the_routes_without_writing(cluster: Cluster) -> None:
    await cluster.networking.create_ingress_class(ingress_class())
    await cluster.core.create_namespaced_service("default", service("web"))
    await cluster.core.create_namespaced_config_map("default", configmap("ingress-proxy", {"proxy-body-size": "2m"}))
    web = ingress("web", "shop.example.com", annotations={
        NGINX + "rewrite-target": "/",
        NGINX + "whitelist-source-range": "10.0.0.0/8",
        NGINX + "configuration-snippet": "more_set_headers 'X: y';",
        NGINX + "limit-rps": "lots",
        "kubectl.kubernetes.io/last-applied-configuration": "{}",
    })  # fmt: skip
    await cluster.networking.create_namespaced_ingress("default", web)
    await cluster.networking.create_namespaced_ingress("default", ingress("theirs", "other.example.com", class_name="nginx"))
    writes_before = [request for request in cluster.server.request_log if request[0] != "GET"]
    reads_before = len(cluster.server.request_log)

    text = await migrate(cluster, "--configmap", "default/ingress-proxy")
    report = json.loads(await migrate(cluster, "--configmap", "default/ingress-proxy", "--json"))

    assert [request for request in cluster.server.request_log if request[0] != "GET"] == writes_before
    by_ingress = {entry["ingress"]: entry for entry in report["ingresses"]}
    assert by_ingress["default/web"]["ours"] and not by_ingress["default/theirs"]["ours"]
    statuses = {entry["key"][len(NGINX):]: entry["status"] for entry in by_ingress["default/web"]["annotations"]}
    assert statuses == {
        "rewrite-target": "honoured",
        "whitelist-source-range": "honoured differently",
        "configuration-snippet": "ignored",
        "limit-rps": "ignored",
    }
    assert report["routes"] == [{
        "host": "shop.example.com", "redirect_to_https": False, "client_certificates": "not asked", "path": "/", "type": "Prefix", "backend": "default/web:80",
        "policy": {"allow_sources": "10.0.0.0/8", "max_body_size": str(2 * 1024 * 1024), "rewrite_target": "/"},
    }]  # fmt: skip
    assert "Ingress default/web: served by ingress-proxy" in text
    assert f"ignored               {NGINX}configuration-snippet" in text and "not supported by ingress-proxy" in text
    assert "shop.example.com/ Prefix → default/web:80" in text
