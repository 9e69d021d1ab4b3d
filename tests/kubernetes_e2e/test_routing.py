"""Ingress changes through the real CLI: served within a second, balanced per endpoint, ports by name,
class filtering, and one bad Ingress that blocks nothing."""

from __future__ import annotations

import asyncio
from collections import Counter

import trustme

from tests.kubernetes_e2e.conftest import (
    Backend,
    Cluster,
    StartBackends,
    StartController,
    backend_of,
    eventually,
    http_get,
)
from tests.kubernetes_e2e.objects import endpoint_slice, ingress, ingress_class, service, tls_secret

CHANGE_DEADLINE = 1.0  # the issue's bar: a change to an Ingress is served within one second


async def expose(cluster: Cluster, name: str, backends: list[Backend], port_name: str = "http") -> None:
    """A Service `name` (port 80 named `port_name`) whose one EndpointSlice lists `backends`."""
    await cluster.core.create_namespaced_service("default", service(name, [(port_name, 80, backends[0].port)]))
    slice_ = endpoint_slice(name, [backend.host for backend in backends], [(port_name, backends[0].port)])
    await cluster.discovery.create_namespaced_endpoint_slice("default", slice_)


async def test_create_update_delete_are_served_within_a_second(
    cluster: Cluster, start_controller: StartController, start_backends: StartBackends
) -> None:
    blue, green = await start_backends(["blue", "green"])
    await cluster.networking.create_ingress_class(ingress_class())
    await expose(cluster, "blue", [blue])
    await expose(cluster, "green", [green])
    controller = await start_controller(cluster)

    async def via_proxy() -> str | None:
        return backend_of(await http_get(controller.http_port, "app.example"))

    assert (await http_get(controller.http_port, "app.example")).status == 404
    await cluster.networking.create_namespaced_ingress("default", ingress("app", "app.example", "blue"))
    created = await eventually(via_proxy, lambda name: name == "blue", CHANGE_DEADLINE, "created Ingress served")
    await cluster.networking.replace_namespaced_ingress("app", "default", ingress("app", "app.example", "green"))
    updated = await eventually(via_proxy, lambda name: name == "green", CHANGE_DEADLINE, "updated Ingress served")
    await cluster.networking.delete_namespaced_ingress("app", "default")
    deleted = await eventually(
        lambda: http_get(controller.http_port, "app.example"), lambda a: a.status == 404, CHANGE_DEADLINE, "deleted Ingress gone"
    )
    assert max(created, updated, deleted) < CHANGE_DEADLINE
    assert controller.process.returncode is None


async def test_one_hundred_fresh_connections_reach_all_ten_endpoints(
    cluster: Cluster, start_controller: StartController, start_backends: StartBackends
) -> None:
    pods = await start_backends([f"pod-{index}" for index in range(10)])
    await cluster.networking.create_ingress_class(ingress_class())
    await cluster.core.create_namespaced_service("default", service("web", [("http", 80, pods[0].port)]))
    # Two slices, as the EndpointSlice controller splits large Services; one not-ready endpoint.
    for part, members in (("a", pods[:5]), ("b", pods[5:])):
        slice_ = endpoint_slice("web", [pod.host for pod in members], [("http", pods[0].port)], name=f"web-{part}")
        await cluster.discovery.create_namespaced_endpoint_slice("default", slice_)
    unready = endpoint_slice("web", ["127.0.0.99"], [("http", pods[0].port)], name="web-unready")
    unready["endpoints"][0]["conditions"]["ready"] = False
    await cluster.discovery.create_namespaced_endpoint_slice("default", unready)
    await cluster.networking.create_namespaced_ingress("default", ingress("web", "web.example", "web"))
    controller = await start_controller(cluster)

    answers = await asyncio.gather(*(http_get(controller.http_port, "web.example") for _ in range(100)))
    reached = Counter(backend_of(answer) for answer in answers)
    assert set(reached) == {pod.name for pod in pods}, reached
    assert min(reached.values()) >= 5, f"round-robin should spread evenly: {reached}"

    # Scale down: the endpoint fast path drops the second slice, no request reaches those pods.
    await cluster.discovery.delete_namespaced_endpoint_slice("web-b", "default")
    await eventually(
        lambda: asyncio.gather(*(http_get(controller.http_port, "web.example") for _ in range(10))),
        lambda batch: {backend_of(answer) for answer in batch} == {pod.name for pod in pods[:5]},
        CHANGE_DEADLINE * 2,
        "removed slice no longer balanced to",
    )


