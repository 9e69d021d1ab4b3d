"""TLS Secrets served by SNI and rotated without a restart; ConfigMap settings applied live."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import trustme

from tests.kubernetes_e2e.conftest import (
    Cluster,
    StartBackends,
    StartController,
    backend_of,
    client_tls,
    eventually,
    http_get,
)
from tests.kubernetes_e2e.objects import configmap, endpoint_slice, ingress, ingress_class, service, tls_secret

CHANGE_DEADLINE = 1.0


async def seed_web(cluster: Cluster, start_backends: StartBackends) -> None:
    (web,) = await start_backends(["web"])
    await cluster.networking.create_ingress_class(ingress_class())
    await cluster.core.create_namespaced_service("default", service("web", [("http", 80, web.port)]))
    await cluster.discovery.create_namespaced_endpoint_slice("default", endpoint_slice("web", [web.host], [("http", web.port)]))


async def served_certificate(port: int, server_name: str) -> bytes:
    """The DER certificate the proxy presents for this SNI (no verification: we compare bytes)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=server_name, ssl_handshake_timeout=5)
    try:
        return writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()


def der(issued: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(issued.cert_chain_pems[0].bytes().decode())


async def test_tls_secret_served_by_sni_and_rotated_without_restart(
    cluster: Cluster, start_controller: StartController, start_backends: StartBackends, ca: trustme.CA, tmp_path: Path
) -> None:
    await seed_web(cluster, start_backends)
    first_a, first_b = ca.issue_cert("a.example"), ca.issue_cert("b.example")
    await cluster.core.create_namespaced_secret("default", tls_secret("a-tls", first_a))
    await cluster.core.create_namespaced_secret("default", tls_secret("b-tls", first_b))
    await cluster.networking.create_namespaced_ingress("default", ingress("a", "a.example", tls_secret="a-tls"))
    await cluster.networking.create_namespaced_ingress("default", ingress("b", "b.example", tls_secret="b-tls"))
    controller = await start_controller(cluster)
    pid = controller.process.pid

    assert await served_certificate(controller.https_port, "a.example") == der(first_a)
    assert await served_certificate(controller.https_port, "b.example") == der(first_b)
    # A real client verifying against the CA, by name: curl (asynchronously: the backend runs in this loop).
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "5", "--cacert", str(tmp_path / "ca.pem"),
        "--resolve", f"a.example:{controller.https_port}:127.0.0.1", f"https://a.example:{controller.https_port}/x",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await curl.communicate()
    assert curl.returncode == 0 and b'"backend": "web"' in stdout, stderr

    rotated = ca.issue_cert("a.example")
    await cluster.core.replace_namespaced_secret("a-tls", "default", tls_secret("a-tls", rotated))
    await eventually(
        lambda: served_certificate(controller.https_port, "a.example"), lambda cert: cert == der(rotated), CHANGE_DEADLINE, "rotation"
    )
    assert await served_certificate(controller.https_port, "b.example") == der(first_b)
    answer = await http_get(controller.https_port, "a.example", tls=client_tls(ca))
    assert backend_of(answer) == "web"
    assert controller.process.pid == pid and controller.process.returncode is None


async def test_configmap_ssl_redirect_hsts_and_timeouts_apply_live(
    cluster: Cluster, start_controller: StartController, start_backends: StartBackends, ca: trustme.CA
) -> None:
    await seed_web(cluster, start_backends)
    await cluster.core.create_namespaced_secret("default", tls_secret("c-tls", ca.issue_cert("c.example")))
    await cluster.networking.create_namespaced_ingress("default", ingress("c", "c.example", tls_secret="c-tls"))
    controller = await start_controller(cluster, "--configmap", "default/ingress-proxy")
    tls = client_tls(ca)

    plain = await http_get(controller.http_port, "c.example", "/page?q=1")
    secure = await http_get(controller.https_port, "c.example", tls=tls)
    slow = await http_get(controller.https_port, "c.example", "/slow/0.6", tls=tls)
    assert backend_of(plain) == "web" and "Strict-Transport-Security" not in secure.headers and slow.status == 200

    settings = {"ssl-redirect": "true", "hsts": "true", "hsts-max-age": "600", "timeout-server": "200ms"}
    await cluster.core.create_namespaced_config_map("default", configmap("ingress-proxy", settings))
    await eventually(
        lambda: http_get(controller.http_port, "c.example", "/page?q=1"), lambda a: a.status == 308, CHANGE_DEADLINE, "redirect"
    )
    redirect = await http_get(controller.http_port, "c.example", "/page?q=1")
    assert redirect.headers["Location"] == f"https://c.example:{controller.https_port}/page?q=1"
    secure = await http_get(controller.https_port, "c.example", tls=tls)
    assert secure.headers["Strict-Transport-Security"] == "max-age=600"
    assert (await http_get(controller.https_port, "c.example", "/slow/0.6", tls=tls)).status == 504

    # Keys removed again: back to the defaults, still the same process.
    await cluster.core.replace_namespaced_config_map("ingress-proxy", "default", configmap("ingress-proxy", {"hsts": "true"}))
    await eventually(
        lambda: http_get(controller.http_port, "c.example"), lambda a: backend_of(a) == "web", CHANGE_DEADLINE, "redirect off"
    )
    assert (await http_get(controller.https_port, "c.example", "/slow/0.6", tls=tls)).status == 200

    # A bad value is reported and keeps the default rather than breaking the configuration.
    await cluster.core.replace_namespaced_config_map("ingress-proxy", "default", configmap("ingress-proxy", {"timeout-server": "soon"}))
    await eventually(
        lambda: http_get(controller.https_port, "c.example", tls=tls),
        lambda a: "Strict-Transport-Security" not in a.headers and backend_of(a) == "web",
        CHANGE_DEADLINE,
        "hsts off",
    )
    assert "timeout-server: 'soon' is not a duration" in controller.log()
    assert controller.process.returncode is None
