"""Client certificates in Kubernetes mode: ingress-nginx `auth-tls-*` annotations with the CA in an
Opaque Secret (`ca.crt`), against the fake API server and a real controller process."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import trustme

from tests.e2e.test_client_certificates import Client
from tests.e2e.test_route_policy import PROTOCOLS, curl
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


async def test_auth_tls_match_cn_with_curl_over_http1_and_http2(
    cluster: Cluster, start_controller: StartController, start_backends: StartBackends, ca: trustme.CA, tmp_path: Path
) -> None:
    """auth-tls-match-cn: a matching and a non-matching certificate, both from the trusted CA; a
    pattern that could backtrack without end leaves its Ingress's paths out, with a Warning Event;
    a changed pattern is compiled and served on the next publish."""
    await seed_web(cluster, start_backends)
    clients = trustme.CA()
    await cluster.core.create_namespaced_secret("default", tls_secret("team-tls", ca.issue_cert("team.example", "bad.example")))
    await cluster.core.create_namespaced_secret("default", ca_secret("clients", clients))

    def annotations(match_cn: str) -> dict[str, str]:
        return {"nginx.ingress.kubernetes.io/auth-tls-secret": "clients", "nginx.ingress.kubernetes.io/auth-tls-match-cn": match_cn}

    await cluster.networking.create_namespaced_ingress(
        "default", ingress("team", "team.example", annotations=annotations(r"CN=(alice|bob)\.example"), tls_secret="team-tls")
    )
    await cluster.networking.create_namespaced_ingress(
        "default", ingress("bad-cn", "bad.example", annotations=annotations("CN=(a+)+$"), tls_secret="team-tls")
    )
    controller = await start_controller(cluster)
    ca_file = tmp_path / "server-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    alice, carol = _client(clients, tmp_path, "alice.example"), _client(clients, tmp_path, "carol.example")

    for protocol in PROTOCOLS:
        served = await curl(controller.https_port, str(ca_file), protocol, "team.example", "/", *alice.options())
        assert served["status"] == 200 and json.loads(served["body"])["headers"]["ssl-client-subject-dn"].startswith(
            "CN=alice.example,"
        ), controller.log()
        refused = await curl(controller.https_port, str(ca_file), protocol, "team.example", "/", *carol.options())
        assert (refused["status"], refused["body"]) == (403, b"client certificate unauthorized")
        left_out = await curl(controller.https_port, str(ca_file), protocol, "bad.example", "/", *alice.options())
        assert left_out["status"] == 404  # not served open without the check

    async def warned() -> set[str]:
        events = await cluster.core.list_namespaced_event("default")
        return {
            event.involved_object.name for event in events.items if event.type == "Warning" and "auth-tls-match-cn" in event.message
        }

    await eventually(warned, lambda names: names == {"bad-cn"}, CHANGE_DEADLINE, "a Warning Event on the bad pattern's Ingress")

    changed = ingress("team", "team.example", annotations=annotations(r"CN=carol\."), tls_secret="team-tls")
    await cluster.networking.replace_namespaced_ingress("team", "default", changed)
    await eventually(
        lambda: curl(controller.https_port, str(ca_file), "--http2", "team.example", "/", *carol.options()),
        lambda got: got["status"] == 200, CHANGE_DEADLINE, "the changed pattern",
    )  # fmt: skip
    assert (await curl(controller.https_port, str(ca_file), "--http1.1", "team.example", "/", *alice.options()))["status"] == 403


def _client(ca: trustme.CA, directory: Path, common_name: str) -> Client:
    issued = ca.issue_cert(common_name, common_name=common_name)
    cert, key = directory / f"{common_name}.pem", directory / f"{common_name}.key"
    cert.write_bytes(issued.cert_chain_pems[0].bytes())
    key.write_bytes(issued.private_key_pem.bytes())
    return Client(cert, key, issued.cert_chain_pems[0].bytes())