async def test_service_port_by_name_follows_the_endpoint_slice_port_of_that_name(
    cluster: Cluster, start_controller: StartController, start_backends: StartBackends
) -> None:
    (web,) = await start_backends(["web-port"], first_host=20)
    (metrics,) = await start_backends(["metrics-port"], first_host=20)
    assert web.port != metrics.port and web.host == metrics.host
    await cluster.networking.create_ingress_class(ingress_class())
    # Service port 8080 "web" targets container port "http-alt"; the slice says which number that is.
    ports = [("metrics", 9090, metrics.port), ("web", 8080, "http-alt")]
    await cluster.core.create_namespaced_service("default", service("named", ports))
    slice_ = endpoint_slice("named", [web.host], [("metrics", metrics.port), ("web", web.port)])
    await cluster.discovery.create_namespaced_endpoint_slice("default", slice_)
    await cluster.networking.create_namespaced_ingress("default", ingress("by-name", "named.example", "named", "web"))
    await cluster.networking.create_namespaced_ingress("default", ingress("by-number", "number.example", "named", 9090))
    controller = await start_controller(cluster)

    assert backend_of(await http_get(controller.http_port, "named.example")) == "web-port"
    assert backend_of(await http_get(controller.http_port, "number.example")) == "metrics-port"


async def test_class_filtering_by_class_name_legacy_annotation_and_default_class(
    cluster: Cluster, start_controller: StartController, start_backends: StartBackends
) -> None:
    (web,) = await start_backends(["web"])
    await cluster.networking.create_ingress_class(ingress_class())
    await cluster.networking.create_ingress_class(ingress_class("other", "example.com/other-controller"))
    await expose(cluster, "web", [web])
    legacy = {"kubernetes.io/ingress.class": "ingress-proxy"}
    foreign_legacy = {"kubernetes.io/ingress.class": "nginx"}
    cases = {
        "ours.example": ingress("ours", "ours.example"),
        "theirs.example": ingress("theirs", "theirs.example", class_name="other"),
        "legacy.example": ingress("legacy", "legacy.example", class_name=None, annotations=legacy),
        "legacy-nginx.example": ingress("legacy-nginx", "legacy-nginx.example", class_name=None, annotations=foreign_legacy),
        "classless.example": ingress("classless", "classless.example", class_name=None),
    }
    for obj in cases.values():
        await cluster.networking.create_namespaced_ingress("default", obj)
    controller = await start_controller(cluster, "--publish-status-address", "192.0.2.10")

    async def statuses() -> dict[str, int]:
        answers = await asyncio.gather(*(http_get(controller.http_port, host) for host in cases))
        return {host: answer.status for host, answer in zip(cases, answers)}

    expected = {"ours.example": 200, "theirs.example": 404, "legacy.example": 200, "legacy-nginx.example": 404, "classless.example": 404}
    assert await statuses() == expected

    # Our IngressClass becomes the cluster default: it claims the class-less Ingress, nothing else.
    await cluster.networking.replace_ingress_class("ingress-proxy", ingress_class(default=True))
    await eventually(statuses, lambda seen: seen == {**expected, "classless.example": 200}, CHANGE_DEADLINE, "default class")

    # Status goes to our Ingresses only.
    await eventually(lambda: cluster.ingress_status("classless"), lambda ips: ips == ["192.0.2.10"], 3.0, "status written")
    for name in ("ours", "legacy"):
        assert await cluster.ingress_status(name) == ["192.0.2.10"]
    for name in ("theirs", "legacy-nginx"):
        assert await cluster.ingress_status(name) == []


async def test_a_bad_ingress_blocks_nothing_and_gets_a_warning_event(
    cluster: Cluster, start_controller: StartController, start_backends: StartBackends, ca: trustme.CA
) -> None:
    (web,) = await start_backends(["web"])
    await cluster.networking.create_ingress_class(ingress_class())
    await expose(cluster, "web", [web])
    broken_secret = tls_secret("broken-tls", ca.issue_cert("broken.example"))
    broken_secret["data"]["tls.key"] = broken_secret["data"]["tls.crt"]  # a certificate where the key belongs
    await cluster.core.create_namespaced_secret("default", broken_secret)
    await cluster.networking.create_namespaced_ingress("default", ingress("missing", "missing.example", "no-such-service"))
    await cluster.networking.create_namespaced_ingress("default", ingress("broken", "broken.example", tls_secret="broken-tls"))
    await cluster.networking.create_namespaced_ingress("default", ingress("good", "good.example"))
    controller = await start_controller(cluster)

    assert backend_of(await http_get(controller.http_port, "good.example")) == "web"
    assert (await http_get(controller.http_port, "missing.example")).status == 404
    assert backend_of(await http_get(controller.http_port, "broken.example")) == "web", "routes stay up without their Secret"

    async def warned() -> set[str]:
        events = await cluster.core.list_namespaced_event("default")
        return {event.involved_object.name for event in events.items if event.type == "Warning"}

    await eventually(warned, lambda names: names == {"missing", "broken"}, 3.0, "Warning Events on the bad Ingresses")

    # A later change to a good Ingress is still served while the bad ones stay.
    await cluster.networking.create_namespaced_ingress("default", ingress("later", "later.example"))
    await eventually(
        lambda: http_get(controller.http_port, "later.example"), lambda a: backend_of(a) == "web", CHANGE_DEADLINE, "later"
    )
