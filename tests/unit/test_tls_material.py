"""config.tls_material: the certificate, key and host checks the routes file and the translator share."""

from __future__ import annotations

import datetime
import ipaddress
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from config.tls_material import (
    CertificateParseError,
    EncryptedKeyError,
    HostPatternError,
    KeyParseError,
    NoCertificateError,
    is_dns_name,
    key_matches_certificate,
    parse_certificate_chain,
    parse_host_pattern,
    parse_private_key,
    san_host_patterns,
)

PKCS8 = serialization.PrivateFormat.PKCS8
TRADITIONAL = serialization.PrivateFormat.TraditionalOpenSSL  # PKCS#1 for RSA, SEC1 for EC


def _certificate(key: Any, subject: str, issuer_key: Any = None, issuer: str | None = None,
                 san: list[x509.GeneralName] | None = None) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer or subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2100, 1, 1))
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Any, key_format: serialization.PrivateFormat, password: bytes | None = None) -> bytes:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, key_format, encryption)


@pytest.fixture(scope="module")
def material() -> dict[str, Any]:
    ca_key, leaf_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    rsa_key = rsa.generate_private_key(65537, 2048)
    ca = _certificate(ca_key, "Test CA")
    leaf = _certificate(leaf_key, "shop.example.com", issuer_key=ca_key, issuer="Test CA")
    return {"ca": ca, "leaf": leaf, "leaf_key": leaf_key, "other_key": other_key,
            "rsa_key": rsa_key, "rsa_certificate": _certificate(rsa_key, "rsa.example.com")}


# ---- certificate chains ---------------------------------------------------------------------


def test_chain_keeps_order_and_only_certificate_blocks(material: dict[str, Any]) -> None:
    leaf_pem, ca_pem_crlf = _pem(material["leaf"]), _pem(material["ca"]).replace(b"\n", b"\r\n")
    bundle = b"# bundle\n" + leaf_pem + _key_pem(material["leaf_key"], PKCS8) + b"junk\n" + ca_pem_crlf
    chain = parse_certificate_chain(bundle)
    assert chain.certificates == (material["leaf"], material["ca"])
    assert chain.leaf == material["leaf"]
    assert chain.pem == leaf_pem + ca_pem_crlf.removesuffix(b"\r\n") + b"\n"  # blocks only, each ending in "\n"
    assert b"PRIVATE KEY" not in chain.pem and b"junk" not in chain.pem


CHAIN_REJECTIONS = {
    "empty": (b"", NoCertificateError, "holds no PEM certificate"),
    "not-pem": (b"hello, I am not a certificate", NoCertificateError, "(expected -----BEGIN CERTIFICATE-----)"),
    "one-line-block": (b"-----BEGIN CERTIFICATE-----TUlJQg==-----END CERTIFICATE-----", NoCertificateError,
                       "holds no PEM certificate"),
    "corrupt-block": (b"-----BEGIN CERTIFICATE-----\nTUlJQm9uc2Vuc2U=\n-----END CERTIFICATE-----\n",
                      CertificateParseError, "certificate #1 does not parse (error parsing asn1 value"),
}


@pytest.mark.parametrize(("data", "error_type", "fragment"), CHAIN_REJECTIONS.values(), ids=CHAIN_REJECTIONS.keys())
def test_chain_rejected(data: bytes, error_type: type[ValueError], fragment: str) -> None:
    with pytest.raises(error_type) as raised:
        parse_certificate_chain(data)
    assert fragment in str(raised.value)
    assert "\n" not in str(raised.value)


def test_chain_names_every_broken_block(material: dict[str, Any]) -> None:
    broken = b"-----BEGIN CERTIFICATE-----\nTUlJQm9uc2Vuc2U=\n-----END CERTIFICATE-----\n"
    with pytest.raises(CertificateParseError) as raised:
        parse_certificate_chain(_pem(material["leaf"]) + broken + _pem(material["ca"]) + broken)
    assert raised.value.numbers == (2, 4)
    assert str(raised.value).startswith("certificate #2, #4 does not parse (")


# ---- private keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_name", "key_format", "header"),
    [
        ("leaf_key", PKCS8, b"BEGIN PRIVATE KEY"),
        ("leaf_key", TRADITIONAL, b"BEGIN EC PRIVATE KEY"),  # SEC1
        ("rsa_key", PKCS8, b"BEGIN PRIVATE KEY"),
        ("rsa_key", TRADITIONAL, b"BEGIN RSA PRIVATE KEY"),  # PKCS#1
    ],
    ids=["ec-pkcs8", "ec-sec1", "rsa-pkcs8", "rsa-pkcs1"],
)
def test_key_formats_accepted(material: dict[str, Any], key_name: str, key_format: Any, header: bytes) -> None:
    data = _key_pem(material[key_name], key_format)
    assert header in data
    key = parse_private_key(data)
    assert key.private_numbers() == material[key_name].private_numbers()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("case", "error_type", "fragment"),
    [
        ("encrypted", EncryptedKeyError, "is encrypted (decrypt it"),
        ("corrupt", KeyParseError, "holds no usable PEM private key"),
        ("certificate", KeyParseError, "BEGIN RSA PRIVATE KEY or BEGIN EC PRIVATE KEY"),
        ("empty", KeyParseError, "holds no usable PEM private key"),
    ],
    ids=["encrypted", "corrupt", "certificate-not-key", "empty"],
)
def test_keys_rejected_without_echoing_key_bytes(
    material: dict[str, Any], case: str, error_type: type[ValueError], fragment: str
) -> None:
    data = {
        "encrypted": _key_pem(material["leaf_key"], PKCS8, password=b"pw"),
        "corrupt": b"-----BEGIN PRIVATE KEY-----\nbm9wZQ==\n-----END PRIVATE KEY-----\n",
        "certificate": _pem(material["leaf"]),
        "empty": b"",
    }[case]
    with pytest.raises(error_type) as raised:
        parse_private_key(data)
    message = str(raised.value)
    assert fragment in message and "\n" not in message
    assert not any(line in message for line in data.decode().splitlines() if len(line) > 8 and "-----" not in line)


