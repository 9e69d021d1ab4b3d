"""The fake API server, driven only through kubernetes-asyncio (the client the controller uses)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client, config, watch

from tests.fake_apiserver import FakeApiServer


def _ingress(name: str, **extra: Any) -> dict[str, Any]:
    backend = {"service": {"name": "web", "port": {"number": 80}}}
    spec = {"rules": [{"host": "a.example", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend}]}}]}
    return {"metadata": {"name": name, **extra}, "spec": spec}


async def _events(stream: watch.Watch, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []

    async def collect() -> None:
        async for event in stream:
            events.append(event)
            if len(events) == count:
                return

    await asyncio.wait_for(collect(), timeout)
    return events


async def test_create_read_update_sets_server_metadata_and_status_rules(api_client: client.ApiClient) -> None:
    networking = client.NetworkingV1Api(api_client)
    created = await networking.create_namespaced_ingress(
        "default", {**_ingress("web"), "status": {"loadBalancer": {"ingress": [{"ip": "9.9.9.9"}]}}}
    )
    assert created.metadata.uid and created.metadata.creation_timestamp and created.metadata.generation == 1
    assert created.status.load_balancer is None, "create must clear status"

    labelled = await networking.patch_namespaced_ingress("web", "default", {"metadata": {"labels": {"a": "b"}}})
    assert labelled.metadata.generation == 1, "metadata-only changes keep the generation"
    assert int(labelled.metadata.resource_version) > int(created.metadata.resource_version)

    with_status = await networking.patch_namespaced_ingress_status(
        "web", "default", {"status": {"loadBalancer": {"ingress": [{"ip": "10.0.0.1"}]}}, "spec": {"rules": []}}
    )
    assert with_status.status.load_balancer.ingress[0].ip == "10.0.0.1"
    assert with_status.spec.rules, "the status subresource ignores spec changes"

    raw = api_client.sanitize_for_serialization(with_status)
    raw["spec"]["rules"][0]["host"] = "b.example"
    raw["status"] = {}
    replaced = await networking.replace_namespaced_ingress("web", "default", raw)
    assert replaced.spec.rules[0].host == "b.example" and replaced.metadata.generation == 2
    assert replaced.status.load_balancer.ingress[0].ip == "10.0.0.1", "the main resource ignores status changes"
    assert replaced.metadata.uid == created.metadata.uid


async def test_errors_are_status_bodies_with_real_codes(api_client: client.ApiClient) -> None:
    core = client.CoreV1Api(api_client)
    with pytest.raises(client.ApiException) as missing:
        await core.read_namespaced_config_map("nope", "default")
    assert missing.value.status == 404
    assert json.loads(missing.value.body)["reason"] == "NotFound"

    first = await core.create_namespaced_config_map("default", {"metadata": {"name": "c"}, "data": {"k": "1"}})
    with pytest.raises(client.ApiException) as exists:
        await core.create_namespaced_config_map("default", {"metadata": {"name": "c"}})
    assert (exists.value.status, json.loads(exists.value.body)["reason"]) == (409, "AlreadyExists")

    await core.patch_namespaced_config_map("c", "default", {"data": {"k": "2"}})
    stale = api_client.sanitize_for_serialization(first)
    with pytest.raises(client.ApiException) as conflict:
        await core.replace_namespaced_config_map("c", "default", stale)
    assert (conflict.value.status, json.loads(conflict.value.body)["kind"]) == (409, "Status")
    with pytest.raises(client.ApiException) as stale_patch:
        await core.patch_namespaced_config_map("c", "default", {"metadata": {"resourceVersion": first.metadata.resource_version}})
    assert json.loads(stale_patch.value.body)["reason"] == "Conflict"

    with pytest.raises(client.ApiException) as bad_path:
        await client.NetworkingV1Api(api_client).create_namespaced_ingress(
            "default", {"metadata": {"name": "bad"}, "spec": {"rules": [{"http": {"paths": [{"path": "x", "backend": {}}]}}]}}
        )
    assert bad_path.value.status == 422
    fields = {cause["field"] for cause in json.loads(bad_path.value.body)["details"]["causes"]}
    assert "spec.rules[0].http.paths[0].pathType" in fields


async def test_endpoint_slice_loopback_is_rejected_unless_allowed(tmp_path: Path) -> None:
    slice_body = {
        "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["127.0.0.1"]}],
        "ports": [{"port": 8080}],
    }
    for allow_loopback in (False, True):
        async with FakeApiServer(allow_loopback=allow_loopback) as server:
            configuration = client.Configuration()
            await config.load_kube_config(str(server.write_kubeconfig(tmp_path / "kc")), client_configuration=configuration)
            async with client.ApiClient(configuration) as api:
                discovery = client.DiscoveryV1Api(api)
                if allow_loopback:
                    created = await discovery.create_namespaced_endpoint_slice("default", slice_body)
                    assert created.ports[0].protocol == "TCP"
                else:
                    with pytest.raises(client.ApiException) as rejected:
                        await discovery.create_namespaced_endpoint_slice("default", slice_body)
                    assert rejected.value.status == 422
                    assert "may not be in the loopback range" in json.loads(rejected.value.body)["message"]


async def test_list_then_watch_replays_history_and_sends_bookmarks(api_client: client.ApiClient) -> None:
    core = client.CoreV1Api(api_client)
    await core.create_namespaced_config_map("default", {"metadata": {"name": "one"}})
    listed = json.loads(await (await core.list_config_map_for_all_namespaces(_preload_content=False)).read())
    assert listed["kind"] == "ConfigMapList" and [i["metadata"]["name"] for i in listed["items"]] == ["one"]
    await core.create_namespaced_config_map("default", {"metadata": {"name": "two"}})
    await core.delete_namespaced_config_map("one", "default")

    async with watch.Watch(return_type="object") as stream:
        stream.stream(core.list_config_map_for_all_namespaces, resource_version=listed["metadata"]["resourceVersion"],
                      allow_watch_bookmarks=True)
        events = await _events(stream, 3)
    assert [(e["type"], e["raw_object"]["metadata"].get("name")) for e in events] == [
        ("ADDED", "two"), ("DELETED", "one"), ("BOOKMARK", None)
    ]
    assert set(events[2]["raw_object"]) == {"kind", "apiVersion", "metadata"}
    assert events[2]["raw_object"]["metadata"]["resourceVersion"] == events[1]["raw_object"]["metadata"]["resourceVersion"]


async def test_watch_timeout_seconds_ends_the_stream(api_client: client.ApiClient) -> None:
    core = client.CoreV1Api(api_client)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with watch.Watch(return_type="object") as stream:
        async for _ in stream.stream(core.list_namespaced_secret, "default", timeout_seconds=1):
            pytest.fail("no secrets exist")
    assert 0.9 <= loop.time() - started < 3


async def test_watch_from_compacted_version_is_410_and_exact_list_too(api_client: client.ApiClient, apiserver: FakeApiServer) -> None:
    core = client.CoreV1Api(api_client)
    old = await core.create_namespaced_config_map("default", {"metadata": {"name": "a"}})
    await core.create_namespaced_config_map("default", {"metadata": {"name": "b"}})
    exact = json.loads(await (await core.list_namespaced_config_map(
        "default", resource_version=old.metadata.resource_version, resource_version_match="Exact", _preload_content=False)).read())
    assert [i["metadata"]["name"] for i in exact["items"]] == ["a"], "an exact LIST is the state at that version"
    apiserver.compact()
    with pytest.raises(client.ApiException) as gone:
        async with watch.Watch(return_type="object") as stream:
            await _events(stream.stream(core.list_namespaced_config_map, "default", resource_version=old.metadata.resource_version), 1)
    assert gone.value.status == 410
    with pytest.raises(client.ApiException) as gone_list:
        await core.list_namespaced_config_map("default", resource_version=old.metadata.resource_version, resource_version_match="Exact")
    assert gone_list.value.status == 410 and json.loads(gone_list.value.body)["reason"] == "Expired"
    with pytest.raises(client.ApiException) as gone_paged:
        await core.list_namespaced_config_map("default", resource_version=old.metadata.resource_version, limit=10)
    assert gone_paged.value.status == 410, "a version with limit means Exact"
    current = await core.list_namespaced_config_map("default", resource_version=old.metadata.resource_version)
    assert len(current.items) == 2, "NotOlderThan (the default) is served from the current state"


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("tier=web", ["a"]),
        ("tier!=web", ["b", "c"]),
        ("tier in (web,db)", ["a", "b"]),
        ("tier notin (web)", ["b", "c"]),
        ("tier", ["a", "b"]),
        ("!tier", ["c"]),
        ("tier=db,zone=x", ["b"]),
    ],
)
async def test_label_selectors(api_client: client.ApiClient, selector: str, expected: list[str]) -> None:
    core = client.CoreV1Api(api_client)
    for name, labels in (("a", {"tier": "web"}), ("b", {"tier": "db", "zone": "x"}), ("c", {})):
        await core.create_namespaced_service("default", {"metadata": {"name": name, "labels": labels}, "spec": {"ports": [{"port": 80}]}})
    found = await core.list_namespaced_service("default", label_selector=selector)
    assert [s.metadata.name for s in found.items] == expected


async def test_field_selectors_and_selector_transitions_in_watches(api_client: client.ApiClient) -> None:
    core = client.CoreV1Api(api_client)
    tls = {"tls.crt": "Y2VydA==", "tls.key": "a2V5"}
    await core.create_namespaced_secret("default", {"metadata": {"name": "cert"}, "type": "kubernetes.io/tls", "data": tls})
    await core.create_namespaced_secret("other", {"metadata": {"name": "token"}, "data": {"t": "eA=="}})
    tls_only = await core.list_secret_for_all_namespaces(field_selector="type=kubernetes.io/tls")
    assert [s.metadata.name for s in tls_only.items] == ["cert"]
    assert [s.metadata.name for s in (await core.list_secret_for_all_namespaces(field_selector="metadata.namespace!=default")).items] == ["token"]
    with pytest.raises(client.ApiException) as unsupported:
        await core.list_namespaced_secret("default", field_selector="spec.nothing=1")
    assert unsupported.value.status == 400

    await core.create_namespaced_config_map("default", {"metadata": {"name": "m", "labels": {"watched": "yes"}}})
    async with watch.Watch(return_type="object") as stream:
        stream.stream(core.list_namespaced_config_map, "default", label_selector="watched=yes")
        initial = await _events(stream, 1)
        await core.patch_namespaced_config_map("m", "default", {"metadata": {"labels": {"watched": None}}})
        await core.patch_namespaced_config_map("m", "default", {"metadata": {"labels": {"watched": "yes"}}})
        later = await _events(stream, 2)
    assert [e["type"] for e in initial + later] == ["ADDED", "DELETED", "ADDED"]


async def test_injected_429_carries_retry_after_and_500_then_recovers(api_client: client.ApiClient, apiserver: FakeApiServer) -> None:
    core = client.CoreV1Api(api_client)
    apiserver.fail_next(1, 429, path_contains="/configmaps", retry_after=3)
    apiserver.fail_next(1, 500, path_contains="/configmaps")
    with pytest.raises(client.ApiException) as throttled:
        await core.list_namespaced_config_map("default")
    assert throttled.value.status == 429 and throttled.value.headers["Retry-After"] == "3"
    with pytest.raises(client.ApiException) as broken:
        await core.list_namespaced_config_map("default")
    assert broken.value.status == 500
    assert (await core.list_namespaced_config_map("default")).items == []


async def test_dropped_and_stalled_watches(api_client: client.ApiClient, apiserver: FakeApiServer) -> None:
    core = client.CoreV1Api(api_client)
    async with watch.Watch(return_type="object") as stream:
        stream.stream(core.list_namespaced_config_map, "default", timeout_seconds=30)
        reader = asyncio.ensure_future(_events(stream, 1))
        while apiserver.open_watches == 0:
            await asyncio.sleep(0.01)
        apiserver.drop_watches()
        assert await reader == [], "a server-side end with timeout_seconds set ends the iteration"

    async with watch.Watch(return_type="object") as stream:
        stream.stream(core.list_namespaced_config_map, "default", _request_timeout=aiohttp.ClientTimeout(sock_read=0.5))
        reader = asyncio.ensure_future(_events(stream, 1))
        while apiserver.open_watches == 0:
            await asyncio.sleep(0.01)
        apiserver.stall_watches()
        await core.create_namespaced_config_map("default", {"metadata": {"name": "late"}})
        # the stalled stream says nothing; the client's read timeout reconnects it and the new stream delivers
        event = (await reader)[0]
    assert (event["type"], event["raw_object"]["metadata"]["name"]) == ("ADDED", "late")


async def test_restart_keeps_or_loses_state_on_the_same_port(api_client: client.ApiClient, apiserver: FakeApiServer) -> None:
    core = client.CoreV1Api(api_client)
    before = await core.create_namespaced_config_map("default", {"metadata": {"name": "kept"}})
    port = apiserver.port
    await apiserver.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await core.list_namespaced_config_map("default")
    await apiserver.start()
    assert apiserver.port == port
    assert [c.metadata.name for c in (await core.list_namespaced_config_map("default")).items] == ["kept"]
    await apiserver.restart(keep_state=False)
    after = await core.list_namespaced_config_map("default")
    assert after.items == [] and int(after.metadata.resource_version) >= int(before.metadata.resource_version)
    with pytest.raises(client.ApiException) as gone:
        async with watch.Watch(return_type="object") as stream:
            await _events(stream.stream(core.list_namespaced_config_map, "default", resource_version=before.metadata.resource_version), 1)
    assert gone.value.status == 410


async def test_runs_as_a_subprocess_with_a_kubeconfig(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fake_apiserver", "--kubeconfig", str(kubeconfig),
        cwd=Path(__file__).resolve().parents[2], stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        url = (await asyncio.wait_for(process.stdout.readline(), 10)).decode().strip()
        assert url.startswith("http://127.0.0.1:")
        configuration = client.Configuration()
        await config.load_kube_config(str(kubeconfig), client_configuration=configuration)
        async with client.ApiClient(configuration) as api:
            created = await client.CoordinationV1Api(api).create_namespaced_lease("default", {"metadata": {"name": "l"}, "spec": {}})
            assert created.metadata.resource_version == "2"
    finally:
        process.terminate()
        await process.wait()


async def test_finalizers_delay_deletion_until_a_json_patch_removes_them(api_client: client.ApiClient) -> None:
    core = client.CoreV1Api(api_client)
    await core.create_namespaced_config_map("default", {"metadata": {"name": "held", "finalizers": ["example.com/hold"]}})
    async with watch.Watch(return_type="object") as stream:
        stream.stream(core.list_namespaced_config_map, "default")
        await _events(stream, 1)
        await core.delete_namespaced_config_map("held", "default")
        terminating = (await _events(stream, 1))[0]
        assert terminating["type"] == "MODIFIED" and terminating["raw_object"]["metadata"]["deletionTimestamp"]
        await core.patch_namespaced_config_map("held", "default", [{"op": "remove", "path": "/metadata/finalizers"}])
        assert (await _events(stream, 1))[0]["type"] == "DELETED"
    with pytest.raises(client.ApiException) as gone:
        await core.read_namespaced_config_map("held", "default")
    assert gone.value.status == 404
