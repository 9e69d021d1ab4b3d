"""Throwaway certificates for one benchmark run: a CA, an RSA-2048, an ECDSA P-256 and an RSA-4096 leaf
(the last for the offload rows, where the private-key operation outweighs the rest of a handshake)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

KeyType = Literal["rsa", "ecdsa", "rsa4096"]
SERVER_NAME = "bench.test"


@dataclass(frozen=True)
class CertFiles:
    cert: Path  # leaf certificate (PEM)
    key: Path  # PKCS#8 private key (PEM)
    combined: Path  # certificate then key, the form HAProxy's `crt` wants


@dataclass(frozen=True)
class CertSet:
    ca: Path
    by_key_type: dict[KeyType, CertFiles]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def generate(directory: Path) -> CertSet:
    now = datetime.datetime.now(datetime.timezone.utc)
    validity = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("ingress-proxy bench CA"))
        .issuer_name(_name("ingress-proxy bench CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    leaf_keys: dict[KeyType, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey] = {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ecdsa": ec.generate_private_key(ec.SECP256R1()),
        "rsa4096": rsa.generate_private_key(public_exponent=65537, key_size=4096),
    }
    files: dict[KeyType, CertFiles] = {}
    for key_type, leaf_key in leaf_keys.items():
        leaf = (
            x509.CertificateBuilder()
            .subject_name(_name(SERVER_NAME))
            .issuer_name(ca_cert.subject)
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_pem = leaf.public_bytes(serialization.Encoding.PEM)
        key_pem = leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        paths = CertFiles(
            cert=directory / f"{key_type}.pem",
            key=directory / f"{key_type}.key",
            combined=directory / f"{key_type}.combined.pem",
        )
        paths.cert.write_bytes(cert_pem)
        paths.key.write_bytes(key_pem)
        paths.combined.write_bytes(cert_pem + key_pem)
        files[key_type] = paths
    return CertSet(ca=ca_path, by_key_type=files)