@pytest.mark.parametrize(
    ("key_name", "certificate_name", "matches"),
    [("leaf_key", "leaf", True), ("other_key", "leaf", False), ("rsa_key", "leaf", False),
     ("rsa_key", "rsa_certificate", True)],
)
def test_key_matches_certificate(material: dict[str, Any], key_name: str, certificate_name: str, matches: bool) -> None:
    assert key_matches_certificate(material[key_name], material[certificate_name]) is matches


# ---- host patterns --------------------------------------------------------------------------

LONGEST_LABEL = "a" * 63

ACCEPTED_HOSTS = [
    ("Shop.Example.COM", False, "shop.example.com"),
    ("*.Example.com", False, "*.example.com"),
    ("", True, ""),
    ("xn--bcher-kva.example", False, "xn--bcher-kva.example"),
    (f"{LONGEST_LABEL}.example.com", False, f"{LONGEST_LABEL}.example.com"),
    ("a-b.c1.example", False, "a-b.c1.example"),
]

# (written, allow_any, message fragment, wildcard_fault)
REJECTED_HOSTS = [
    ("", False, "the host is empty", False),
    ("shop.example.com:443", True, "remove ':443': routing ignores ports", False),
    ("::1", False, "carries a port or is an IPv6 address", False),
    ("shop.example.com.", True, "ends with a dot (write shop.example.com)", False),
    ("*", True, "'*' alone is not a host pattern (omit host to match every host)", True),
    ("*", False, "'*' alone is not a host pattern (name hosts like *.example.com)", True),
    ("*.", False, "is not a valid wildcard", True),
    ("*.*.com", False, "is not a valid wildcard", True),
    ("*.exa_mple.com", False, "is not a valid wildcard", False),
    ("foo.*.example.com", True, "a wildcard must be the whole leftmost label (like *.example.com)", True),
    ("*foo.example.com", True, "a wildcard must be the whole leftmost label (write *.example.com)", True),
    ("exa_mple.com", True, "is not a valid host name", False),
    ("-shop.example.com", True, "is not a valid host name", False),
    ("bücher.example", True, "internationalised names in punycode", False),
    ("x" * 64 + ".example.com", True, "is not a valid host name", False),  # a label of 64
    ("x" + f".{LONGEST_LABEL}" * 4, True, "is not a valid host name", False),  # 257 characters
]


@pytest.mark.parametrize(
    ("written", "allow_any", "expected"), ACCEPTED_HOSTS, ids=[row[0][:24] or "any" for row in ACCEPTED_HOSTS]
)
def test_host_pattern_accepted(written: str, allow_any: bool, expected: str) -> None:
    assert parse_host_pattern(written, allow_any) == expected


@pytest.mark.parametrize(
    ("written", "allow_any", "fragment", "wildcard_fault"),
    REJECTED_HOSTS,
    ids=[f"{row[0][:24] or 'empty'}-{'any' if row[1] else 'named'}" for row in REJECTED_HOSTS],
)
def test_host_pattern_rejected(written: str, allow_any: bool, fragment: str, wildcard_fault: bool) -> None:
    with pytest.raises(HostPatternError) as raised:
        parse_host_pattern(written, allow_any)
    assert fragment in str(raised.value)
    assert raised.value.wildcard_fault is wildcard_fault


@pytest.mark.parametrize(
    ("name", "expected"),
    [("example.com", True), ("localhost", True), ("EXAMPLE.com", False), ("a..b", False), ("", False),
     ("*.example.com", False), pytest.param(".".join(["a" * 62] * 4) + ".a", True, id="253-characters"),
     pytest.param(".".join(["a" * 62] * 4) + ".ab", False, id="254-characters")],
)
def test_is_dns_name(name: str, expected: bool) -> None:
    assert is_dns_name(name) is expected


@pytest.mark.parametrize(
    ("san", "expected"),
    [
        (None, ()),
        ([], ()),
        ([x509.DNSName("Shop.example.com"), x509.DNSName("*"), x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
          x509.DNSName("*.shop.example.com"), x509.DNSName("shop.example.com"), x509.DNSName("under_score.example")],
         ("shop.example.com", "*.shop.example.com")),
    ],
    ids=["no-san-extension", "empty-san", "routable-names-in-order-once"],
)
def test_san_host_patterns(material: dict[str, Any], san: list[x509.GeneralName] | None,
                           expected: tuple[str, ...]) -> None:
    certificate = _certificate(material["leaf_key"], "san.example.com", san=san)
    assert san_host_patterns(certificate) == expected
