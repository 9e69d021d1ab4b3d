"""Header ConfigMaps (custom-headers, add-headers, proxy-set-headers) through the watch: only the
named ones reach the cache, a new name relists before anything is published, changes follow.
Against the fake API server (its ConfigMaps speak the real LIST/WATCH protocol)."""

from __future__ import annotations

from typing import Any

from kubernetes_asyncio import client

from config.model import Configuration, HeaderEdits
from ingress_watch.cache import Kind
from ingress_watch.watch import NamedConfigMaps
from tests.fake_apiserver import FakeApiServer
from tests.kubernetes.conftest import RunningController, endpoint_slice, ingress, ingress_class, service

CUSTOM_HEADERS = "nginx.ingress.kubernetes.io/custom-headers"


def test_only_named_configmaps_are_kept_and_trimmed_to_their_data() -> None:
    named = NamedConfigMaps()
    configmap = {
        "metadata": {"namespace": "shop", "name": "headers", "resourceVersion": "9", "uid": "u", "managedFields": [{}], "labels": {"a": "b"}},
        "data": {"X-Frame-Options": "DENY"},
        "binaryData": {"blob": "AAAA"},
    }
    assert named.narrow(configmap) is None  # nothing named yet
    named.wanted = frozenset({("shop", "headers")})
    assert named.narrow(configmap) == {
        "metadata": {"namespace": "shop", "name": "headers", "resourceVersion": "9"},
        "data": {"X-Frame-Options": "DENY"},
    }
    assert named.narrow({**configmap, "metadata": {"namespace": "other", "name": "headers"}}) is None


def _response_headers(configuration: Configuration, host: str) -> HeaderEdits | None:
    for virtual_host in configuration.routes.virtual_hosts:
        if virtual_host.host == host:
            policy = virtual_host.paths[0].policy
            return policy.response_headers if policy is not None else None
    return None


def _with_headers(name: str, host: str, reference: str) -> dict[str, Any]:
    body = ingress(name, host)
    body["metadata"]["annotations"] = {CUSTOM_HEADERS: reference}
    return body


async def test_named_configmaps_are_watched_relisted_on_a_new_name_and_followed(
    api_client: client.ApiClient, apiserver: FakeApiServer, start_controller: Any
) -> None:
    core, networking = client.CoreV1Api(api_client), client.NetworkingV1Api(api_client)
    await networking.create_ingress_class(ingress_class())
    await core.create_namespaced_service("default", service())
    await client.DiscoveryV1Api(api_client).create_namespaced_endpoint_slice("default", endpoint_slice("web", "127.0.0.1"))
    await core.create_namespaced_config_map("default", {"metadata": {"name": "unrelated"}, "data": {"LOG_LEVEL": "debug"}})
    await core.create_namespaced_config_map("shared", {"metadata": {"name": "headers"}, "data": {"X-Frame-Options": "DENY"}})
    await core.create_namespaced_config_map("default", {"metadata": {"name": "more"}, "data": {"X-More": "1"}})
    await networking.create_namespaced_ingress("default", _with_headers("a", "a.example", "shared/headers"))

    controller: RunningController = await start_controller()
    sink, source = controller.sink, controller.source
    await sink.wait_until(lambda: bool(sink.configurations), 5)
    # The first publish already has the headers: the translation that named the ConfigMap waited
    # for its relist instead of publishing a table without them (or a "not found" problem).
    assert len(sink.configurations) == 1
    assert _response_headers(sink.configurations[0], "a.example") == HeaderEdits(set=(("X-Frame-Options", "DENY"),))
    assert source.cache.count(Kind.NAMED_CONFIGMAP) == 1, "only the named ConfigMap is kept"
    assert not [problem for problem in source._reported if "not found" in problem.message]

    await core.patch_namespaced_config_map("headers", "shared", {"data": {"X-Frame-Options": "SAMEORIGIN"}})
    await sink.wait_until(
        lambda: _response_headers(sink.configurations[-1], "a.example") == HeaderEdits(set=(("X-Frame-Options", "SAMEORIGIN"),)), 5
    )

    # A new name (a ConfigMap that existed all along, dropped by the watch until now) is relisted.
    lists_before = sum(1 for method, path in apiserver.request_log if path.startswith("/api/v1/configmaps") and "watch" not in path)
    await networking.create_namespaced_ingress("default", _with_headers("b", "b.example", "more"))
    await sink.wait_until(lambda: _response_headers(sink.configurations[-1], "b.example") == HeaderEdits(set=(("X-More", "1"),)), 5)
    lists = sum(1 for method, path in apiserver.request_log if path.startswith("/api/v1/configmaps") and "watch" not in path)
    assert lists == lists_before + 1
    assert source.cache.count(Kind.NAMED_CONFIGMAP) == 2

    # A named ConfigMap that goes away: its headers go, and the Ingress gets a located problem.
    await core.delete_namespaced_config_map("headers", "shared")
    await sink.wait_until(lambda: _response_headers(sink.configurations[-1], "a.example") is None, 5)
    assert [problem for problem in source._reported if problem.location == "Ingress default/a" and "shared/headers not found" in problem.message]
