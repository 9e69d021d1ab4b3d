"""Client certificates in Kubernetes mode: ingress-nginx `auth-tls-*` annotations with the CA in an
Opaque Secret (`ca.crt`), against the fake API server and a real controller process."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme

from tests.kubernetes_e2e.conftest import Cluster, StartBackends, StartController, client_tls, eventually, http_get
from tests.kubernetes_e2e.objects import ingress, tls_secret
from tests.kubernetes_e2e.test_backend_tls import ca_secret
from tests.kubernetes_e2e.test_tls_and_settings import seed_web

CHANGE_DEADLINE = 5.0  # generous: the machine is shared; the controller debounces, then publishes


def _with_certificate(ca: trustme.CA, client: trustme.LeafCert, directory: Path) -> ssl.SSLContext:
    context = client_tls(ca)
    cert, key = directory / "alice.pem", directory / "alice.key"
    cert.write_bytes(client.cert_chain_pems[0].bytes())
    key.write_bytes(client.private_key_pem.bytes())
    context.load_cert_chain(str(cert), str(key))
    return context


async def test_auth_tls_annotations_with_an_opaque_ca_secret(
    cluster: Cluster, start_controller: StartController, start_backends: StartBackends, ca: trustme.CA, tmp_path: Path
) -> None:
    await seed_web(cluster, start_backends)
    clients = trustme.CA()
    await cluster.core.create_namespaced_secret("default", tls_secret("pay-tls", ca.issue_cert("pay.example")))
    await cluster.core.create_namespaced_secret("default", ca_secret("clients", clients))
    annotations = {
        "nginx.ingress.kubernetes.io/auth-tls-secret": "default/clients",
        "nginx.ingress.kubernetes.io/auth-tls-verify-client": "on",
        "nginx.ingress.kubernetes.io/auth-tls-pass-certificate-to-upstream": "true",
    }
    await cluster.networking.create_namespaced_ingress(
        "default", ingress("pay", "pay.example", annotations=annotations, tls_secret="pay-tls")
    )
    controller = await start_controller(cluster)
    alice = _with_certificate(ca, clients.issue_cert("alice"), tmp_path)

    answer = await http_get(controller.https_port, "pay.example", tls=alice)
    assert answer.status == 200, controller.log()
    refused = await http_get(controller.https_port, "pay.example", tls=client_tls(ca))
    assert (refused.status, refused.body) == (400, "400 Bad Request: No required SSL certificate was sent\n")

    # The Opaque Secret is watched: another CA in it, and alice's certificate no longer verifies.
    await cluster.core.replace_namespaced_secret("clients", "default", ca_secret("clients", trustme.CA()))
    await eventually(
        lambda: http_get(controller.https_port, "pay.example", tls=alice), lambda got: got.status == 400, CHANGE_DEADLINE, "CA change"
    )
