"""Secrets never appear in anything the process writes: stdout (access log), stderr (log, at debug
level), /metrics. The probes: the body of a PEM private key, and the PIN of a SoftHSM token key
given through `pin_env`, across handshakes with both keys, reloads, and rejected reloads whose
error messages are about exactly those keys."""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import socket
import ssl
import subprocess
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.engine.conftest import PKCS11_ENGINE, SOFTHSM_MODULE
from tests.hostile.proxy_process import Ports, routes_document, write_certificate
from tests.soak.conftest import SERVER_NAME, scaled

TOKEN_LABEL = "soak"
TOKEN_PIN = "Pq7-zV2x-secret-pin"  # distinctive: a grep for it cannot match anything by chance
PIN_VARIABLE = "SOAK_TOKEN_PIN"
ENGINE_HOST = "engine.soak.test"


def _run(command: list[str], env: dict[str, str]) -> None:
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, f"{command[0]}: {completed.stderr}"


def token_with_ec_key(ca: trustme.CA, directory: Path) -> tuple[dict[str, str], Path]:
    """A SoftHSM token with a non-extractable EC key; returns its environment and a certificate file."""
    (directory / "tokens").mkdir(parents=True)
    (directory / "softhsm2.conf").write_text(
        f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    (directory / "openssl.cnf").write_text(
        "openssl_conf = init\n[init]\nengines = engines\n[engines]\npkcs11 = pkcs11\n"
        f"[pkcs11]\ndynamic_path = {PKCS11_ENGINE}\nMODULE_PATH = {SOFTHSM_MODULE}\n"
    )
    env = {**os.environ, "SOFTHSM2_CONF": str(directory / "softhsm2.conf"), "OPENSSL_CONF": str(directory / "openssl.cnf")}
    _run(["softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL, "--pin", TOKEN_PIN, "--so-pin", "so-pin-1"], env)
    _run(["pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label", TOKEN_LABEL, "--login", "--pin", TOKEN_PIN,
          "--keypairgen", "--key-type", "EC:prime256v1", "--id", "01", "--label", "eckey", "--sensitive", "--usage-sign"], env)
    csr_path = directory / "eckey.csr"
    _run(["openssl", "req", "-new", "-engine", "pkcs11", "-keyform", "engine",
          "-key", f"pkcs11:token={TOKEN_LABEL};object=eckey;type=private;pin-value={TOKEN_PIN}",
          "-subj", f"/CN={ENGINE_HOST}", "-out", str(csr_path)], env)
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    assert isinstance(ca_key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey))
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(ENGINE_HOST)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    path = directory / "eckey.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return {"SOFTHSM2_CONF": env["SOFTHSM2_CONF"], PIN_VARIABLE: TOKEN_PIN}, path


def handshake(port: int, tls: ssl.SSLContext, server_name: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with tls.wrap_socket(raw, server_hostname=server_name) as sock:
            sock.sendall(b"GET /secret-probe HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % server_name.encode())
            answer = b""
            while piece := sock.recv(65536):
                answer += piece
            return answer.split(b"\r\n", 1)[0].decode()


def secret_fragments(key_pem: bytes) -> list[str]:
    """The PIN, and every 24-character run of the key's base64 body (a partial leak counts too).
    Engine key URIs may be logged, with the PIN masked as pin-value=***; any other value is a leak."""
    body = "".join(line for line in key_pem.decode().splitlines() if not line.startswith("-----"))
    return [TOKEN_PIN, *(body[start : start + 24] for start in range(0, len(body) - 24, 12))]


async def test_private_keys_and_pins_never_written(
    start_soak_proxy, start_backend, soak_ca: trustme.CA, client_tls, tmp_path: Path
):
    backend = await start_backend("app")
    token_env, engine_certificate = await asyncio.to_thread(token_with_ec_key, soak_ca, tmp_path / "token")
    pem_certificate = write_certificate(soak_ca, tmp_path, "pem", SERVER_NAME)
    ports = Ports()
    engine_entry = {"cert": str(engine_certificate), "key": f"engine:pkcs11:token={TOKEN_LABEL};object=eckey;type=private",
                    "pin_env": PIN_VARIABLE, "hosts": [ENGINE_HOST]}
    routes = routes_document(ports, {"app": [str(backend.address)]}, [("/", "app")], [pem_certificate.entry(), engine_entry])
    routes["tls"]["engine"] = {"id": "pkcs11", "so_path": PKCS11_ENGINE, "ctrl": [["MODULE_PATH", SOFTHSM_MODULE]],
                               "algorithms": ["EC"], "required": True}
    proxy = await start_soak_proxy(ports, routes, env=token_env, log_level="debug")
    ports = proxy.ports  # fresh ones if a port was taken meanwhile
    for _ in range(scaled(3)):
        for server_name in (SERVER_NAME, ENGINE_HOST):
            assert await asyncio.to_thread(handshake, ports.https, client_tls, server_name) == "HTTP/1.1 200 OK"
        await asyncio.to_thread(proxy.reload, routes)
    rejected = [
        {**engine_entry, "key": f"engine:pkcs11:token={TOKEN_LABEL};object=missing;type=private"},  # the engine cannot load it
        {**engine_entry, "cert": str(pem_certificate.cert)},  # certificate and token key do not match
        {**pem_certificate.entry(), "cert": str(engine_certificate)},  # PEM key for the wrong certificate
        {**pem_certificate.entry(), "key": str(pem_certificate.cert)},  # a certificate where the key should be
    ]
    outcomes = []
    for broken_entry in rejected:
        broken = {**routes, "tls": {**routes["tls"], "certificates": [pem_certificate.entry(), broken_entry]}}
        outcomes.append(await asyncio.to_thread(proxy.try_reload, broken))
    assert "ok" not in outcomes, outcomes
    await asyncio.to_thread(proxy.reload, routes)
    assert await asyncio.to_thread(handshake, ports.https, client_tls, ENGINE_HOST) == "HTTP/1.1 200 OK"
    metrics = proxy.metrics()
    await asyncio.to_thread(proxy.stop)
    written = {"stdout": proxy.stdout(), "stderr": proxy.stderr(), "metrics": metrics}
    fragments = secret_fragments(pem_certificate.key.read_bytes())
    leaks = [(where, fragment) for where, text in written.items() for fragment in fragments if fragment in text]
    for where, text in written.items():
        leaks += [(where, f"pin-value={value}") for value in re.findall(r"pin-value=([^;:\s]*)", text) if value != "***"]
    total = sum(len(text) for text in written.values())
    print(f"\nsecrets: {total} bytes written, {len(fragments)} fragments probed, {len(leaks)} leaks")
    assert leaks == []
