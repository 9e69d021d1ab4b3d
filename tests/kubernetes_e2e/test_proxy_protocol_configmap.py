"""Kubernetes mode: ConfigMap `use-proxy-protocol: "true"` makes every listener require a PROXY
header, live, and `whitelist-source-range` then judges the header's source address."""

from __future__ import annotations

import asyncio
import ssl

import trustme

from tests.kubernetes_e2e.conftest import Cluster, StartBackends, StartController, client_tls, eventually, http_get
from tests.kubernetes_e2e.objects import configmap, endpoint_slice, ingress, ingress_class, service, tls_secret

NGINX = "nginx.ingress.kubernetes.io/"
CHANGE_DEADLINE = 5.0  # generous: other suites share this machine's two cores
HOST = "office.example"


async def status_behind_l4(port: int, header: bytes, tls: ssl.SSLContext | None) -> int | None:
    """A test L4 client: `header`, then (TLS and) one HTTP/1.1 request; None if closed unanswered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(header)
        await writer.drain()
        if tls is not None:
            await writer.start_tls(tls, server_hostname=HOST, ssl_handshake_timeout=10)
        writer.write(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 10)
    except (ConnectionError, ssl.SSLError):
        return None
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1]) if answer else None


async def test_configmap_use_proxy_protocol(
    cluster: Cluster, start_controller: StartController, start_backends: StartBackends, ca: trustme.CA
) -> None:
    (web,) = await start_backends(["web"])
    await cluster.networking.create_ingress_class(ingress_class())
    await cluster.core.create_namespaced_service("default", service("web", [("http", 80, web.port)]))
    await cluster.discovery.create_namespaced_endpoint_slice("default", endpoint_slice("web", [web.host], [("http", web.port)]))
    await cluster.core.create_namespaced_secret("default", tls_secret("office-tls", ca.issue_cert(HOST)))
    allow = {NGINX + "whitelist-source-range": "203.0.113.0/24"}
    await cluster.networking.create_namespaced_ingress("default", ingress("office", HOST, tls_secret="office-tls", annotations=allow))
    controller = await start_controller(cluster, "--configmap", "default/ingress-proxy")
    tls = client_tls(ca)
    assert (await http_get(controller.https_port, HOST, tls=tls)).status == 403  # the TCP peer, 127.0.0.1

    await cluster.core.create_namespaced_config_map("default", configmap("ingress-proxy", {"use-proxy-protocol": "true"}))
    inside = b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 443\r\n"
    await eventually(
        lambda: status_behind_l4(controller.https_port, inside, tls), lambda status: status == 200, CHANGE_DEADLINE, "PROXY on"
    )
    outside = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes((198, 51, 100, 7, 10, 0, 0, 1)) + b"\x9c\x40\x01\xbb"  # v2
    assert await status_behind_l4(controller.https_port, outside, tls) == 403
    assert await status_behind_l4(controller.http_port, inside, None) == 200  # every listener, as in ingress-nginx
    assert await status_behind_l4(controller.https_port, b"", tls) is None  # a bare TLS client is closed
    assert await controller.metric("ingress_proxy_proxy_header_refusals_total", listener="https") >= 1

    await cluster.core.replace_namespaced_config_map("ingress-proxy", "default", configmap("ingress-proxy", {}))
    await eventually(
        lambda: http_get(controller.https_port, HOST, tls=tls), lambda a: a.status == 403, CHANGE_DEADLINE, "PROXY off"
    )
    assert controller.process.returncode is None
