"""Loads translation cases: `cases/<name>/input.yaml` → Snapshot, `expected.yaml` → expected output.

input.yaml is a multi-document stream of Kubernetes objects as `kubectl get -o yaml` prints them
(`metadata.namespace` defaults to "default" for namespaced kinds). An optional document of
`kind: TranslateOptions` holds the options (field names of `TranslateOptions`). The ConfigMap
named `ingress-proxy` is the controller's settings; any other ConfigMap is one of headers
(`Snapshot.named_configmaps`: custom-headers, add-headers, proxy-set-headers).

Secret data values may be placeholders the loader replaces with base64 text, so no key material
is checked in:
  {generate: [foo.example.com, ...], key: ec|rsa, format: pkcs8|pkcs1|traditional}
      tls.crt: a self-signed certificate for those names; tls.key: its private key. The key pair
      is one per (names, key) within a test session, so a crt and key with the same names match
      and different names give a mismatched pair.
  {base64: "any text"} the text, base64-encoded (e.g. a PEM that does not parse).
A plain string is used as is (e.g. text that is not base64).

expected.yaml (every key optional; absent = empty or the model's default):
  claimed: [ns/name, ...]
  virtual_hosts: [{host: foo.example.com, redirect_to_https: true, paths: ["/api Prefix ns/svc:80", ...]}]
      client certificates of a host: client_auth: {ca: ns/secret, verify: on, depth: 1, pass_certificate: false,
      error_page: URL, match_subject: REGEX}
      (ca: that Secret's decoded ca.crt; match_subject compiled as the producers compile it; verify, depth and pass_certificate as shown are the defaults)
      a path with a policy: {rule: "/api Prefix ns/svc:80", policy: {RoutePolicy fields}}, where
      allow_sources/deny_sources are lists of CIDRs, redirect is {location: URL, status: 301} and
      request_headers/response_headers are {set: [[name, value]], add: [[name, value]], remove: [name]}
  backends: {ns/svc:80: ["10.0.0.1:8080", ...]}
      or, for a backend over TLS: {ns/svc:443: {endpoints: [...], protocol: https, tls: {ca: ns/secret,
      verify: true, server_name: name, send_sni: true, client_certificate: ns/secret}}}
      (ca: that Secret's decoded ca.crt; client_certificate: its tls.crt and tls.key)
  default_backend: ns/svc:80
  certificates: [{secret: ns/name, hosts: [...]}]   # chain and key: that input Secret's decoded data
                  # (or {..., store_key: {uri: "pkcs11:...", pin: "..."}} for a key kept in a token)
  default_certificate: {secret: ns/name}
  crypto: {engine: {id: qatengine, algorithms: [RSA]}, async_mode: true,
           providers: [{name: pkcs11, parameters: {pkcs11-module-path: /x.so}}], propquery: "?provider=pkcs11",
           provider_path: /opt/modules}
  timeouts: {connect: 0.5, ...}
  hsts: {max_age: 60, include_subdomains: true, preload: false}
  real_ip: [CIDR, ...]   # trusted X-Forwarded-For peers
  compute_full_forwarded_for: true   # with real_ip: the trusted chain goes on, the peer appended
  proxy_protocol: [https, http]   # listeners that require a PROXY protocol header
  named_configmaps: [ns/name, ...]   # header ConfigMaps the translation looked up (found or not)
  problems: [{location: "Ingress ns/name", message: "a substring of the message"}, ...]
"""

from __future__ import annotations

import base64
import re
import datetime
import functools
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from config.model import (
    Address,
    Affinity,
    Backend,
    BackendProtocol,
    Canary,
    ClientAuth,
    ClientVerify,
    Certificate,
    ClientCertificate,
    Configuration,
    Cors,
    CryptoSettings,
    EngineSettings,
    HeaderEdits,
    Hsts,
    PathRule,
    PathType,
    PemKey,
    ProviderSettings,
    RealIp,
    Redirect,
    RoutePolicy,
    RouteTable,
    StoreKey,
    Timeouts,
    UpstreamTls,
    VirtualHost,
)
from ingress_watch.snapshot import Snapshot
from ingress_watch.translate import TranslateOptions

CASES_DIR = Path(__file__).parent / "cases"
SNAPSHOT_FIELDS = {
    "Ingress": "ingresses",
    "IngressClass": "ingress_classes",
    "Service": "services",
    "EndpointSlice": "endpoint_slices",
    "Secret": "secrets",
}
CLUSTER_SCOPED_KINDS = {"IngressClass"}
KEY_FORMATS = {
    "pkcs8": serialization.PrivateFormat.PKCS8,
    "pkcs1": serialization.PrivateFormat.TraditionalOpenSSL,  # "RSA PRIVATE KEY" for RSA keys
    "traditional": serialization.PrivateFormat.TraditionalOpenSSL,
}


