"""`ingress-proxy doctor` output: one line per fact, ok=False when something configured is broken."""

from __future__ import annotations

import os
import subprocess
import sys

from config.model import CryptoSettings, EngineKey, EngineSettings, ProviderSettings
from proxy.doctor import run_doctor
from tests.engine.conftest import (
    PKCS11_ENGINE,
    REPO,
    SOFTHSM_MODULE,
    USER_PIN,
    ServerIdentity,
    SoftHsmToken,
    key_uri,
)


def test_plain_software_set_up_is_ok_and_names_the_libraries() -> None:
    lines, ok = run_doctor(None, [])
    assert ok
    assert "OpenSSL 3." in lines[0] and "libcrypto.so.3" in lines[0] and "libssl.so.3" in lines[0]
    assert any(line.startswith("ENGINE API: available") for line in lines)
    assert any(line.startswith("async jobs (SSL_MODE_ASYNC): supported") for line in lines)
    assert "engine: none configured (software crypto)" in lines
    assert any(line.startswith("QAT") for line in lines)


def test_pkcs11_engine_and_token_keys_sign(softhsm_token: SoftHsmToken, software_rsa: ServerIdentity) -> None:
    settings = CryptoSettings(engine=softhsm_token.settings().engine, providers=(ProviderSettings("default"),))
    lines, ok = run_doctor(settings, [softhsm_token.rsa.key, softhsm_token.ec.key, software_rsa.key])
    assert ok, lines
    text = "\n".join(lines)
    assert "provider default: active, from default.so in /usr/lib/x86_64-linux-gnu/ossl-modules" in lines
    assert "engine pkcs11: loaded from /usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so, default for RSA,EC" in text
    assert "object=rsakey;type=private;pin-value=***: test signature OK via engine pkcs11 (RSA-2048" in text
    assert "object=eckey;type=private;pin-value=***: test signature OK via engine pkcs11 (EC-256" in text
    assert "key (PEM): software key" in text
    assert "1234" not in text


def test_broken_parts_make_it_not_ok(softhsm_token: SoftHsmToken) -> None:
    missing_engine = CryptoSettings(engine=EngineSettings(id="no-such-engine-xyz"))
    lines, ok = run_doctor(missing_engine, [EngineKey(key_uri("rsakey"))])
    assert not ok
    assert any(line.startswith("engine no-such-engine-xyz: FAILED (failed: no engine with this id") for line in lines)
    assert any("object=rsakey" in line and "FAILED" in line for line in lines)

    bogus = (ProviderSettings("bogus-provider"), ProviderSettings("legacy"))
    lines, ok = run_doctor(CryptoSettings(engine=softhsm_token.settings().engine, providers=bogus), [])
    assert not ok
    assert any(line.startswith("providers: FAILED: tls.providers: OpenSSL provider 'bogus-provider'") for line in lines)

    lines, ok = run_doctor(CryptoSettings(engine=EngineSettings(id="no-such-engine-xyz", required=True)), [])
    assert not ok and any(line.startswith("engine no-such-engine-xyz: FAILED: OpenSSL engine") for line in lines)

    lines, ok = run_doctor(softhsm_token.settings(), [EngineKey(key_uri("nosuchkey"))])
    assert not ok
    failed = [line for line in lines if "object=nosuchkey" in line]
    assert len(failed) == 1 and "FAILED" in failed[0] and "1234" not in failed[0]


def test_cli_doctor_with_a_routes_file(softhsm_token: SoftHsmToken, tmp_path) -> None:
    """`ingress-proxy doctor --routes FILE`: the routes-file engine section and an engine key with
    pin_env reach run_doctor; the PIN never reaches the output; a broken key or a wrong PIN (each in
    a fresh process, so no earlier login helps) makes the exit code 1."""
    (tmp_path / "token.pem").write_bytes(softhsm_token.rsa.chain_pem)
    routes = tmp_path / "routes.yaml"

    def run(object_label: str, pin: str = USER_PIN) -> subprocess.CompletedProcess[str]:
        routes.write_text(
            "listen: {https: 127.0.0.1:8443}\n"
            "backends: {web: {endpoints: [\"127.0.0.1:9001\"]}}\n"
            "routes: [{host: rsakey.test, paths: [{path: /, backend: web}]}]\n"
            "tls:\n"
            "  certificates:\n"
            f"    - {{cert: token.pem, key: 'engine:pkcs11:token=proxy;object={object_label};type=private', pin_env: HSM_PIN}}\n"
            "  engine:\n"
            f"    id: pkcs11\n    so_path: {PKCS11_ENGINE}\n    ctrl: [[MODULE_PATH, {SOFTHSM_MODULE}]]\n"
            "    algorithms: [RSA, EC]\n    required: true\n"
        )
        environment = {**os.environ, "SOFTHSM2_CONF": softhsm_token.env["SOFTHSM2_CONF"], "HSM_PIN": pin}
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", "doctor", "--routes", str(routes)],
            cwd=REPO, env=environment, capture_output=True, text=True, timeout=60,
        )

    healthy = run("rsakey")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "engine pkcs11: loaded" in healthy.stdout
    assert "object=rsakey;type=private;pin-value=***: test signature OK via engine pkcs11 (RSA-2048" in healthy.stdout
    broken = run("nosuchkey")
    assert broken.returncode == 1
    assert "object=nosuchkey" in broken.stdout and "FAILED" in broken.stdout
    wrong_pin = run("rsakey", pin="9876")
    assert wrong_pin.returncode == 1 and "object=rsakey" in wrong_pin.stdout and "FAILED" in wrong_pin.stdout
    assert USER_PIN not in healthy.stdout + healthy.stderr + broken.stdout + broken.stderr
    assert "9876" not in wrong_pin.stdout + wrong_pin.stderr
