"""The real `ingress-proxy` process: check, serve, live reload, a broken reload, workers, drain."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trustme

from tests.e2e.helpers import tls_client_context
from tests.ports import free_port

INGRESS_PROXY = str(Path(sys.executable).with_name("ingress-proxy"))


def write_routes(path: Path, https: int, admin: int, backend: str, cert: Path, key: Path, prefix: str = "/") -> None:
    path.write_text(
        f"""
listen: {{https: 127.0.0.1:{https}, admin: 127.0.0.1:{admin}}}
tls:
  certificates: [{{cert: {cert}, key: {key}}}]
timeouts: {{drain: 5}}
routes: [{{host: "", paths: [{{path: {prefix}, type: Prefix, backend: app}}]}}]
backends: {{app: {{endpoints: ["{backend}"]}}}}
"""
    )


@pytest.fixture
def certificate_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    issued = ca.issue_cert("cli.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


async def wait_ready(admin: int, deadline: float = 10) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", admin)
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if b" 200 " in await reader.read(100):
                writer.close()
                return
            writer.close()
        except OSError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("proxy never became ready")


def https_get(port: int, path: str = "/", session=None, context: ssl.SSLContext | None = None) -> tuple[int, bool, object]:
    context = context or tls_client_context()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="cli.test", session=session) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: cli.test\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return int(data.split(b" ")[1]), tls.session_reused, tls.session


@pytest.fixture
async def backend(start_backend):
    return await start_backend("cli")


async def start(routes: Path, *extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        INGRESS_PROXY, "serve", "--routes", str(routes), "--no-access-log", *extra,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


async def stop(process: asyncio.subprocess.Process) -> tuple[int, str]:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(process.communicate(), 15)
    return process.returncode, stderr.decode()


async def test_check_reports_every_problem_with_location(tmp_path):
    routes = tmp_path / "routes.yaml"
    routes.write_text("listen: {https: 127.0.0.1:99999}\nroutes: [{host: x, paths: [{path: nope, backend: missing}]}]\n")
    result = await asyncio.create_subprocess_exec(INGRESS_PROXY, "check", "--routes", str(routes), stderr=subprocess.PIPE)
    _, stderr = await result.communicate()
    assert result.returncode == 1
    lines = stderr.decode().strip().splitlines()
    assert len(lines) >= 3 and all(line.startswith(f"{routes}:") for line in lines)


async def test_serve_reload_broken_reload_and_drain(tmp_path, certificate_files, backend):
    cert, key = certificate_files
    https, admin = free_port(), free_port()
    routes = tmp_path / "routes.yaml"
    write_routes(routes, https, admin, f"{backend.address.host}:{backend.address.port}", cert, key, prefix="/old")
    process = await start(routes)
    try:
        await wait_ready(admin)
        assert (await asyncio.to_thread(https_get, https, "/old"))[0] == 200
        assert (await asyncio.to_thread(https_get, https, "/new"))[0] == 404
        write_routes(routes, https, admin, f"{backend.address.host}:{backend.address.port}", cert, key, prefix="/new")
        deadline = time.monotonic() + 5
        while (await asyncio.to_thread(https_get, https, "/new"))[0] != 200:
            assert time.monotonic() < deadline, "the edited routes file was not reloaded"
            await asyncio.sleep(0.1)
        routes.write_text(routes.read_text() + "\nbogus_key: 1\n")
        process.send_signal(signal.SIGHUP)
        await asyncio.sleep(1.5)
        assert (await asyncio.to_thread(https_get, https, "/new"))[0] == 200, "a broken reload must keep serving"
    finally:
        code, stderr = await stop(process)
    assert code == 0
    assert f"{routes}:" in stderr and "bogus_key" in stderr
    assert "Traceback" not in stderr


async def test_two_workers_share_listener_and_session_tickets(tmp_path, certificate_files, backend):
    cert, key = certificate_files
    https, admin = free_port(), free_port()
    routes = tmp_path / "routes.yaml"
    write_routes(routes, https, admin, f"{backend.address.host}:{backend.address.port}", cert, key)
    process = await start(routes, "--workers", "2")
    try:
        await wait_ready(admin)
        context = tls_client_context()
        _, _, session = await asyncio.to_thread(https_get, https, "/", None, context)
        resumed = [(await asyncio.to_thread(https_get, https, "/", session, context))[1] for _ in range(12)]
        assert all(resumed), "tickets from one worker must resume in the other"
        write_routes(routes, https, admin, f"{backend.address.host}:{backend.address.port}", cert, key, prefix="/v2")
        process.send_signal(signal.SIGHUP)  # the master forwards it to every worker
        deadline = time.monotonic() + 5
        while True:
            statuses = [(await asyncio.to_thread(https_get, https, "/v2"))[0] for _ in range(12)]
            if statuses == [200] * 12:
                break  # fresh connections land on both workers: both reloaded
            assert time.monotonic() < deadline, f"not every worker reloaded: {statuses}"
            await asyncio.sleep(0.2)
    finally:
        code, stderr = await stop(process)
    assert code == 0, stderr