@dataclass(frozen=True)
class Case:
    name: str
    options: TranslateOptions
    snapshot: Snapshot
    expected: dict[str, Any]


def case_names() -> list[str]:
    return sorted(path.name for path in CASES_DIR.iterdir() if (path / "input.yaml").is_file())


def load_case(name: str, directory: Path | None = None) -> Case:
    directory = directory or CASES_DIR / name
    documents = [doc for doc in yaml.safe_load_all((directory / "input.yaml").read_text()) if doc]
    expected = yaml.safe_load((directory / "expected.yaml").read_text()) or {}
    options = TranslateOptions()
    fields: dict[str, list[dict]] = {field: [] for field in SNAPSHOT_FIELDS.values()}
    configmap = None
    named_configmaps: list[dict] = []
    for document in documents:
        kind = document.get("kind")
        if kind == "TranslateOptions":
            settings = {key: value for key, value in document.items() if key != "kind"}
            if "default_ssl_certificate" in settings:
                namespace, _, secret = _split_ref(settings["default_ssl_certificate"])
                settings["default_ssl_certificate"] = (namespace, secret)
            options = TranslateOptions(**settings)
            continue
        if kind not in CLUSTER_SCOPED_KINDS:
            document.setdefault("metadata", {}).setdefault("namespace", "default")
        if kind == "Secret":
            document["data"] = {key: _secret_value(key, value) for key, value in (document.get("data") or {}).items()}
        if kind == "ConfigMap" and document["metadata"]["name"] == "ingress-proxy":
            assert configmap is None, f"{name}: one settings ConfigMap per case"
            configmap = document
        elif kind == "ConfigMap":
            named_configmaps.append(document)
        elif kind in SNAPSHOT_FIELDS:
            fields[SNAPSHOT_FIELDS[kind]].append(document)
        else:
            raise AssertionError(f"{name}/input.yaml: unknown kind {kind!r}")
    snapshot = Snapshot(
        **{field: tuple(objects) for field, objects in fields.items()}, configmap=configmap, named_configmaps=tuple(named_configmaps)
    )
    return Case(name, options, snapshot, expected)


def expected_configuration(case: Case) -> Configuration:
    expected = case.expected
    secrets = {
        f"{secret['metadata']['namespace']}/{secret['metadata']['name']}": secret for secret in case.snapshot.secrets
    }

    def certificate(spec: dict, hosts: tuple[str, ...]) -> Certificate:
        data = secrets[spec["secret"]]["data"]
        store_key = spec.get("store_key")
        return Certificate(
            chain_pem=base64.b64decode(data["tls.crt"]),
            key=StoreKey(store_key["uri"], store_key.get("pin")) if store_key else PemKey(base64.b64decode(data["tls.key"])),
            hosts=hosts,
            origin=f"Secret {spec['secret']}",
        )

    crypto = expected.get("crypto") or {}
    engine = crypto.get("engine")
    return Configuration(
        routes=RouteTable(
            virtual_hosts=tuple(
                VirtualHost(
                    host=host["host"],
                    paths=tuple(_path_rule(text) for text in host["paths"]),
                    redirect_to_https=host.get("redirect_to_https", False),
                    client_auth=_client_auth(host.get("client_auth"), secrets),
                )
                for host in expected.get("virtual_hosts") or ()
            ),
            backends=tuple(
                _backend(name, spec, secrets) for name, spec in (expected.get("backends") or {}).items()
            ),
            default_backend=expected.get("default_backend"),
        ),
        certificates=tuple(
            certificate(spec, tuple(spec["hosts"])) for spec in expected.get("certificates") or ()
        ),
        default_certificate=(
            certificate(expected["default_certificate"], ()) if expected.get("default_certificate") else None
        ),
        crypto=CryptoSettings(
            engine=EngineSettings(id=engine["id"], algorithms=tuple(engine.get("algorithms", ("ALL",))))
            if engine
            else None,
            async_mode=crypto.get("async_mode", False),
            providers=tuple(
                ProviderSettings(
                    provider["name"],
                    parameters=tuple((provider.get("parameters") or {}).items()),
                    required=provider.get("required", True),
                )
                for provider in crypto.get("providers") or ()
            ),
            propquery=crypto.get("propquery"),
            provider_path=crypto.get("provider_path"),
        ),
        timeouts=Timeouts(**(expected.get("timeouts") or {})),
        hsts=Hsts(**expected["hsts"]) if expected.get("hsts") is not None else None,
        real_ip=RealIp(
            tuple(ipaddress.ip_network(cidr) for cidr in expected["real_ip"]),
            compute_full_forwarded_for=expected.get("compute_full_forwarded_for", False),
        ) if expected.get("real_ip") else None,
        proxy_protocol=tuple(expected.get("proxy_protocol") or ()),
    )  # fmt: skip


