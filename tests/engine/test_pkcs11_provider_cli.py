"""pkcs11-provider keys through the real `ingress-proxy` process, from a routes file.

Each `check` runs in a fresh process (pkcs11-provider reuses a login, so a wrong PIN only shows in a
process that never logged in). `serve` runs with opensc's pkcs11-spy between the provider and
SoftHSM2: its log (kept in the test's tmp dir: it records the PIN) proves the token signed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_cli import stop, wait_ready
from tests.engine.conftest import PKCS11_SPY_MODULE, REPO, SOFTHSM_MODULE, USER_PIN, SoftHsmToken
from tests.ports import free_port

pytestmark = pytest.mark.e2e
INGRESS_PROXY = str(Path(sys.executable).with_name("ingress-proxy"))


def write_routes(
    directory: Path,
    token: SoftHsmToken,
    https: int = 8443,
    admin: int = 9100,
    backend: str = "127.0.0.1:9",
    module: str = SOFTHSM_MODULE,
    rsa_key: str = "pkcs11:token=proxy;object=rsakey;type=private",
    ec_key: str = "pkcs11:token=proxy;object=eckey;type=private",
    path: str = "/",
) -> Path:
    (directory / "rsa.pem").write_bytes(token.rsa.chain_pem)
    (directory / "ec.pem").write_bytes(token.ec.chain_pem)
    routes = directory / "routes.yaml"
    routes.write_text(
        f"listen: {{https: 127.0.0.1:{https}, admin: 127.0.0.1:{admin}}}\n"
        "tls:\n"
        "  providers:\n"
        f"    - {{name: pkcs11, parameters: {{pkcs11-module-path: {module}}}}}\n"
        "  certificates:\n"
        f"    - {{cert: rsa.pem, key: '{rsa_key}', pin_env: HSM_PIN, hosts: [rsakey.test]}}\n"
        f"    - {{cert: ec.pem, key: '{ec_key}', pin_env: HSM_PIN, hosts: [eckey.test]}}\n"
        "timeouts: {drain: 2}\n"
        f"routes: [{{paths: [{{path: {path}, backend: app}}]}}]\n"
        f"backends: {{app: {{endpoints: ['{backend}']}}}}\n"
    )
    return routes


def environment(token: SoftHsmToken, pin: str, spy_log: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "SOFTHSM2_CONF": token.env["SOFTHSM2_CONF"], "HSM_PIN": pin}
    if spy_log is not None:
        env |= {"PKCS11SPY": SOFTHSM_MODULE, "PKCS11SPY_OUTPUT": str(spy_log)}
    return env


def check(routes: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [INGRESS_PROXY, "check", "--routes", str(routes)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def test_check_loads_the_token_keys(softhsm_token: SoftHsmToken, tmp_path: Path) -> None:
    result = check(write_routes(tmp_path, softhsm_token), environment(softhsm_token, USER_PIN))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": OK")


@pytest.mark.parametrize(
    ("pin", "changes", "expected"),
    [
        ("9876", {}, "the token holds this key but refused the PIN; fix: give the token's user PIN"),
        (USER_PIN, {"rsa_key": "pkcs11:token=nosuchtoken;object=rsakey;type=private"}, "no provider found this key"),
        (USER_PIN, {"rsa_key": "pkcs11:token=proxy;object=nosuchkey;type=private"}, "no provider found this key"),
        (USER_PIN, {"rsa_key": "pkcs11:token=proxy;object=eckey;type=private"}, "does not match the certificate's public key"),
        (USER_PIN, {"module": "/nonexistent/libtoken.so"}, "pkcs11-module-path: no such file /nonexistent/libtoken.so"),
    ],
    ids=["wrong-pin", "token-not-found", "object-not-found", "key-not-the-certificates", "module-path-wrong"],
)
def test_check_reports_what_the_token_refuses_in_one_located_line(
    softhsm_token: SoftHsmToken, tmp_path: Path, pin: str, changes: dict[str, str], expected: str
) -> None:
    routes = write_routes(tmp_path, softhsm_token, **changes)  # type: ignore[arg-type]
    result = check(routes, environment(softhsm_token, pin))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith(f"{routes}:") for line in lines), result.stderr
    assert any(expected in line for line in lines), result.stderr
    assert "Traceback" not in result.stderr and "Enter PIN" not in result.stderr
    assert pin not in result.stdout + result.stderr


def test_check_and_doctor_without_the_provider_package_say_how_to_get_it(softhsm_token: SoftHsmToken, tmp_path: Path) -> None:
    routes = write_routes(tmp_path, softhsm_token)
    routes.write_text(routes.read_text().replace("name: pkcs11,", "name: pkcs11, module: /usr/lib/nonexistent-pkcs11.so,"))
    result = check(routes, environment(softhsm_token, USER_PIN))
    assert result.returncode == 1
    assert "tls.providers[0].module: no such file /usr/lib/nonexistent-pkcs11.so" in result.stderr
    assert "Traceback" not in result.stderr


def test_doctor_signs_with_the_token_keys(softhsm_token: SoftHsmToken, tmp_path: Path) -> None:
    routes = write_routes(tmp_path, softhsm_token)
    result = subprocess.run(
        [INGRESS_PROXY, "doctor", "--routes", str(routes)],
        cwd=REPO, env=environment(softhsm_token, USER_PIN), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "provider default: active" in result.stdout
    assert f"provider pkcs11: active, from pkcs11.so in /usr/lib/x86_64-linux-gnu/ossl-modules, pkcs11-module-path={SOFTHSM_MODULE}, pkcs11-module-quirks=no-deinit" in result.stdout
    assert "object=rsakey;type=private: test signature OK via provider pkcs11 (RSA-2048" in result.stdout
    assert "object=eckey;type=private: test signature OK via provider pkcs11 (EC-256" in result.stdout
    assert USER_PIN not in result.stdout + result.stderr


def _curl(port: int, host: str, ca_file: str, version: str, path: str) -> list[str]:
    return [
        "curl", "-sS", "--fail", version, "--tls-max", version.removeprefix("--tlsv"), "--cacert", ca_file,
        "--resolve", f"{host}:{port}:127.0.0.1", "-o", "/dev/null", "-w", "%{http_code}\n", f"https://{host}:{port}{path}",
    ]


async def _get(port: int, host: str, ca_file: str, version: str, path: str = "/") -> str:
    process = await asyncio.create_subprocess_exec(
        *_curl(port, host, ca_file, version, path), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    output, errors = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, errors.decode()
    return output.decode().strip()


async def _metric_total(admin: int, name: str, label: str) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", admin)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    text = (await reader.read()).decode()
    writer.close()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name) and label in line)


async def test_two_workers_serve_token_keys_the_token_signs_and_reload_keeps_them(
    softhsm_token: SoftHsmToken, tmp_path: Path, start_backend, ca_file: str
) -> None:
    """--workers 2: each worker loads the keys after fork (a key loaded before fork cannot sign in
    the child). TLS 1.2 and 1.3, RSA and EC; every full handshake is a C_SignInit in the spy log;
    a SIGHUP reload with new routes keeps the keys: no new C_Login."""
    backend = await start_backend("app")
    https, admin = free_port(), free_port()
    spy_log = tmp_path / "pkcs11-spy.log"
    address = f"{backend.address.host}:{backend.address.port}"
    routes = write_routes(tmp_path, softhsm_token, https, admin, address, module=PKCS11_SPY_MODULE)
    process = await asyncio.create_subprocess_exec(
        INGRESS_PROXY, "serve", "--routes", str(routes), "--no-access-log", "--workers", "2",
        env=environment(softhsm_token, USER_PIN, spy_log), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        await wait_ready(admin, deadline=30)
        requests = [(host, version) for host in ("rsakey.test", "eckey.test") for version in ("--tlsv1.2", "--tlsv1.3")] * 4
        assert [await _get(https, host, ca_file, version) for host, version in requests] == ["200"] * len(requests)
        signed = spy_log.read_text().count("C_SignInit")
        assert signed >= len(requests), f"{signed} token signatures for {len(requests)} full handshakes"
        logins = spy_log.read_text().count("C_Login")
        routes.write_text(routes.read_text().replace("path: /,", "path: /v2,"))
        process.send_signal(signal.SIGHUP)
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            statuses = [await _get(https, "rsakey.test", ca_file, "--tlsv1.3", "/v2") for _ in range(6)]
            if statuses == ["200"] * 6:
                break
            assert asyncio.get_running_loop().time() < deadline, statuses
            await asyncio.sleep(0.2)
        assert spy_log.read_text().count("C_Login") == logins, "a route-only reload went back to the token"
        assert spy_log.read_text().count("C_SignInit") >= signed + 6
        assert await _metric_total(admin, "ingress_proxy_tls_handshakes_total", 'key_source="provider:pkcs11"') >= len(requests)
    finally:
        code, stderr = await stop(process)
    assert code == 0, stderr
    assert "Traceback" not in stderr and USER_PIN not in stderr


async def test_every_one_of_six_workers_loads_the_token_keys(softhsm_token: SoftHsmToken, tmp_path: Path) -> None:
    """Workers log in to the token in turn: SoftHSM2 fails logins made at the same moment by several
    processes (no token, PIN not initialised), and a worker that lost that race left the key's
    certificate out. Without the turns, 3 of 10 runs of this test had a worker leave one out."""
    https, admin = free_port(), free_port()
    routes = write_routes(tmp_path, softhsm_token, https, admin)
    process = await asyncio.create_subprocess_exec(
        INGRESS_PROXY, "serve", "--routes", str(routes), "--no-access-log", "--workers", "6",
        env=environment(softhsm_token, USER_PIN), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    started = b""
    try:
        while started.count(b"listening for https") < 6:  # each worker says so after its first publish
            line = await asyncio.wait_for(process.stderr.readline(), 60)
            assert line, f"the proxy stopped before six workers published:\n{started.decode()}"
            started += line
    finally:
        code, rest = await stop(process)
    stderr = started.decode() + rest
    assert code == 0, stderr
    assert "left out" not in stderr, stderr
