"""Hitless change under load: routes-file reloads (routes and certificates alternating), certificate
rotation, and endpoint churn, while keep-alive clients, new-connection clients and a WebSocket
keep going. Zero failed requests, the WebSocket never drops, memory flat after warm-up."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import trustme

from tests.conftest import RecordingBackend
from tests.hostile.proxy_process import CertificateFiles, Ports, routes_document, write_certificate
from tests.soak.conftest import SERVER_NAME, Traffic, scaled

TIMEOUTS = {"drain": 5.0}
WARM_UP_RELOADS = 10


def served_certificate(port: int, tls: ssl.SSLContext) -> bytes:
    """DER of the certificate a brand-new handshake gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with tls.wrap_socket(raw, server_hostname=SERVER_NAME) as sock:
            certificate = sock.getpeercert(binary_form=True)
            assert certificate is not None
            return certificate


def der(certificate: CertificateFiles) -> bytes:
    return ssl.PEM_cert_to_DER_cert(certificate.cert.read_text())


def document(ports: Ports, web: RecordingBackend, alt: RecordingBackend, certificate: CertificateFiles, extra_path: int) -> dict:
    return routes_document(
        ports,
        {"web": [str(web.address)], "alt": [str(alt.address)]},
        [("/", "web"), ("/alt", "alt"), (f"/extra/{extra_path}", "alt")],
        [certificate.entry()],
        TIMEOUTS,
    )


async def test_reloads_under_traffic_lose_nothing(
    start_soak_proxy, start_backend, soak_ca: trustme.CA, client_tls, tmp_path: Path
):
    web, alt = await start_backend("web"), await start_backend("alt")
    certificates = [write_certificate(soak_ca, tmp_path, name, SERVER_NAME) for name in ("cert-a", "cert-b")]
    ports = Ports()
    proxy = await start_soak_proxy(ports, document(ports, web, alt, certificates[0], 0))
    ports = proxy.ports  # fresh ones if a port was taken meanwhile
    traffic = Traffic(ports.https, client_tls, websocket=True, accept=lambda body: body["backend"] == "web").start()
    reloads = scaled(100)
    rss_after_warm_up = 0
    current_certificate = 0
    extra_path = 0
    rejected = 0
    for number in range(1, reloads + 1):
        if number % 2:
            current_certificate ^= 1
        else:
            extra_path = number
        hangup = number > 2  # the first two go through the 1 s file poll, the rest through SIGHUP
        new_document = document(ports, web, alt, certificates[current_certificate], extra_path)
        if number % 25 == 0:  # a broken file in between: refused, the last good configuration keeps serving
            broken = {**new_document, "backends": {"web": {"endpoints": ["not-an-address"]}}}
            assert await asyncio.to_thread(proxy.try_reload, broken) == "failed"
            rejected += 1
        await asyncio.to_thread(proxy.reload, new_document, hangup)
        if number % 10 == 0 or number <= 2:
            served = await asyncio.to_thread(served_certificate, ports.https, client_tls)
            assert served == der(certificates[current_certificate]), f"reload {number}: old certificate still served"
        if number == WARM_UP_RELOADS:
            rss_after_warm_up = proxy.rss_bytes()
    await asyncio.sleep(0.5)
    await traffic.stop()
    rss_end = proxy.rss_bytes()
    print(
        f"\nreload soak: {reloads} reloads (+{rejected} refused files), {traffic.ok} requests OK, {len(traffic.failures)} failed, "
        f"{traffic.websocket_messages} WebSocket round trips; RSS after warm-up {rss_after_warm_up / 2**20:.1f} MiB, "
        f"end {rss_end / 2**20:.1f} MiB"
    )
    assert traffic.failures == []
    assert traffic.ok > reloads and traffic.websocket_messages > 10
    assert rss_end <= rss_after_warm_up * 1.10


async def test_certificate_rotation_by_file_poll(
    start_soak_proxy, start_backend, soak_ca: trustme.CA, client_tls, tmp_path: Path
):
    """Rewrite the certificate files in place (as cert-manager or certbot would), touch the routes
    file, no signal: after the next poll a new handshake sees the new certificate, and an
    established keep-alive connection keeps working."""
    web = await start_backend("web")
    certificate = write_certificate(soak_ca, tmp_path, "rotating", SERVER_NAME)
    ports = Ports()
    routes = routes_document(ports, {"web": [str(web.address)]}, [("/", "web")], [certificate.entry()], TIMEOUTS)
    proxy = await start_soak_proxy(ports, routes)
    ports = proxy.ports  # fresh ones if a port was taken meanwhile
    first = await asyncio.to_thread(served_certificate, ports.https, client_tls)
    traffic = Traffic(ports.https, client_tls, keep_alive_clients=1, new_connection_clients=0).start()
    for rotation in range(scaled(3)):
        rotated = write_certificate(soak_ca, tmp_path, "rotating", SERVER_NAME)
        routes["timeouts"] = {**TIMEOUTS, "connect": 5.0 + rotation}  # a content change the poller notices
        await asyncio.to_thread(proxy.reload, routes, False)
        served = await asyncio.to_thread(served_certificate, ports.https, client_tls)
        assert served == der(rotated) != first
        first = served
    await traffic.stop()
    assert traffic.failures == [] and traffic.ok > 0
    assert proxy.stderr().count("INFO ingress_proxy.routes_file: reloaded") == scaled(3)


async def test_endpoint_churn_is_invisible_to_clients(
    start_soak_proxy, start_pod, soak_ca: trustme.CA, client_tls, tmp_path: Path
):
    """Rolling replacement: each step adds a new endpoint, removes the oldest from the routes file,
    and once that generation is live shuts the removed backend down (like a terminated pod)."""
    certificate = write_certificate(soak_ca, tmp_path, "churn", SERVER_NAME)
    ports = Ports()
    live = [await start_pod(f"pod-{index}") for index in range(2)]

    def routes() -> dict:
        endpoints = [str(backend.address) for backend, _ in live]
        return routes_document(ports, {"web": endpoints}, [("/", "web")], [certificate.entry()], TIMEOUTS)

    proxy = await start_soak_proxy(ports, routes())

    ports = proxy.ports  # fresh ones if a port was taken meanwhile
    traffic = Traffic(ports.https, client_tls, keep_alive_clients=3, new_connection_clients=1).start()
    steps = scaled(20)
    served_by: set[str] = set()
    for step in range(steps):
        live.append(await start_pod(f"pod-{step + 2}"))
        await asyncio.to_thread(proxy.reload, routes())
        removed, stop_removed = live.pop(0)
        await asyncio.to_thread(proxy.reload, routes())
        await asyncio.sleep(0.1)
        served_by.update(seen["backend"] for seen in removed.received)
        await stop_removed()
    await asyncio.sleep(0.3)
    await traffic.stop()
    print(f"\nendpoint churn: {steps} replacements, {traffic.ok} requests OK, {len(traffic.failures)} failed")
    assert traffic.failures == []
    assert len(served_by) >= steps // 2, "traffic should have reached the endpoints that came and went"