def _client_auth(spec: dict | None, secrets: dict[str, dict]) -> ClientAuth | None:
    if spec is None:
        return None
    return ClientAuth(
        base64.b64decode(secrets[spec["ca"]]["data"]["ca.crt"]),
        ClientVerify(spec.get("verify", "on")),
        spec.get("depth", 1),
        spec.get("pass_certificate", False),
        spec.get("error_page"),
        re.compile(spec["match_subject"]) if "match_subject" in spec else None,
    )


def _backend(name: str, spec: list | dict, secrets: dict[str, dict]) -> Backend:
    if isinstance(spec, list):
        return Backend(name, tuple(_address(text) for text in spec))
    endpoints = tuple(_address(text) for text in spec.get("endpoints") or ())
    tls_spec = spec.get("tls")
    if tls_spec is None:
        return Backend(name, endpoints, BackendProtocol(spec.get("protocol", "http")))
    client = None
    if tls_spec.get("client_certificate"):
        data = secrets[tls_spec["client_certificate"]]["data"]
        client = ClientCertificate(
            base64.b64decode(data["tls.crt"]), PemKey(base64.b64decode(data["tls.key"])), f"Secret {tls_spec['client_certificate']}"
        )
    tls = UpstreamTls(
        ca_pem=base64.b64decode(secrets[tls_spec["ca"]]["data"]["ca.crt"]) if tls_spec.get("ca") else None,
        verify=tls_spec.get("verify", False),
        server_name=tls_spec.get("server_name"),
        send_sni=tls_spec.get("send_sni", True),
        client_certificate=client,
    )
    return Backend(name, endpoints, BackendProtocol(spec["protocol"]), tls)


def expected_claimed(case: Case) -> tuple[tuple[str, str], ...]:
    return tuple((namespace, name) for namespace, _, name in map(_split_ref, case.expected.get("claimed") or ()))


def _split_ref(reference: str) -> tuple[str, str, str]:
    return reference.partition("/")


def _path_rule(spec: str | dict) -> PathRule:
    text = spec if isinstance(spec, str) else spec["rule"]
    path, path_type, backend = text.split()
    policy = None
    if isinstance(spec, dict):
        fields = dict(spec["policy"])
        for name in ("allow_sources", "deny_sources"):
            if name in fields:
                fields[name] = tuple(ipaddress.ip_network(cidr) for cidr in fields[name])
        if "redirect" in fields:
            fields["redirect"] = Redirect(**fields["redirect"])
        if "affinity" in fields:
            fields["affinity"] = Affinity(**fields["affinity"])
        if "canary" in fields:
            fields["canary"] = Canary(**fields["canary"])
        if "cors" in fields:
            cors = dict(fields["cors"])
            if "allow_origins" in cors:
                cors["allow_origins"] = tuple(cors["allow_origins"])
            fields["cors"] = Cors(**cors)
        for name in ("request_headers", "response_headers"):
            if name in fields:
                edits = fields[name]
                fields[name] = HeaderEdits(
                    set=tuple(map(tuple, edits.get("set", ()))), add=tuple(map(tuple, edits.get("add", ()))),
                    remove=tuple(edits.get("remove", ())),
                )
        policy = RoutePolicy(**fields)
    return PathRule(path, PathType(path_type), backend, policy)


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return Address(host.strip("[]"), int(port))


def _secret_value(data_key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if "base64" in value:
        return base64.b64encode(value["base64"].encode()).decode()
    private_key, certificate = _key_pair(tuple(value["generate"]), value.get("key", "ec"))
    if data_key in ("tls.crt", "ca.crt"):
        pem = certificate.public_bytes(serialization.Encoding.PEM)
    else:
        pem = private_key.private_bytes(
            serialization.Encoding.PEM, KEY_FORMATS[value.get("format", "pkcs8")], serialization.NoEncryption()
        )
    return base64.b64encode(pem).decode()


@functools.cache
def _key_pair(names: tuple[str, ...], key_type: str) -> tuple[Any, x509.Certificate]:
    """A self-signed certificate for `names` (the first is the CN; none = no SAN extension)."""
    private_key: Any = rsa.generate_private_key(65537, 2048) if key_type == "rsa" else ec.generate_private_key(
        ec.SECP256R1()
    )
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "no-san.test")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2100, 1, 1))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    return private_key, builder.sign(private_key, hashes.SHA256())
