"""How an Ingress's backends are reached: protocol (HTTP, HTTPS, h2c, gRPC) and upstream TLS
from annotations, Service `appProtocol` and proxy-ssl Secrets.

Part of `ingress_watch.translate` (its theory of operation states the rules); pure, no I/O."""

from __future__ import annotations

import base64
import binascii
import dataclasses
from dataclasses import dataclass

from config.model import Backend, BackendProtocol, ClientCertificate, Problem, UpstreamTls
from config.tls_material import (
    CertificateParseError,
    NoCertificateError,
    is_dns_name,
    is_ip_address,
    parse_certificate_chain,
)
from ingress_watch.annotations import NGINX_PREFIX
from ingress_watch.objects import (
    ObjectIndex,
    Rejected,
    ServiceReference,
    object_metadata,
    object_namespace,
    parse_bool,
)
from ingress_watch.tls_secrets import PARSED_SECRETS


HAPROXY_PREFIXES = ("haproxy-ingress.github.io/", "ingress.kubernetes.io/")  # current, legacy
_NGINX_PROTOCOLS = {
    "HTTP": BackendProtocol.HTTP,
    "HTTPS": BackendProtocol.HTTPS,
    "GRPC": BackendProtocol.H2C,
    "GRPCS": BackendProtocol.H2,
    "H2C": BackendProtocol.H2C,
}
_HAPROXY_PROTOCOLS = {
    "h1": BackendProtocol.HTTP,
    "h1-ssl": BackendProtocol.HTTPS,
    "h2": BackendProtocol.H2C,
    "h2-ssl": BackendProtocol.H2,
}
_APP_PROTOCOLS = {"http": BackendProtocol.HTTP, "https": BackendProtocol.HTTPS, "kubernetes.io/h2c": BackendProtocol.H2C}
_ON_OFF = {"on": True, "off": False, "true": True, "false": False}


@dataclass(frozen=True)
class TransportAnnotations:
    """What one Ingress's annotations say about how to reach its backends (None: not said)."""

    protocol: BackendProtocol | None = None
    ca_secret: str | None = None  # Secret name in the Ingress's namespace
    ca_secret_annotation: str = ""
    ca_secret_refused: str | None = None  # why the CA Secret named cannot be used: its paths are skipped
    verify: bool | None = None
    server_name: str | None = None
    send_sni: bool | None = None

    @property
    def tls_settings_given(self) -> bool:
        return (self.ca_secret, self.ca_secret_refused, self.verify, self.server_name, self.send_sni) != (None,) * 5


def transport_annotations(ingress: dict, location: str, problems: list[Problem]) -> TransportAnnotations:
    annotations = object_metadata(ingress).get("annotations") or {}
    found: dict[str, object] = {}

    def note(annotation: str, message: str) -> None:
        problems.append(Problem(location, f"annotation {annotation}: {message}; annotation ignored"))

    def read(suffix: str, prefixes: tuple[str, ...]) -> tuple[str, str] | None:
        for prefix in prefixes:
            if prefix + suffix in annotations:
                return prefix + suffix, str(annotations[prefix + suffix])
        return None

    if (given := read("backend-protocol", (NGINX_PREFIX,))) is not None:
        annotation, value = given
        if value.upper() in _NGINX_PROTOCOLS:
            found["protocol"] = _NGINX_PROTOCOLS[value.upper()]
        else:
            note(annotation, f"{value!r} is not supported (use {', '.join(_NGINX_PROTOCOLS)})")
    elif (given := read("backend-protocol", HAPROXY_PREFIXES)) is not None:
        annotation, value = given
        if value.lower() in _HAPROXY_PROTOCOLS:
            found["protocol"] = _HAPROXY_PROTOCOLS[value.lower()]
        else:
            note(annotation, f"{value!r} is not supported (use {', '.join(_HAPROXY_PROTOCOLS)})")
    elif (given := read("secure-backends", HAPROXY_PREFIXES)) is not None:
        annotation, value = given
        try:
            found["protocol"] = BackendProtocol.HTTPS if parse_bool(value) else BackendProtocol.HTTP
        except Rejected as rejected:
            note(annotation, str(rejected))
    if (given := read("proxy-ssl-secret", (NGINX_PREFIX,)) or read("secure-verify-ca-secret", HAPROXY_PREFIXES)) is not None:
        annotation, value = given
        namespace, slash, name = value.rpartition("/")
        if slash and namespace != object_namespace(ingress):
            found["ca_secret_refused"] = (
                f"annotation {annotation}: Secret {value} is in another namespace; use a Secret in {object_namespace(ingress)}"
            )
        elif not name:
            found["ca_secret_refused"] = f"annotation {annotation}: no Secret named; write namespace/name or name"
        else:
            found["ca_secret"], found["ca_secret_annotation"] = name, annotation
    for key, suffix in (("verify", "proxy-ssl-verify"), ("send_sni", "proxy-ssl-server-name")):
        if (given := read(suffix, (NGINX_PREFIX,))) is not None:
            annotation, value = given
            if value.strip().lower() in _ON_OFF:
                found[key] = _ON_OFF[value.strip().lower()]
            else:
                note(annotation, f'{value!r} is not "on" or "off"')
    if (given := read("proxy-ssl-name", (NGINX_PREFIX,))) is not None:
        annotation, value = given
        name = value.strip().lower()
        if is_dns_name(name) or is_ip_address(name):
            found["server_name"] = name
        else:
            note(annotation, f"{value!r} is not a DNS name or IP address; write the name the backend's certificate carries")
    return TransportAnnotations(**found)  # type: ignore[arg-type]



