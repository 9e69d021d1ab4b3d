"""Fixtures: a fake API server on loopback and kubernetes-asyncio clients configured for it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kubernetes_asyncio import client, config

from tests.fake_apiserver import FakeApiServer


@pytest.fixture
async def apiserver() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(allow_loopback=True, bookmark_interval=0.2) as server:
        yield server


@pytest.fixture
async def kube_configuration(apiserver: FakeApiServer, tmp_path: Path) -> client.Configuration:
    configuration = client.Configuration()
    await config.load_kube_config(
        config_file=str(apiserver.write_kubeconfig(tmp_path / "kubeconfig")),
        client_configuration=configuration,
        persist_config=False,
    )
    return configuration


@pytest.fixture
async def api_client(kube_configuration: client.Configuration) -> AsyncIterator[client.ApiClient]:
    async with client.ApiClient(kube_configuration) as api:
        yield api
