"""Certificates, private keys and host patterns: the checks both route sources share.

The routes-file loader (`config.routes_file`) and the Kubernetes translator
(`ingress_watch.translate`) read the same material from different places (files named in YAML,
base64 fields of a TLS Secret) and must accept and reject exactly the same things. Everything
here is pure: bytes or text in, a value out, or a `ValueError` subclass whose `str()` is a
one-line message a user can act on. Each caller says where the material came from and may phrase
the fix its own way, so the error types carry what a caller needs to do that (which certificate
block, whether a host fault concerns the wildcard). No message ever contains key bytes.

Decisions:
- A chain is the PEM CERTIFICATE blocks of a file, in order, anything between them ignored (so
  a bundle with a key or comments in it still yields its certificates); the first is the leaf.
- Keys are unencrypted PEM: PKCS#1, SEC1 or PKCS#8. An encrypted key is its own error, because
  its fix (decrypt it, or keep it in an HSM) differs from the one for a key that does not parse.
- A key kept in a token is named instead of given: a `pkcs11:` URI, bare or in pkcs11-provider's
  PEM wrapping (`key_uri_in`). Whether it matches its certificate can only be asked of the token,
  so that check happens where the token is reached (config.crypto), not here.
- Host patterns are lower-case DNS names (RFC 1035 lengths, letters, digits and '-', IDNs in
  punycode), optionally with `*` as the whole leftmost label; "" (any host) only when allowed.
  No port, no trailing dot: routing compares the Host header without port and SNI has neither.
- A certificate's subjectAltName DNS names serve as its hosts only when they are valid host
  patterns: a name that cannot be routed (a bare "*", a Unicode IDN) is not served.

One function is not a check: `self_signed_certificate` makes fresh key material, for the
generated default certificate and the `make run` demo.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PRIVATE_KEY_TYPES

PrivateKey = PRIVATE_KEY_TYPES

PEM_CERTIFICATE_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_MAX_HOST_LENGTH = 253  # RFC 1035 limit on a DNS name's text form


# ---- certificate chains ---------------------------------------------------------------------


class NoCertificateError(ValueError):
    def __init__(self) -> None:
        super().__init__("holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")


class CertificateParseError(ValueError):
    """Some PEM blocks are not certificates; `numbers` counts blocks from 1, `detail` is the first reason."""

    def __init__(self, numbers: tuple[int, ...], detail: str) -> None:
        self.numbers = numbers
        self.detail = detail
        listed = ", ".join(f"#{number}" for number in numbers)
        super().__init__(f"certificate {listed} does not parse ({detail}); re-export the chain as PEM")


@dataclass(frozen=True)
class CertificateChain:
    certificates: tuple[x509.Certificate, ...]  # leaf first, never empty
    pem: bytes = field(repr=False)  # the PEM blocks alone, each followed by "\n"

    @property
    def leaf(self) -> x509.Certificate:
        return self.certificates[0]


def parse_certificate_chain(data: bytes) -> CertificateChain:
    """The certificates of a PEM file, leaf first; NoCertificateError or CertificateParseError."""
    blocks = PEM_CERTIFICATE_BLOCK.findall(data)
    if not blocks:
        raise NoCertificateError()
    certificates: list[x509.Certificate] = []
    failed: list[int] = []
    first_reason = ""
    for number, block in enumerate(blocks, start=1):
        try:
            certificates.append(x509.load_pem_x509_certificate(block))
        except ValueError as error:
            failed.append(number)
            first_reason = first_reason or " ".join(str(error).split())
    if failed:
        raise CertificateParseError(tuple(failed), first_reason)
    return CertificateChain(certificates=tuple(certificates), pem=b"\n".join(blocks) + b"\n")


# ---- private keys ---------------------------------------------------------------------------


class EncryptedKeyError(ValueError):
    def __init__(self) -> None:
        super().__init__("the private key is encrypted (decrypt it: openssl pkey -in KEY -out PLAIN)")


class KeyParseError(ValueError):
    def __init__(self) -> None:
        super().__init__(
            "holds no usable PEM private key "
            "(expected BEGIN PRIVATE KEY, BEGIN RSA PRIVATE KEY or BEGIN EC PRIVATE KEY)"
        )


def parse_private_key(data: bytes) -> PrivateKey:
    """An unencrypted PEM private key (PKCS#1, SEC1 or PKCS#8); EncryptedKeyError or KeyParseError."""
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's "password was not given but private key is encrypted"
        raise EncryptedKeyError() from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyParseError() from None


# ---- keys that stay in a token: a URI instead of key material ------------------------------------

PKCS11_URI_SCHEME = "pkcs11:"  # RFC 7512
PKCS11_URI_PEM_BLOCK = re.compile(
    rb"-----BEGIN PKCS#11 PROVIDER URI-----\r?\n(.+?)\r?\n-----END PKCS#11 PROVIDER URI-----", re.DOTALL
)
_PKCS11_URI_DESCRIPTION = b"PKCS#11 Provider URI v1.0"
_DER_SEQUENCE, _DER_VISIBLE_STRING, _DER_UTF8_STRING = 0x30, 0x1A, 0x0C


class KeyUriError(ValueError):
    def __init__(self, detail: str) -> None:
        super().__init__(f"holds a PKCS#11 PROVIDER URI block that does not parse ({detail}); write it again with pkcs11-provider, or store the bare pkcs11: URI")


def _der_element(data: bytes, offset: int, tag: int) -> tuple[bytes, int]:
    """The value of the DER element of type `tag` at `offset`, and the offset after it."""
    if offset + 2 > len(data) or data[offset] != tag:
        raise KeyUriError(f"expected DER tag 0x{tag:02x} at byte {offset}")
    length, start = data[offset + 1], offset + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 2 or start + count > len(data):
            raise KeyUriError("bad DER length")
        length, start = int.from_bytes(data[start : start + count], "big"), start + count
    if start + length > len(data):
        raise KeyUriError("DER element runs past the end")
    return data[start : start + length], start + length


def key_uri_in(data: bytes) -> str | None:
    """The key URI `data` holds in place of key material, or None when it holds no such thing.

    Two spellings: the bare URI on one line (`pkcs11:token=...;object=...`), or the PEM block
    pkcs11-provider writes for a key it holds (`-----BEGIN PKCS#11 PROVIDER URI-----`, DER
    `SEQUENCE { desc VisibleString "PKCS#11 Provider URI v1.0", uri UTF8String }`). KeyUriError
    when a block is there but broken."""
    text = data.strip()
    if text[: len(PKCS11_URI_SCHEME)].lower() == PKCS11_URI_SCHEME.encode() and b"\n" not in text:
        try:
            return text.decode("ascii")
        except UnicodeDecodeError:
            return None
    match = PKCS11_URI_PEM_BLOCK.search(data)
    if match is None:
        return None
    try:
        der = base64.b64decode(b"".join(match[1].split()), validate=True)
    except (binascii.Error, ValueError):
        raise KeyUriError("not base64") from None
    body, _ = _der_element(der, 0, _DER_SEQUENCE)
    description, offset = _der_element(body, 0, _DER_VISIBLE_STRING)
    if description != _PKCS11_URI_DESCRIPTION:
        raise KeyUriError(f"unknown description {description[:40]!r}")
    uri, _ = _der_element(body, offset, _DER_UTF8_STRING)
    try:
        decoded = uri.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyUriError("the URI is not UTF-8") from None
    if not decoded.lower().startswith(PKCS11_URI_SCHEME):
        raise KeyUriError("the URI is not a pkcs11: URI")
    return decoded


def wrap_key_uri(uri: str) -> bytes:
    """`uri` as pkcs11-provider's PEM block (the inverse of `key_uri_in`; for tests and docs)."""

    def element(tag: int, value: bytes) -> bytes:
        length = len(value)
        encoded = bytes([length]) if length < 0x80 else bytes([0x81, length]) if length < 0x100 else bytes([0x82]) + length.to_bytes(2, "big")
        return bytes([tag]) + encoded + value

    der = element(_DER_SEQUENCE, element(_DER_VISIBLE_STRING, _PKCS11_URI_DESCRIPTION) + element(_DER_UTF8_STRING, uri.encode()))
    return b"-----BEGIN PKCS#11 PROVIDER URI-----\n" + base64.encodebytes(der) + b"-----END PKCS#11 PROVIDER URI-----\n"


def key_matches_certificate(private_key: PrivateKey, certificate: x509.Certificate) -> bool:
    """Whether `private_key` is the key `certificate` was issued for (equal public keys)."""
    encoding, public_format = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    certificate_public = certificate.public_key().public_bytes(encoding, public_format)
    return private_key.public_key().public_bytes(encoding, public_format) == certificate_public


# ---- host patterns --------------------------------------------------------------------------


class HostPatternError(ValueError):
    """A host that cannot be routed; `wildcard_fault` is True when the fault is where the '*' stands."""

    def __init__(self, message: str, wildcard_fault: bool = False) -> None:
        self.wildcard_fault = wildcard_fault
        super().__init__(message)


def is_dns_name(name: str) -> bool:
    """A lower-case DNS name: dot-separated labels of letters, digits and inner '-', at most 253 characters."""
    return len(name) <= _MAX_HOST_LENGTH and all(_DNS_LABEL.fullmatch(label) for label in name.split("."))


def is_ip_address(text: str) -> bool:
    """An IPv4 or IPv6 literal (a backend's TLS name may be one: then it is verified as an IP SAN)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_host_pattern(text: str, allow_any: bool) -> str:
    """The lower-cased host pattern ("" = any host, only if `allow_any`); HostPatternError says what is wrong."""
    host = text.lower()
    if not host:
        if allow_any:
            return ""
        raise HostPatternError("the host is empty (name a host such as www.example.com)")
    if ":" in host:
        raise HostPatternError(
            f"'{text}' carries a port or is an IPv6 address "
            f"(remove ':{host.rpartition(':')[2]}': routing ignores ports)"
        )
    if host.endswith(".") and host.rstrip(".") not in ("", "*"):
        raise HostPatternError(f"'{text}' ends with a dot (write {host.rstrip('.')})")
    if host == "*":
        hint = "omit host to match every host" if allow_any else "name hosts like *.example.com"
        raise HostPatternError(f"'*' alone is not a host pattern ({hint})", wildcard_fault=True)
    if host.startswith("*."):
        if "*" in host[2:] or not is_dns_name(host[2:]):
            raise HostPatternError(
                f"'{text}' is not a valid wildcard (the wildcard is the whole leftmost label: *.example.com)",
                wildcard_fault="*" in host[2:] or not host[2:].strip("."),
            )
        return host
    if "*" in host:
        rest = host.split(".", 1)[-1]
        fix = f"write *.{rest}" if "." in host and "*" not in rest else "like *.example.com"
        raise HostPatternError(f"'{text}': a wildcard must be the whole leftmost label ({fix})", wildcard_fault=True)
    if not is_dns_name(host):
        raise HostPatternError(
            f"'{text}' is not a valid host name "
            "(letters, digits, '-' and '.'; internationalised names in punycode)"
        )
    return host


def san_host_patterns(certificate: x509.Certificate) -> tuple[str, ...]:
    """The certificate's subjectAltName DNS names that are valid host patterns, lower-cased, in order, once each."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    patterns: list[str] = []
    for name in names.get_values_for_type(x509.DNSName):
        try:
            patterns.append(parse_host_pattern(name, allow_any=False))
        except HostPatternError:
            continue
    return tuple(dict.fromkeys(patterns))


def self_signed_certificate(
    common_name: str, dns_names: Sequence[str] = (), ip_addresses: Sequence[str] = (), days: int = 365
) -> tuple[bytes, bytes]:
    """A fresh ECDSA P-256 key and a self-signed certificate for it: (certificate PEM, PKCS#8 key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    alternative_names: list[x509.GeneralName] = [x509.DNSName(host) for host in dns_names]
    alternative_names += [x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses]
    if alternative_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
    certificate = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem
