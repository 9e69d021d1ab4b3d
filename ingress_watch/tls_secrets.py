"""TLS Secrets → `Certificate`s: decoding and checking tls.crt/tls.key (memoized by content),
and which Secret serves which host.

Part of `ingress_watch.translate` (its theory of operation states the rules); pure, no I/O."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from config.crypto import split_pin
from config.model import Certificate, KeySource, PemKey, Problem, StoreKey
from config.tls_material import (
    CertificateParseError,
    EncryptedKeyError,
    KeyParseError,
    KeyUriError,
    NoCertificateError,
    key_matches_certificate,
    key_uri_in,
    parse_certificate_chain,
    parse_private_key,
    san_host_patterns,
)
from ingress_watch.objects import ObjectIndex, Rejected, object_namespace, object_ref

TLS_SECRET_TYPE = "kubernetes.io/tls"



@dataclass(frozen=True)
class TlsMaterial:
    chain_pem: bytes
    key: KeySource
    dns_names: tuple[str, ...]

    def certificate(self, hosts: tuple[str, ...], origin: str) -> Certificate:
        return Certificate(self.chain_pem, self.key, hosts, origin)


def load_tls_secret(secret: dict | None, reference_to_fix: str) -> TlsMaterial:
    if secret is None:
        raise Rejected(f"not found; create it (kubectl create secret tls) or fix {reference_to_fix}")
    if secret.get("type") != TLS_SECRET_TYPE:
        raise Rejected(
            f"type is {secret.get('type')!r}, expected {TLS_SECRET_TYPE}; recreate it with kubectl create secret tls"
        )
    data = secret.get("data") or {}
    for key, content in (("tls.crt", "PEM certificate chain"), ("tls.key", "PEM private key")):
        if not data.get(key):
            raise Rejected(f"has no {key}; store the {content} there")
        if not isinstance(data[key], str):
            raise Rejected(f"{key} is not a string; store the base64-encoded {content} there")
    material = PARSED_SECRETS.parse(data["tls.crt"], data["tls.key"])
    if isinstance(material, str):
        raise Rejected(material)
    return material


def _parse_tls_data(certificate_base64: str, key_base64: str) -> TlsMaterial | str:
    """Decode and check a Secret's tls.crt/tls.key; a string is the reason they cannot be used.
    Memoized by content in `PARSED_SECRETS` (a pure function, so the output cannot change)."""
    decoded = {}
    for key, value in (("tls.crt", certificate_base64), ("tls.key", key_base64)):
        try:
            decoded[key] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError, TypeError):
            return f"{key} is not valid base64; store it base64-encoded under data"
    try:
        chain = parse_certificate_chain(decoded["tls.crt"])
    except CertificateParseError as error:
        return f"tls.crt holds a PEM certificate that does not parse ({error.detail}); re-export the chain"
    except NoCertificateError:
        return "tls.crt holds no PEM certificate (-----BEGIN CERTIFICATE-----); re-export the chain as PEM"
    dns_names = tuple(sorted(san_host_patterns(chain.leaf)))
    try:
        uri = key_uri_in(decoded["tls.key"])
    except KeyUriError as error:
        return f"tls.key {error}"
    if uri is not None:  # an HSM-backed key: the token checks the pair when the key is loaded
        uri_without_pin, pin = split_pin(uri)
        return TlsMaterial(decoded["tls.crt"], StoreKey(uri_without_pin, pin), dns_names)
    try:
        private_key = parse_private_key(decoded["tls.key"])
    except (EncryptedKeyError, KeyParseError):
        return (
            "tls.key is not an unencrypted PEM private key (PKCS#1 or PKCS#8) nor a pkcs11: key URI; "
            "re-export the key"
        )
    if not key_matches_certificate(private_key, chain.leaf):
        return "tls.key does not match the first certificate in tls.crt; store the key of that certificate"
    return TlsMaterial(decoded["tls.crt"], PemKey(decoded["tls.key"]), dns_names)


class _ParsedSecretMemo:
    """`_parse_tls_data` results by content, kept while the latest translations use them.

    Loading an RSA-2048 key costs ~36 ms here (OpenSSL 3 checks it) and every full translation
    re-reads every referenced Secret, so results are memoized. An LRU bound does not fit: every
    translation walks all Secrets in the same order, so with more Secrets than the bound nothing
    ever hits (5,000 TLS Ingresses cost ~7 s per change with a 1,024-entry LRU). Instead each
    translation keeps what it used and what the previous one used; older entries (rotated or
    deleted Secrets) are dropped, so memory follows the cluster's current Secrets.
    """

    def __init__(self) -> None:
        self._previous: dict[tuple[str, str], TlsMaterial | str] = {}
        self._current: dict[tuple[str, str], TlsMaterial | str] = {}

    def start_translation(self) -> None:
        self._previous, self._current = self._current, {}

    def parse(self, certificate_base64: str, key_base64: str) -> TlsMaterial | str:
        content = (certificate_base64, key_base64)
        result = self._current.get(content)
        if result is None:
            result = self._previous.get(content)
            if result is None:
                result = _parse_tls_data(certificate_base64, key_base64)
            self._current[content] = result
        return result


PARSED_SECRETS = _ParsedSecretMemo()


class CertificateCollector:
    """One Certificate per Secret; each host served by the Secret of the oldest Ingress naming it."""

    def __init__(self, index: ObjectIndex, problems: list[Problem]) -> None:
        self._index = index
        self._problems = problems
        self._loaded: dict[tuple[str, str], TlsMaterial | Rejected] = {}
        self._hosts: dict[str, set[str]] = {}  # Secret ref → hosts
        self._material: dict[str, TlsMaterial] = {}
        self._host_owner: dict[str, tuple[str, str]] = {}  # host → (Secret ref, Ingress ref)

    def add(self, ingress: dict, tls_number: int, tls: dict) -> None:
        secret_name = tls.get("secretName")
        if not secret_name:
            return  # these hosts get the default certificate, as the Ingress API specifies
        location = f"Ingress {object_ref(ingress)}"
        key = (object_namespace(ingress), secret_name)
        secret_ref = f"{key[0]}/{key[1]}"
        if key not in self._loaded:
            try:
                self._loaded[key] = load_tls_secret(self._index.secrets.get(key), "spec.tls[].secretName")
            except Rejected as rejected:
                self._loaded[key] = rejected
        material = self._loaded[key]
        if isinstance(material, Rejected):
            self._problems.append(Problem(location, f"Secret {secret_ref}: {material} (spec.tls[{tls_number}])"))
            return
        hosts = [host.lower() for host in tls.get("hosts") or ()] or list(material.dns_names)
        if not hosts:
            self._problems.append(Problem(location, (
                f"Secret {secret_ref}: spec.tls[{tls_number}] lists no hosts and the certificate has no DNS names; "
                "add spec.tls[].hosts"
            )))
            return
        for host in hosts:
            owner_secret, owner_ingress = self._host_owner.setdefault(host, (secret_ref, object_ref(ingress)))
            if owner_secret != secret_ref:
                self._problems.append(Problem(location, (
                    f"Secret {secret_ref}: host {host!r} is already served by Secret {owner_secret} of the older "
                    f"Ingress {owner_ingress}; remove it from one spec.tls"
                )))
                continue
            self._material[secret_ref] = material
            self._hosts.setdefault(secret_ref, set()).add(host)

    def result(self) -> tuple[Certificate, ...]:
        return tuple(
            self._material[secret_ref].certificate(tuple(sorted(hosts)), origin=f"Secret {secret_ref}")
            for secret_ref, hosts in sorted(self._hosts.items())
        )


def covered_by_certificate(host: str, certificate_hosts: frozenset[str]) -> bool:
    """Would SNI `host` find a certificate: its own name, or a wildcard one label up."""
    if not host:
        return False
    if host in certificate_hosts:
        return True
    return not host.startswith("*.") and "*." + host.partition(".")[2] in certificate_hosts