def with_transport(
    backend: Backend, reference: ServiceReference, transport: TransportAnnotations, index: ObjectIndex
) -> Backend:
    """`backend` with its protocol and TLS settings; Rejected when they cannot be had."""
    protocol = transport.protocol
    if protocol is None:
        app_protocol = index.app_protocol(reference)
        protocol = _APP_PROTOCOLS.get((app_protocol or "http").lower(), BackendProtocol.HTTP)
    if not protocol.uses_tls:
        return backend if protocol is BackendProtocol.HTTP else dataclasses.replace(backend, protocol=protocol)
    if transport.ca_secret_refused is not None:
        raise Rejected(transport.ca_secret_refused)
    ca_pem = None
    client_certificate = None
    if transport.ca_secret is not None:
        ca_pem, client_certificate = _load_ca_secret(index, reference.namespace, transport.ca_secret, transport.ca_secret_annotation)
    tls = UpstreamTls(
        ca_pem=ca_pem,
        verify=transport.verify if transport.verify is not None else ca_pem is not None,
        server_name=transport.server_name or f"{reference.service}.{reference.namespace}.svc",
        send_sni=transport.send_sni is not False,
        client_certificate=client_certificate,
    )
    return dataclasses.replace(backend, protocol=protocol, tls=tls)


def load_ca_bundle(index: ObjectIndex, namespace: str, name: str, annotation: str) -> bytes:
    """The PEM CA bundle under `ca.crt` of a Secret of any type (ingress-nginx users keep them in
    Opaque Secrets, shared/NOTES.md §6), for proxy-ssl-secret and auth-tls-secret alike."""
    secret_ref = f"{namespace}/{name}"
    secret = index.secrets.get((namespace, name))
    if secret is None:
        raise Rejected(f"Secret {secret_ref} (annotation {annotation}) not found; create it with a ca.crt key")
    data = secret.get("data") or {}
    if not isinstance(data.get("ca.crt"), str):
        raise Rejected(f"Secret {secret_ref} (annotation {annotation}) has no ca.crt; store the PEM CA bundle there")
    try:
        return parse_certificate_chain(base64.b64decode(data["ca.crt"], validate=True)).pem
    except (binascii.Error, ValueError):
        raise Rejected(f"Secret {secret_ref}: ca.crt is not valid base64; store it base64-encoded under data") from None
    except (CertificateParseError, NoCertificateError):
        raise Rejected(f"Secret {secret_ref}: ca.crt holds no usable PEM certificate; store the CA bundle as PEM") from None


def _load_ca_secret(
    index: ObjectIndex, namespace: str, name: str, annotation: str
) -> tuple[bytes, ClientCertificate | None]:
    """A proxy-ssl Secret's CA bundle, and its client certificate when it holds tls.crt + tls.key."""
    secret_ref = f"{namespace}/{name}"
    ca_pem = load_ca_bundle(index, namespace, name, annotation)
    data = index.secrets[(namespace, name)].get("data") or {}
    if not (isinstance(data.get("tls.crt"), str) and isinstance(data.get("tls.key"), str)):
        return ca_pem, None
    material = PARSED_SECRETS.parse(data["tls.crt"], data["tls.key"])
    if isinstance(material, str):
        raise Rejected(f"Secret {secret_ref}: client certificate: {material}")
    return ca_pem, ClientCertificate(material.chain_pem, material.key, f"Secret {secret_ref}")
