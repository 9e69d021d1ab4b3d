"""Fixtures: a fake API server on loopback, kubernetes-asyncio clients for it, controllers with a recording sink."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client, config

from config.model import Address, Configuration, Problem
from ingress_watch.controller import ControllerSettings, KubernetesSource
from ingress_watch.watch import WatchSettings
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


@dataclass
class RecordingSink:
    """A real ConfigurationSink consumer that keeps what it was given (in order)."""

    configurations: list[Configuration] = field(default_factory=list)
    endpoint_updates: list[tuple[str, tuple[Address, ...]]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def publish(self, configuration: Configuration) -> tuple[Problem, ...]:
        self.configurations.append(configuration)
        self._changed.set()
        return ()

    def update_endpoints(self, backend: str, endpoints: tuple[Address, ...]) -> None:
        self.endpoint_updates.append((backend, endpoints))
        self._changed.set()

    def endpoints(self, backend: str) -> tuple[Address, ...] | None:
        """What the data plane would now use for `backend` (publish, then fast-path updates)."""
        found = None
        if self.configurations:
            found = next((b.endpoints for b in self.configurations[-1].routes.backends if b.name == backend), None)
        for name, endpoints in self.endpoint_updates:
            if name == backend:
                found = endpoints
        return found

    def hosts(self) -> list[str]:
        if not self.configurations:
            return []
        return [virtual_host.host for virtual_host in self.configurations[-1].routes.virtual_hosts]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> float:
        """Wait (no polling) until `predicate()` holds after a publish/update; returns seconds waited."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()
        return loop.time() - started


FAST_WATCH = WatchSettings(connect_timeout=1.0, read_timeout=1.0, initial_backoff=0.05, max_backoff=0.4)
FAST_LEADER = dict(lease_duration=2, renew_deadline=1.5, retry_period=1.0)


@dataclass
class RunningController:
    source: KubernetesSource
    sink: RecordingSink
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def start_controller(kube_configuration: client.Configuration) -> AsyncIterator[Callable[..., Awaitable[RunningController]]]:
    running: list[RunningController] = []

    async def start(**settings: Any) -> RunningController:
        merged: dict[str, Any] = {"watch": FAST_WATCH, "debounce": 0.02, "max_delay": 0.3, **settings}
        source = KubernetesSource(kube_configuration, ControllerSettings(**merged))
        sink = RecordingSink()
        controller = RunningController(source, sink, asyncio.create_task(source.run(sink)))
        running.append(controller)
        return controller

    yield start
    for controller in running:
        await controller.stop()


def ingress_class() -> dict[str, Any]:
    return {"metadata": {"name": "ingress-proxy"}, "spec": {"controller": "ingress-proxy.dev/controller"}}


def ingress(name: str, host: str, service: str = "web", port: int = 80, class_name: str = "ingress-proxy") -> dict[str, Any]:
    backend = {"service": {"name": service, "port": {"number": port}}}
    return {
        "metadata": {"name": name},
        "spec": {
            "ingressClassName": class_name,
            "rules": [{"host": host, "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend}]}}],
        },
    }


def service(name: str = "web") -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}


def endpoint_slice(service_name: str, *addresses: str, name: str | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": name or f"{service_name}-1", "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address]} for address in addresses],
        "ports": [{"name": "http", "port": 8080}],
    }
