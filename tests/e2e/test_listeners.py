"""Listener addresses are exclusive (issue 10 item 8): the real CLI process, on loopback.

A second `serve` on an address another process holds must fail at start with one line naming the
address and a non-zero exit, while the first keeps serving; `--workers` still shares its own.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from tests.e2e.test_cli import certificate_files, https_get, start, stop, wait_ready, write_routes
from tests.ports import free_port

__all__ = ["certificate_files"]  # a fixture, imported to be used here

START_TIMEOUT = 30  # generous: other suites share this machine's two cores


async def second_instance_error(routes: Path, *extra: str) -> tuple[int, str]:
    process = await start(routes, *extra)
    try:
        await asyncio.wait_for(process.wait(), START_TIMEOUT)
    except TimeoutError:
        await stop(process)
        raise AssertionError("the second instance kept running on a held address") from None
    return await stop(process)


def assert_one_line_naming(stderr: str, address: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if address in line]
    assert len(lines) == 1, stderr
    assert "cannot listen" in lines[0] and "another process holds this address" in lines[0], stderr


@pytest.fixture
async def backend(start_backend):
    return await start_backend("listeners")


@pytest.mark.parametrize("first_workers, second_workers", [("1", "1"), ("2", "1"), ("1", "2")])
async def test_a_second_instance_on_a_held_https_address_fails_and_the_first_keeps_serving(
    tmp_path, certificate_files, backend, first_workers, second_workers
):
    cert, key = certificate_files
    https = free_port()
    first_routes, second_routes = tmp_path / "first.yaml", tmp_path / "second.yaml"
    endpoint = f"{backend.address.host}:{backend.address.port}"
    first_admin = free_port()
    write_routes(first_routes, https, first_admin, endpoint, cert, key)
    write_routes(second_routes, https, free_port(), endpoint, cert, key)  # same https, its own admin
    first = await start(first_routes, "--workers", first_workers)
    try:
        await wait_ready(first_admin)
        code, stderr = await second_instance_error(second_routes, "--workers", second_workers)
        assert code != 0
        assert_one_line_naming(stderr, f"127.0.0.1:{https}")
        statuses = [(await asyncio.to_thread(https_get, https))[0] for _ in range(20)]
        assert statuses == [200] * 20, "every connection must still reach the first instance"
    finally:
        code, _ = await stop(first)
    assert code == 0


async def test_a_held_admin_address_fails_at_start_with_one_line(tmp_path, certificate_files, backend):
    cert, key = certificate_files
    routes = tmp_path / "routes.yaml"
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        admin = holder.getsockname()[1]
        write_routes(routes, free_port(), admin, f"{backend.address.host}:{backend.address.port}", cert, key)
        code, stderr = await second_instance_error(routes)
    assert code != 0
    assert_one_line_naming(stderr, f"127.0.0.1:{admin}")
