"""Backends over TLS in Kubernetes mode (issue 12): ingress-nginx annotations with a CA in an Opaque
Secret, Service appProtocol, against the fake API server and a real controller process.

The backends are aiohttp servers on stdlib ssl with certificates from CAs made here; one requires
a client certificate, and reports the one it got, so mTLS is read from the far end.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trustme
from aiohttp import web

from tests.kubernetes_e2e.conftest import Cluster, StartController, eventually, http_get
from tests.ports import free_port
from tests.kubernetes_e2e.objects import endpoint_slice, ingress, ingress_class, service

CHANGE_DEADLINE = 5.0  # generous: the machine is shared; the controller debounces, then publishes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def ca_secret(name: str, ca: trustme.CA, client: trustme.LeafCert | None = None, secret_type: str = "Opaque") -> dict:
    data = {"ca.crt": _b64(ca.cert_pem.bytes())}
    if client is not None:
        data["tls.crt"] = _b64(client.cert_chain_pems[0].bytes())
        data["tls.key"] = _b64(client.private_key_pem.bytes())
    return {"metadata": {"name": name}, "type": secret_type, "data": data}


StartTlsBackend = Callable[..., Awaitable[tuple[str, int]]]


@pytest.fixture
async def start_tls_backend() -> AsyncIterator[StartTlsBackend]:
    runners: list[web.AppRunner] = []

    async def start(ca: trustme.CA, name: str, host: str, client_ca: trustme.CA | None = None) -> tuple[str, int]:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(name).configure_cert(context)
        if client_ca is not None:
            client_ca.configure_trust(context)
            context.verify_mode = ssl.CERT_REQUIRED

        async def facts(request: web.Request) -> web.Response:
            ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
            peer = ssl_object.getpeercert() if ssl_object is not None else None
            return web.json_response({"backend": name, "tls": ssl_object is not None, "client_certificate": bool(peer)})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", facts)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        port = free_port(host)
        await web.TCPSite(runner, host, port, ssl_context=context).start()
        runners.append(runner)
        return host, port

    yield start
    for runner in runners:
        await runner.cleanup()


async def _expose(cluster: Cluster, name: str, host: str, port: int, app_protocol: str | None = None) -> None:
    svc = service(name, [("https", 443, port)])
    if app_protocol is not None:
        svc["spec"]["ports"][0]["appProtocol"] = app_protocol
    await cluster.core.create_namespaced_service("default", svc)
    await cluster.discovery.create_namespaced_endpoint_slice("default", endpoint_slice(name, [host], [("https", port)]))


async def test_backend_protocol_https_with_an_opaque_ca_secret_and_a_client_certificate(
    cluster: Cluster, start_controller: StartController, start_tls_backend: StartTlsBackend
) -> None:
    backend_ca, client_ca = trustme.CA(), trustme.CA()
    host, port = await start_tls_backend(backend_ca, "secure.default.svc", "127.0.0.2", client_ca=client_ca)
    await cluster.networking.create_ingress_class(ingress_class())
    await _expose(cluster, "secure", host, port)
    client = client_ca.issue_cert("ingress-proxy.client")
    await cluster.core.create_namespaced_secret("default", ca_secret("secure-ca", backend_ca, client))
    await cluster.core.create_namespaced_secret(
        "default", {"metadata": {"name": "passwords"}, "type": "Opaque", "data": {"password": _b64(b"hunter2")}}
    )
    annotations = {
        "nginx.ingress.kubernetes.io/backend-protocol": "HTTPS",
        "nginx.ingress.kubernetes.io/proxy-ssl-secret": "default/secure-ca",
    }
    await cluster.networking.create_namespaced_ingress(
        "default", ingress("secure", "secure.example", "secure", 443, annotations=annotations)
    )
    controller = await start_controller(cluster)

    answer = await http_get(controller.http_port, "secure.example")
    assert answer.status == 200, controller.log()
    assert answer.body == {"backend": "secure.default.svc", "tls": True, "client_certificate": True}
    # Only the CA Secret is cached, not the unrelated Opaque one.
    assert await controller.metric("ingress_proxy_kubernetes_watched_objects", kind="Secret (Opaque, ca.crt)") == 1.0

    # The CA in the Opaque Secret is watched: replace it with another CA and verification fails.
    await cluster.core.replace_namespaced_secret("secure-ca", "default", ca_secret("secure-ca", trustme.CA(), client))
    await eventually(
        lambda: http_get(controller.http_port, "secure.example"), lambda got: got.status == 502, CHANGE_DEADLINE, "CA change"
    )
    assert await controller.metric("ingress_proxy_upstream_errors_total", backend="default/secure:443", kind="tls untrusted") >= 1


async def test_service_app_protocol_https_without_annotations(
    cluster: Cluster, start_controller: StartController, start_tls_backend: StartTlsBackend
) -> None:
    host, port = await start_tls_backend(trustme.CA(), "web.default.svc", "127.0.0.3")
    await cluster.networking.create_ingress_class(ingress_class())
    await _expose(cluster, "web", host, port, app_protocol="https")
    await cluster.networking.create_namespaced_ingress("default", ingress("web", "web.example", "web", 443))
    controller = await start_controller(cluster)
    answer = await http_get(controller.http_port, "web.example")
    assert answer.status == 200, controller.log()
    assert answer.body["tls"] is True


async def test_grpc_backend_by_annotation(cluster: Cluster, start_controller: StartController, ca: trustme.CA) -> None:
    import asyncio
    from concurrent import futures

    import grpc

    from tests.kubernetes_e2e.objects import tls_secret

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"k8s:" + request)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {"Unary": handler}),))
    port = free_port("127.0.0.4")
    server.add_insecure_port(f"127.0.0.4:{port}")
    server.start()
    try:
        await cluster.networking.create_ingress_class(ingress_class())
        await _expose(cluster, "grpc", "127.0.0.4", port)
        await cluster.core.create_namespaced_secret("default", tls_secret("grpc-tls", ca.issue_cert("grpc.example")))
        annotations = {"nginx.ingress.kubernetes.io/backend-protocol": "GRPC"}
        await cluster.networking.create_namespaced_ingress(
            "default", ingress("grpc", "grpc.example", "grpc", 443, annotations=annotations, tls_secret="grpc-tls")
        )
        controller = await start_controller(cluster)
        channel = grpc.secure_channel(
            f"127.0.0.1:{controller.https_port}",
            grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes()),
            options=[("grpc.ssl_target_name_override", "grpc.example"), ("grpc.default_authority", "grpc.example")],
        )
        with channel:  # closed even when the call fails: see tests/e2e/test_grpc_backends.open_channel
            call = channel.unary_unary("/test.Echo/Unary")
            assert await asyncio.to_thread(call, b"hi", timeout=20) == b"k8s:hi", controller.log()
    finally:
        server.stop(grace=None)
