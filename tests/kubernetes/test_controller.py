"""KubernetesSource against the fake API server: sync, changes, faults, status, leadership, Events."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes_asyncio import client
from prometheus_client import REGISTRY

from config.model import Address, Timeouts
from ingress_watch.cache import Kind
from ingress_watch.leader import LeaderSettings
from ingress_watch.status import PublishSettings
from ingress_watch.translate import TranslateOptions
from tests.fake_apiserver import FakeApiServer
from tests.kubernetes.conftest import (
    FAST_LEADER,
    RunningController,
    endpoint_slice,
    ingress,
    ingress_class,
    service,
)

BACKEND = "default/web:80"


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def _seed(api_client: client.ApiClient, *addresses: str) -> None:
    await client.NetworkingV1Api(api_client).create_ingress_class(ingress_class())
    await client.CoreV1Api(api_client).create_namespaced_service("default", service())
    await client.DiscoveryV1Api(api_client).create_namespaced_endpoint_slice("default", endpoint_slice("web", *addresses))
    await client.NetworkingV1Api(api_client).create_namespaced_ingress("default", ingress("a", "a.example"))


async def test_first_publish_waits_for_every_kind_then_changes_arrive_within_a_second(
    api_client: client.ApiClient, apiserver: FakeApiServer, start_controller: Any
) -> None:
    await _seed(api_client, "127.0.0.1")
    apiserver.fail_next(3, 500, path_contains="/endpointslices")
    served_before = _sample("ingress_proxy_kubernetes_event_to_served_seconds_count")
    controller: RunningController = await start_controller()
    sink = controller.sink
    await sink.wait_until(lambda: bool(sink.configurations), 5)
    assert _sample("ingress_proxy_kubernetes_event_to_served_seconds_count") == served_before + 1
    assert _sample("ingress_proxy_kubernetes_watched_objects", {"kind": "Ingress"}) == 1
    assert sink.endpoints(BACKEND) == (Address("127.0.0.1", 8080),), "published before EndpointSlices were listed"
    assert sink.hosts() == ["a.example"] and len(sink.configurations) == 1

    networking = client.NetworkingV1Api(api_client)
    await networking.create_namespaced_ingress("default", ingress("b", "b.example"))
    assert await sink.wait_until(lambda: "b.example" in sink.hosts(), 1.0) < 1.0
    changed = ingress("b", "c.example")
    await networking.replace_namespaced_ingress("b", "default", changed)
    await sink.wait_until(lambda: sink.hosts() == ["a.example", "c.example"], 1.0)
    await networking.delete_namespaced_ingress("a", "default")
    await sink.wait_until(lambda: sink.hosts() == ["c.example"], 1.0)

    # An unchanged translation is not republished (our own status write, a label).
    published = len(sink.configurations)
    generation = controller.source.generation
    await networking.patch_namespaced_ingress("b", "default", {"metadata": {"labels": {"touched": "yes"}}})
    await asyncio.wait_for(controller.source.wait_for_generation(generation + 1), 2)
    assert len(sink.configurations) == published


async def test_endpoint_slice_changes_take_the_fast_path(api_client: client.ApiClient, start_controller: Any) -> None:
    await _seed(api_client, "127.0.0.1")
    controller: RunningController = await start_controller()
    sink = controller.sink
    await sink.wait_until(lambda: bool(sink.configurations), 5)
    discovery = client.DiscoveryV1Api(api_client)
    await discovery.create_namespaced_endpoint_slice("default", endpoint_slice("web", "127.0.0.2", name="web-2"))
    await sink.wait_until(lambda: len(sink.endpoints(BACKEND) or ()) == 2, 1.0)
    await discovery.delete_namespaced_endpoint_slice("web-1", "default")
    await sink.wait_until(lambda: sink.endpoints(BACKEND) == (Address("127.0.0.2", 8080),), 1.0)
    assert len(sink.configurations) == 1, "EndpointSlice changes must not republish routes"
    assert [name for name, _ in sink.endpoint_updates] == [BACKEND, BACKEND]


async def test_relist_after_410_synthesises_the_deletes_it_missed(
    api_client: client.ApiClient, apiserver: FakeApiServer, start_controller: Any
) -> None:
    await _seed(api_client, "127.0.0.1")
    networking = client.NetworkingV1Api(api_client)
    await networking.create_namespaced_ingress("default", ingress("b", "b.example"))
    controller: RunningController = await start_controller()
    sink = controller.sink
    await sink.wait_until(lambda: sink.hosts() == ["a.example", "b.example"], 5)

    expired_before = _sample("ingress_proxy_kubernetes_watch_restarts_total", {"kind": "Ingress", "reason": "expired"})
    apiserver.fail_next(10_000, 500, path_contains="/ingresses?allowWatchBookmarks")  # watches, not lists
    apiserver.drop_watches()
    await networking.delete_namespaced_ingress("a", "default")
    apiserver.compact()
    apiserver.clear_faults()
    await sink.wait_until(lambda: sink.hosts() == ["b.example"], 5)
    relists = [path for method, path in apiserver.request_log if path.startswith("/apis/networking.k8s.io/v1/ingresses") and "watch" not in path]
    assert len(relists) == 2, "the missed delete must come from a relist"
    assert _sample("ingress_proxy_kubernetes_watch_restarts_total", {"kind": "Ingress", "reason": "expired"}) == expired_before + 1


async def test_converges_after_dropped_and_stalled_watches_error_bursts_and_restarts(
    api_client: client.ApiClient, apiserver: FakeApiServer, start_controller: Any
) -> None:
    await _seed(api_client, "127.0.0.1")
    controller: RunningController = await start_controller()
    sink = controller.sink
    networking = client.NetworkingV1Api(api_client)
    await sink.wait_until(lambda: bool(sink.configurations), 5)

    apiserver.drop_watches()
    await networking.create_namespaced_ingress("default", ingress("dropped", "dropped.example"))
    await sink.wait_until(lambda: "dropped.example" in sink.hosts(), 5)

    apiserver.stall_watches()
    await networking.create_namespaced_ingress("default", ingress("stalled", "stalled.example"))
    await sink.wait_until(lambda: "stalled.example" in sink.hosts(), 5)

    apiserver.fail_next(3, 500, path_contains="networking.k8s.io/v1/ingresses")  # the controller's, not ours
    apiserver.fail_next(3, 429, path_contains="networking.k8s.io/v1/ingresses", retry_after=1)
    apiserver.drop_watches()
    await networking.create_namespaced_ingress("default", ingress("burst", "burst.example"))
    await sink.wait_until(lambda: "burst.example" in sink.hosts(), 5)

    await apiserver.stop()
    await asyncio.sleep(0.3)  # the watches are refused meanwhile and back off
    await apiserver.start()
    await networking.create_namespaced_ingress("default", ingress("restarted", "restarted.example"))
    await sink.wait_until(lambda: "restarted.example" in sink.hosts(), 5)

    await apiserver.restart(keep_state=False)
    await sink.wait_until(lambda: sink.hosts() == [], 5)


async def _status_ips(api_client: client.ApiClient, name: str) -> list[str]:
    found = await client.NetworkingV1Api(api_client).read_namespaced_ingress_status(name, "default")
    load_balancer = found.status.load_balancer if found.status else None
    return [entry.ip for entry in (load_balancer.ingress or [])] if load_balancer else []


async def _eventually(condition: Callable[[], bool | Awaitable[bool]], timeout: float) -> None:
    """For state the sink cannot see (API objects, leadership): poll until `condition` holds."""
    async with asyncio.timeout(timeout):
        while True:
            outcome = condition()
            if await outcome if inspect.isawaitable(outcome) else outcome:
                return
            await asyncio.sleep(0.05)


async def test_only_the_leader_writes_status_and_a_standby_takes_over(
    api_client: client.ApiClient, start_controller: Any
) -> None:
    await _seed(api_client, "127.0.0.1")
    networking = client.NetworkingV1Api(api_client)
    await networking.create_namespaced_ingress("default", ingress("other", "other.example", class_name="someone-else"))
    await networking.patch_namespaced_ingress_status("other", "default", {"status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}})
    publish = PublishSettings(addresses=("192.0.2.10",), retry_delay=0.1)
    first = await start_controller(publish=publish, leader=LeaderSettings(identity="first", **FAST_LEADER))
    await _eventually(lambda: _ips_equal(api_client, "a", ["192.0.2.10"]), 5)
    second = await start_controller(publish=publish, leader=LeaderSettings(identity="second", **FAST_LEADER))
    await second.sink.wait_until(lambda: bool(second.sink.configurations), 5)
    assert first.source.is_leader and not second.source.is_leader

    await networking.patch_namespaced_ingress_status("a", "default", {"status": {"loadBalancer": None}})
    await _eventually(lambda: _ips_equal(api_client, "a", ["192.0.2.10"]), 3)  # re-applied when cleared
    assert await _status_ips(api_client, "other") == ["198.51.100.1"], "not ours: left alone"
    assert second.source.status_writer is not None and second.source.status_writer.writes == 0

    await first.stop()
    await _eventually(lambda: second.source.is_leader, 4)
    await networking.patch_namespaced_ingress_status("a", "default", {"status": {"loadBalancer": None}})
    await _eventually(lambda: _ips_equal(api_client, "a", ["192.0.2.10"]), 3)
    assert second.source.status_writer.writes >= 1

    # Leaving our class clears the address we wrote.
    await networking.patch_namespaced_ingress("a", "default", {"spec": {"ingressClassName": "someone-else"}})
    await _eventually(lambda: _ips_equal(api_client, "a", []), 3)


async def _ips_equal(api_client: client.ApiClient, name: str, expected: list[str]) -> bool:
    return await _status_ips(api_client, name) == expected


async def test_without_publish_settings_nothing_writes_status(api_client: client.ApiClient, start_controller: Any) -> None:
    await _seed(api_client, "127.0.0.1")
    controller: RunningController = await start_controller()
    await controller.sink.wait_until(lambda: bool(controller.sink.configurations), 5)
    assert await _status_ips(api_client, "a") == [] and not controller.source.is_leader


async def test_problems_become_one_warning_event_per_ingress(api_client: client.ApiClient, start_controller: Any) -> None:
    await _seed(api_client, "127.0.0.1")
    networking = client.NetworkingV1Api(api_client)
    await networking.create_namespaced_ingress("default", ingress("broken", "broken.example", service="missing"))
    controller: RunningController = await start_controller()
    core = client.CoreV1Api(api_client)

    async def warnings() -> list[Any]:
        return [e for e in (await core.list_namespaced_event("default")).items if e.involved_object.name == "broken"]

    await _eventually(lambda: _has_events(warnings, 1), 5)
    event = (await warnings())[0]
    assert event.type == "Warning" and "missing" in event.message and event.involved_object.kind == "Ingress"
    assert "a.example" in controller.sink.hosts(), "one bad Ingress must not blank the others"

    generation = controller.source.generation
    await networking.patch_namespaced_ingress("broken", "default", {"metadata": {"labels": {"again": "1"}}})
    await asyncio.wait_for(controller.source.wait_for_generation(generation + 1), 2)
    await asyncio.sleep(0.2)  # Events are posted in the background: give a duplicate the chance to appear
    assert len(await warnings()) == 1, "the same problem is reported once"


async def _has_events(warnings: Any, count: int) -> bool:
    return len(await warnings()) >= count


async def test_watches_one_configmap_by_name_and_only_tls_secrets_in_the_watched_namespace(
    api_client: client.ApiClient, start_controller: Any
) -> None:
    await _seed(api_client, "127.0.0.1")
    core = client.CoreV1Api(api_client)
    await core.create_namespaced_config_map("default", {"metadata": {"name": "unrelated"}, "data": {"timeout-connect": "1s"}})
    await core.create_namespaced_secret("default", {"metadata": {"name": "opaque"}, "data": {"x": "eA=="}})
    await core.create_namespaced_secret("elsewhere", {"metadata": {"name": "tls"}, "type": "kubernetes.io/tls",
                                                      "data": {"tls.crt": "", "tls.key": ""}})
    controller: RunningController = await start_controller(
        configmap=("default", "ingress-proxy"), translate=TranslateOptions(watch_namespace="default")
    )
    sink = controller.sink
    await sink.wait_until(lambda: bool(sink.configurations), 5)
    assert sink.configurations[-1].timeouts.connect == Timeouts().connect, "another ConfigMap must not be read"
    assert controller.source.cache.count(Kind.SECRET) == 0, "Opaque Secrets and other namespaces are not watched"

    await core.create_namespaced_config_map("default", {"metadata": {"name": "ingress-proxy"}, "data": {"timeout-connect": "2s"}})
    await sink.wait_until(lambda: sink.configurations[-1].timeouts.connect == 2.0, 1.0)
    await core.patch_namespaced_config_map("ingress-proxy", "default", {"data": {"timeout-connect": "3s"}})
    await sink.wait_until(lambda: sink.configurations[-1].timeouts.connect == 3.0, 1.0)
