"""deploy/ and the Dockerfile, checked against the code they deploy.

No cluster and no Docker engine here, so: every manifest is parsed and its kind/apiVersion checked;
the Deployment's arguments go through the real CLI parser (`proxy.cli.build_parser`) after the
Dockerfile's ENTRYPOINT; the ConfigMaps go through the real translator; the RBAC rules are checked
against every request a real controller made to the fake API server (so a new API call without a
matching rule fails here); and the kinds the fake serves are applied to it with kubernetes-asyncio.
The Dockerfile is checked for its structure (base image, packages, venv, non-root USER, ENTRYPOINT)
since it cannot be built here.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client, utils

from config.model import CryptoSettings, EngineSettings, ProviderSettings, StoreKey
from config.tls_material import self_signed_certificate
from ingress_watch.controller import ControllerSettings, KubernetesSource
from ingress_watch.leader import LeaderSettings
from ingress_watch.snapshot import Snapshot
from ingress_watch.status import PublishSettings
from ingress_watch.translate import TranslateOptions, translate
from proxy import cli
from tests.fake_apiserver.server import _parse_path
from tests.fake_apiserver.store import RESOURCES
from tests.kubernetes.conftest import FAST_WATCH, RecordingSink
from tests.kubernetes_e2e.conftest import REPO, Cluster, eventually
from tests.kubernetes_e2e.objects import endpoint_slice, ingress

DEPLOY = REPO / "deploy"
NAMESPACE = "ingress-proxy"
EXPECTED_KINDS = {
    ("v1", "Namespace"),
    ("v1", "ServiceAccount"),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("networking.k8s.io/v1", "IngressClass"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "IngressClass"}
FAKE_SERVED_KINDS = {resource.kind for resource in RESOURCES}


def load(folder: Path) -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.yaml")):
        documents.extend(document for document in yaml.safe_load_all(path.read_text()) if document is not None)
    return documents


def one(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in documents if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


BASE = load(DEPLOY)
QAT = load(DEPLOY / "qat")
QAT_PROVIDER = load(DEPLOY / "qat-provider")
HSM = load(DEPLOY / "hsm")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def entrypoint() -> list[str]:
    (arguments,) = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "ENTRYPOINT"]
    return json.loads(arguments)  # exec form: signals reach the proxy, no shell in between


def cpu_quantity(value: str | int) -> float:
    """A Kubernetes CPU quantity ("2", "500m", 1) in CPUs."""
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def container_environment(container: dict[str, Any]) -> dict[str, str]:
    """The variables the kubelet sets from `env` (resourceFieldRef: the limit ÷ divisor, rounded up)."""
    environment = {}
    for variable in container.get("env", []):
        if "value" in variable:
            environment[variable["name"]] = variable["value"]
        elif "resourceFieldRef" in variable.get("valueFrom", {}):
            reference = variable["valueFrom"]["resourceFieldRef"]
            kind, _, resource = reference["resource"].partition(".")
            assert resource == "cpu", f"only CPU references are expanded here: {reference}"
            quantity = cpu_quantity(container["resources"][kind][resource]) / cpu_quantity(reference.get("divisor", "1"))
            environment[variable["name"]] = str(math.ceil(quantity))
    return environment


def controller_arguments(deployment: dict[str, Any]) -> argparse.Namespace:
    """The container's args as the kubelet expands them ($(VAR) from `env`), through the real CLI parser."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    environment = container_environment(container)
    arguments = [re.sub(r"\$\((\w+)\)", lambda match: environment[match[1]], argument) for argument in container.get("args", [])]
    return cli.build_parser().parse_args([*entrypoint()[1:], *arguments])


