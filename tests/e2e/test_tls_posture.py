"""TLS posture of the real `ingress-proxy serve` process, judged by real clients (issue 10).

- A real scanner (Debian's testssl.sh, protocols + ciphers per protocol + forward secrecy,
  not the vulnerability suite) must find no TLS 1.0/1.1, no CBC, no static RSA key exchange, and
  forward secrecy on every suite, for RSA and ECDSA certificates alike.
- `openssl s_client -alpn foo` gets the fatal no_application_protocol alert; without -alpn the
  client is served.
- `openssl s_client -status` sees the stapled OCSP response while it is valid and for this
  certificate, and nothing otherwise; a refreshed response is picked up by a reload.
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import trustme

from tests.hostile.proxy_process import LOOPBACK, Ports, ProxyProcess, routes_document, write_certificate
from tests.unit.test_tls_policy import ocsp_response

SCAN_SECONDS = 120  # measured ~15 s alone; generous for a shared 2-core machine
CLIENT_SECONDS = 20
HOST = "posture.test"
INTERMEDIATE_TLS12 = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256", "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
}


def start_proxy(directory: Path, certificates: list[dict], tls: dict | None = None) -> ProxyProcess:
    ports = Ports()
    document = routes_document(ports, {"app": [f"{LOOPBACK}:1"]}, [("/", "app")], certificates=certificates)
    document["tls"].update(tls or {})
    return ProxyProcess(directory, ports, document)


def s_client(port: int, *options: str) -> str:
    """One `openssl s_client` handshake (stdin closed at once); stdout and stderr together."""
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"{LOOPBACK}:{port}", "-servername", HOST, *options],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=CLIENT_SECONDS,  # h2: a binary SETTINGS frame may be printed
    )
    return result.stdout + result.stderr


def offered_suites(scan: dict) -> dict[str, set[str]]:
    """testssl's cipherTests findings → protocol id ("tls1_2") → IANA names offered."""
    offered: dict[str, set[str]] = {}
    for finding in scan["cipherTests"]:
        protocol = finding["id"].removeprefix("cipher-").rsplit("_", 1)[0]
        offered.setdefault(protocol, set()).add(finding["finding"].split()[-1])
    return offered


def test_a_real_scanner_finds_only_ecdhe_aead_on_tls12_and_tls13(ca: trustme.CA, tmp_path: Path):
    testssl = shutil.which("testssl")
    assert testssl, "testssl.sh is missing: `make install` installs Debian's testssl.sh"
    rsa = write_certificate_of(ca, tmp_path, "rsa", trustme.KeyType.RSA)
    ecdsa = write_certificate_of(ca, tmp_path, "ecdsa", trustme.KeyType.ECDSA)
    proxy = start_proxy(tmp_path, [rsa, ecdsa])
    report = tmp_path / "scan.json"
    try:
        subprocess.run(
            [testssl, "--quiet", "--color", "0", "--warnings", "off", "--protocols", "--cipher-per-proto", "--fs",
             "--ip", LOOPBACK, "--jsonfile-pretty", str(report), f"{HOST}:{proxy.ports.https}"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=SCAN_SECONDS, cwd=tmp_path,
        )
    finally:
        proxy.stop()
    scan = json.loads(report.read_text())["scanResult"][0]
    protocols = {finding["id"]: finding["finding"] for finding in scan["protocols"]}
    assert [protocols[name] for name in ("SSLv2", "SSLv3", "TLS1", "TLS1_1")] == ["not offered"] * 4
    assert protocols["TLS1_2"] == "offered" and protocols["TLS1_3"].startswith("offered")
    offered = offered_suites(scan)
    assert set(offered) == {"tls1_2", "tls1_3"}, offered
    assert offered["tls1_2"] == INTERMEDIATE_TLS12, "only ECDHE key exchange (PFS) with AEAD ciphers: no CBC, no static RSA"
    assert not any("CBC" in name or "_WITH_" not in name or not name.startswith("TLS_ECDHE_") for name in offered["tls1_2"])
    assert offered["tls1_3"] == {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
    forward_secrecy = {finding["id"]: finding["finding"] for finding in scan["pfs"]}
    assert forward_secrecy["PFS"] == "offered"
    assert set(forward_secrecy["PFS_ECDHE_curves"].split()) == {"X25519", "prime256v1", "secp384r1"}
    assert "DH_groups" not in forward_secrecy, "no finite-field DHE"


def write_certificate_of(ca: trustme.CA, directory: Path, name: str, key_type: trustme.KeyType) -> dict:
    issued = ca.issue_cert(HOST, key_type=key_type)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    return {"cert": str(cert), "key": str(key), "hosts": [HOST]}


def test_alpn_without_a_common_protocol_is_refused_with_the_alert(ca: trustme.CA, tmp_path: Path):
    proxy = start_proxy(tmp_path, [write_certificate(ca, tmp_path, "site", HOST).entry()])
    try:
        refused = s_client(proxy.ports.https, "-alpn", "foo")
        plain = s_client(proxy.ports.https)
        chosen = s_client(proxy.ports.https, "-alpn", "h2,http/1.1")
        http1_only = s_client(proxy.ports.https, "-alpn", "foo,http/1.1")
    finally:
        proxy.stop()
    assert "no application protocol" in refused, refused  # "tlsv1 alert no application protocol"
    assert "New, (NONE), Cipher is (NONE)" in refused
    assert "No ALPN negotiated" in plain and "Cipher is TLS_AES" in plain
    assert "ALPN protocol: h2" in chosen  # HTTP/2 preferred by default
    assert "ALPN protocol: http/1.1" in http1_only


def test_ocsp_is_stapled_only_while_valid_and_for_this_certificate_and_reloads(ca: trustme.CA, tmp_path: Path):
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    day = datetime.timedelta(days=1)
    site = write_certificate(ca, tmp_path, "site", HOST)
    other = write_certificate(ca, tmp_path, "other", "other.test")
    beside = site.cert.with_name(site.cert.name + ".ocsp")  # HAProxy's convention
    site_pem = site.cert.read_bytes()
    beside.write_bytes(ocsp_response(ca, site_pem, now - 2 * day, now - day))  # expired
    proxy = start_proxy(tmp_path, [site.entry()])
    try:
        expired = s_client(proxy.ports.https, "-status")
        beside.write_bytes(ocsp_response(ca, site_pem, now - day, now + day))
        document = routes_document(proxy.ports, {"app": [f"{LOOPBACK}:1"]}, [("/", "app")], certificates=[site.entry()])
        proxy.reload(document)  # SIGHUP: the certificate and its response are read again
        valid = s_client(proxy.ports.https, "-status")
        beside.write_bytes(ocsp_response(ca, other.cert.read_bytes(), now - day, now + day))
        proxy.reload(document)
        foreign = s_client(proxy.ports.https, "-status")
    finally:
        proxy.stop()
    assert "OCSP response: no response sent" in expired, expired
    assert "OCSP Response Status: successful" in valid and "Cert Status: good" in valid, valid
    assert "OCSP response: no response sent" in foreign, foreign
    log = proxy.stderr()
    assert log.count("OCSP response not stapled: valid") == 1, "the expired response is logged once"
    assert "OCSP response not stapled: the OCSP response is for another certificate" in log
    assert "Traceback" not in log