# --- manifests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("documents", [BASE, QAT], ids=["base", "qat"])
def test_every_manifest_has_a_known_kind_and_the_right_namespace(documents: list[dict[str, Any]]) -> None:
    assert documents
    for document in documents:
        assert (document["apiVersion"], document["kind"]) in EXPECTED_KINDS, (document["apiVersion"], document["kind"])
        metadata = document["metadata"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", metadata["name"]), metadata["name"]
        if document["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in metadata, f"{document['kind']} is cluster-scoped"
        else:
            assert metadata.get("namespace") == NAMESPACE, f"{document['kind']} {metadata['name']} outside {NAMESPACE}"
    kinds = {document["kind"] for document in BASE}
    assert kinds == {kind for _, kind in EXPECTED_KINDS}


def test_deployment_flags_parse_with_the_real_cli_and_match_the_other_manifests() -> None:
    deployment = one(BASE, "Deployment")
    arguments = controller_arguments(deployment)
    assert arguments.command == "serve" and arguments.kubernetes and arguments.kubeconfig is None  # in-cluster
    assert arguments.routes is None
    ingress_class = one(BASE, "IngressClass")
    assert arguments.ingress_class == ingress_class["metadata"]["name"]
    assert arguments.controller_class == ingress_class["spec"]["controller"]
    assert cli._namespaced(arguments.configmap, "--configmap") == (NAMESPACE, one(BASE, "ConfigMap")["metadata"]["name"])
    service = one(BASE, "Service")
    assert cli._namespaced(arguments.publish_service, "--publish-service") == (NAMESPACE, service["metadata"]["name"])

    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert cli._address(arguments.https_address, "--https-address").port == ports["https"]
    assert cli._address(arguments.http_address, "--http-address").port == ports["http"]
    assert cli._address(arguments.admin_address, "--admin-address").port == ports["admin"]
    assert all(port > 1024 for port in ports.values()), "non-root cannot bind below 1024"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    (pod_namespace,) = [env for env in container["env"] if env["name"] == "POD_NAMESPACE"]
    assert pod_namespace["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # One worker per CPU of the limit: every core the pod is given serves traffic.
    assert arguments.workers == math.ceil(cpu_quantity(container["resources"]["limits"]["cpu"])) >= 2

    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["spec"]["serviceAccountName"] == one(BASE, "ServiceAccount")["metadata"]["name"]

    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert {port["targetPort"] for port in service["spec"]["ports"]} == {"https", "http"}


def test_rbac_bindings_grant_the_roles_to_the_deployment_service_account() -> None:
    account = one(BASE, "ServiceAccount")["metadata"]
    subject = {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    for binding_kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = one(BASE, binding_kind)
        assert binding["subjects"] == [subject]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": one(BASE, role_kind)["metadata"]["name"]}
    for role_kind in ("ClusterRole", "Role"):
        for rule in one(BASE, role_kind)["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], f"{role_kind}: no wildcards"
    assert one(BASE, "Role")["metadata"]["namespace"] == one(BASE, "Deployment")["metadata"]["namespace"]


def test_qat_variant_differs_from_the_base_only_in_the_offload() -> None:
    base, qat = one(BASE, "Deployment"), one(QAT, "Deployment")
    qat_pod = qat["spec"]["template"]["spec"]
    assert qat_pod["runtimeClassName"] == "kata-containers"
    (container,) = qat_pod["containers"]
    qat_limits = {name: value for name, value in container["resources"]["limits"].items() if name.startswith("qat.intel.com/")}
    assert list(qat_limits.values()) == [1], "one QAT virtual function (resource names need their domain/ prefix)"

    # Everything else is the base Deployment: the two cannot drift apart.
    expected = json.loads(json.dumps(base))
    expected_pod = expected["spec"]["template"]["spec"]
    expected_pod["runtimeClassName"] = "kata-containers"
    (expected_container,) = expected_pod["containers"]
    expected_container["image"] = container["image"]
    expected_container["resources"]["limits"].update(qat_limits)
    expected_container["resources"]["requests"].update(qat_limits)
    assert qat == expected
    assert controller_arguments(qat) == controller_arguments(base)

    base_data, qat_data = one(BASE, "ConfigMap")["data"], one(QAT, "ConfigMap")["data"]
    assert qat_data == {**base_data, "ssl-engine": "qatengine algo RSA,EC", "ssl-mode-async": "true"}


@pytest.mark.parametrize("documents", [BASE, QAT], ids=["base", "qat"])
def test_configmaps_are_read_by_the_real_translator_without_problems(documents: list[dict[str, Any]]) -> None:
    snapshot = Snapshot(configmap=one(documents, "ConfigMap"))
    translation = translate(snapshot, TranslateOptions())
    assert translation.problems == ()
    configuration = translation.configuration
    assert configuration.hsts is not None
    if documents is QAT:
        assert configuration.crypto == CryptoSettings(EngineSettings("qatengine", algorithms=("RSA", "EC")), async_mode=True)
    else:
        assert configuration.crypto == CryptoSettings()


@pytest.mark.parametrize(
    ("documents", "settings", "expected"),
    [
        (
            QAT_PROVIDER,
            {"ssl-provider": "qatprovider", "ssl-provider-optional": "qatprovider",
             "ssl-provider-path": "/usr/local/lib/ossl-modules",
             "ssl-propquery": "?provider=qatprovider", "ssl-mode-async": "true"},
            CryptoSettings(async_mode=True, providers=(ProviderSettings("qatprovider", required=False),),
                           propquery="?provider=qatprovider", provider_path="/usr/local/lib/ossl-modules"),
        ),
        (
            HSM,
            {"ssl-provider": "pkcs11", "ssl-provider-parameters": (
                "pkcs11 pkcs11-module-path=/usr/lib/softhsm/libsofthsm2.so\n"
                "pkcs11 pkcs11-module-token-pin=file:/etc/ingress-proxy/hsm/pin\n")},
            CryptoSettings(providers=(ProviderSettings("pkcs11", parameters=(
                ("pkcs11-module-path", "/usr/lib/softhsm/libsofthsm2.so"),
                ("pkcs11-module-token-pin", "file:/etc/ingress-proxy/hsm/pin"),
            )),)),
        ),
    ],
    ids=["qat-provider", "hsm"],
)
def test_provider_configmaps_are_the_base_plus_their_crypto_keys(
    documents: list[dict[str, Any]], settings: dict[str, str], expected: CryptoSettings
) -> None:
    configmap = one(documents, "ConfigMap")
    assert configmap["data"] == {**one(BASE, "ConfigMap")["data"], **settings}, "only the crypto keys differ"
    translation = translate(Snapshot(configmap=configmap), TranslateOptions())
    assert translation.problems == ()
    assert translation.configuration.crypto == expected


def test_the_hsm_secret_example_becomes_a_key_kept_in_the_token() -> None:
    secret = json.loads(json.dumps(one(HSM, "Secret", "shop-hsm")))
    assert one(HSM, "Secret", "ingress-proxy-hsm-pin")["metadata"]["namespace"] == NAMESPACE
    chain_pem, _ = self_signed_certificate("shop.example.com", ["shop.example.com"])
    secret["stringData"]["tls.crt"] = chain_pem.decode()  # the example's placeholder, made real
    secret["data"] = {key: base64.b64encode(value.encode()).decode() for key, value in secret.pop("stringData").items()}
    shop = ingress("shop", "shop.example.com", class_name=None, tls_secret="shop-hsm")
    shop["metadata"]["namespace"] = "shop"
    snapshot = Snapshot(ingresses=(shop,), secrets=(secret,))
    translation = translate(snapshot, TranslateOptions(watch_ingress_without_class=True))
    (certificate,) = translation.configuration.certificates
    assert certificate.key == StoreKey("pkcs11:token=proxy;object=shop-key;type=private")
    assert certificate.hosts == ("shop.example.com",)


# --- the Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_structure() -> None:
    """Docker cannot build here (no engine): check what the image is made of instead."""
    instructions = dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    assert keywords[0] == "FROM" and keywords.count("FROM") == 1
    assert re.fullmatch(r"debian:bookworm(-slim)?", instructions[0][1])
    runs = " ".join(arguments for keyword, arguments in instructions if keyword == "RUN")
    for package in ("python3", "python3-venv", "python3-openssl", "python3-cryptography", "python3-yaml", "libengine-pkcs11-openssl"):
        assert re.search(rf"(^|\s){re.escape(package)}(\s|$)", runs), f"apt package {package} missing"
    assert "/usr/bin/python3 -m venv --system-site-packages" in runs, "the venv must see Debian's pyOpenSSL (NOTES §1)"
    assert "-c \"$VENV/debian-crypto-constraints.txt\"" in runs, "pip must be pinned to the Debian crypto builds"
    assert "Cryptography_HAS_ENGINE" in runs

    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0") and users[-1].split(":")[0].isdigit()
    assert keywords.index("USER") > max(i for i, keyword in enumerate(keywords) if keyword == "RUN"), "USER after set-up"
    assert entrypoint()[1:] == ["serve", "--kubernetes"] and entrypoint()[0].endswith("/bin/ingress-proxy")
    deployment_user = one(BASE, "Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert users[-1].split(":")[0] == str(deployment_user)

    # The image holds what pyproject.toml packages, and .dockerignore lets exactly that through.
    copied = {shlex.split(arguments)[0] for keyword, arguments in instructions if keyword == "COPY"}
    assert copied == {"pyproject.toml", "config", "proxy", "ingress_watch"}
    allowed = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert copied <= allowed


# --- applied to the fake API server, and RBAC against real traffic ------------------------------


def _verb(method: str, name: str | None, query: str) -> str:
    if method == "GET":
        return "get" if name else ("watch" if re.search(r"(^|&)watch=(1|true|True)", query) else "list")
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete" if name else "deletecollection"}[method]


def _allowed(verb: str, group: str, resource: str, namespace: str | None) -> bool:
    def grants(rules: list[dict[str, Any]]) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)

    if grants(one(BASE, "ClusterRole")["rules"]):
        return True
    role = one(BASE, "Role")
    return namespace == role["metadata"]["namespace"] and grants(role["rules"])


async def test_manifests_apply_and_rbac_covers_every_request_the_controller_makes(cluster: Cluster) -> None:
    applied = []
    for document in BASE:
        if document["kind"] in FAKE_SERVED_KINDS:
            await utils.create_from_dict(cluster.api_client, document)
            applied.append(document["kind"])
    assert sorted(applied) == ["ConfigMap", "IngressClass", "Namespace", "Service"]
    assert (await cluster.core.read_namespaced_config_map("ingress-proxy", NAMESPACE)).data["hsts"] == "true"

    # A controller configured exactly as the Deployment says (faster timings), doing all it does:
    # list+watch, a status write, an Event for a bad Ingress, Lease create/renew/release.
    arguments = controller_arguments(one(BASE, "Deployment"))
    await cluster.core.create_namespaced_service("default", {"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}})
    await cluster.discovery.create_namespaced_endpoint_slice("default", endpoint_slice("web", ["10.0.0.1"], [("", 80)]))
    await cluster.networking.create_namespaced_ingress("default", ingress("good", "good.example"))
    await cluster.networking.create_namespaced_ingress("default", ingress("bad", "bad.example", "no-such-service"))
    settings = ControllerSettings(
        translate=TranslateOptions(ingress_class=arguments.ingress_class, controller_class=arguments.controller_class),
        configmap=cli._namespaced(arguments.configmap, "--configmap"),
        publish=PublishSettings(service=cli._namespaced(arguments.publish_service, "--publish-service")),
        leader=LeaderSettings(namespace=NAMESPACE, lease_name=arguments.election_id, lease_duration=2, renew_deadline=1.5, retry_period=1.0),
        watch=FAST_WATCH,
    )
    log = cluster.server.request_log
    log.clear()  # from here on, the controller's requests (and the test's GETs of one Ingress)

    async def requested(method: str, fragment: str) -> bool:
        return any(m == method and fragment in p for m, p in log)

    source = KubernetesSource(cluster.api_client.configuration, settings)
    task = asyncio.create_task(source.run(RecordingSink()))
    try:
        await eventually(lambda: cluster.ingress_status("good"), bool, 5.0, "status written")
        await eventually(lambda: requested("PUT", "/leases/"), bool, 5.0, "Lease renewed")
        await eventually(lambda: requested("POST", "/events"), bool, 5.0, "Event posted")
    finally:
        task.cancel()  # a clean stop: the leader releases its Lease
        await asyncio.gather(task, return_exceptions=True)

    requests = set()
    for method, path_qs in list(log):
        path, _, query = path_qs.partition("?")
        target = _parse_path(path)
        resource = target.resource.plural + (f"/{target.subresource}" if target.subresource else "")
        requests.add((_verb(method, target.name, query), target.resource.group, resource, target.namespace))
    missing = sorted(str(request) for request in requests if not _allowed(*request))
    assert not missing, f"deploy/rbac.yaml does not allow: {missing}"
    verbs = {(verb, resource) for verb, _, resource, _ in requests}
    for needed in [("list", "ingresses"), ("watch", "endpointslices"), ("watch", "configmaps"), ("patch", "ingresses/status"),
                   ("create", "events"), ("create", "leases"), ("update", "leases"), ("patch", "leases")]:  # fmt: skip
        assert needed in verbs, f"the controller was expected to {needed[0]} {needed[1]}: {sorted(verbs)}"
