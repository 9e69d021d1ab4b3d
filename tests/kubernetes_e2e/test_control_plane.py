"""The control plane under stress, through the real CLI: readiness before the first sync, leader
handover between two controller processes, and API faults (410, dropped watches, API server
restarts) converging within five seconds."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.fake_apiserver import FakeApiServer
from tests.fake_apiserver.store import RESOURCES
from tests.kubernetes_e2e.conftest import (
    StartBackends,
    Cluster,
    StartController,
    backend_of,
    eventually,
    http_get,
    open_cluster,
)
from tests.kubernetes_e2e.objects import endpoint_slice, ingress, ingress_class, service
from tests.ports import free_port

CONVERGENCE_DEADLINE = 5.0  # after an API fault, the proxy serves the cluster's state within this
INGRESSES = next(resource for resource in RESOURCES if resource.kind == "Ingress")


async def seed(cluster: Cluster, start_backends: StartBackends, *hosts: str) -> None:
    (web,) = await start_backends(["web"])
    await cluster.networking.create_ingress_class(ingress_class())
    await cluster.core.create_namespaced_service("default", service("web", [("http", 80, web.port)]))
    await cluster.discovery.create_namespaced_endpoint_slice("default", endpoint_slice("web", [web.host], [("http", web.port)]))
    for host in hosts:
        await cluster.networking.create_namespaced_ingress("default", ingress(host.split(".")[0], host))


async def served(port: int, host: str) -> bool:
    return backend_of(await http_get(port, host, timeout=2)) == "web"


async def test_not_ready_and_not_listening_until_the_first_sync(
    tmp_path: Path, start_controller: StartController, start_backends: StartBackends
) -> None:
    server = FakeApiServer(allow_loopback=True, bookmark_interval=0.5)
    server.port = free_port()  # known before it listens, so the kubeconfig can name it
    async for cluster in open_cluster(server, tmp_path / "kubeconfig"):
        controller = await start_controller(cluster, wait_ready=False)
        await eventually(controller.readyz, lambda status: status == 503, 15.0, "admin listener up, not ready")
        for _ in range(5):  # the API server is unreachable: stays unready, serves no traffic
            assert await controller.readyz() == 503
            assert not await _accepts(controller.https_port)
            await asyncio.sleep(0.1)
        await server.start()
        try:
            await seed(cluster, start_backends, "app.example")
            await eventually(controller.readyz, lambda status: status == 200, CONVERGENCE_DEADLINE, "ready after sync")
            assert await served(controller.http_port, "app.example")
        finally:
            await server.stop()


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def test_status_written_by_the_leader_only_and_handed_over(
    cluster: Cluster, start_controller: StartController, start_backends: StartBackends
) -> None:
    await seed(cluster, start_backends, "app.example")
    election = ("--election-id", "e2e-leader")
    first = await start_controller(cluster, *election, "--publish-status-address", "192.0.2.1")
    await eventually(lambda: cluster.ingress_status("app"), lambda ips: ips == ["192.0.2.1"], 5.0, "first leader's status")
    second = await start_controller(cluster, *election, "--publish-status-address", "192.0.2.2")
    lease = await cluster.coordination.read_namespaced_lease("e2e-leader", "default")
    holder = lease.spec.holder_identity
    assert await first.metric("ingress_proxy_kubernetes_leader") == 1
    assert await second.metric("ingress_proxy_kubernetes_leader") == 0
    # The standby serves traffic but never writes status: clear it, only the leader restores it.
    await cluster.networking.patch_namespaced_ingress_status("app", "default", {"status": {"loadBalancer": {"ingress": None}}})
    await eventually(lambda: cluster.ingress_status("app"), lambda ips: ips == ["192.0.2.1"], 3.0, "status re-applied")
    assert await served(second.http_port, "app.example")

    assert await first.stop() == 0  # SIGTERM: the leader releases its Lease on the way out
    await eventually(lambda: cluster.ingress_status("app"), lambda ips: ips == ["192.0.2.2"], 8.0, "standby took over")
    lease = await cluster.coordination.read_namespaced_lease("e2e-leader", "default")
    assert lease.spec.holder_identity not in (None, holder)
    assert await second.metric("ingress_proxy_kubernetes_leader") == 1


async def test_relist_after_410_expired_converges(cluster: Cluster, start_controller: StartController, start_backends: StartBackends) -> None:
    await seed(cluster, start_backends, "old.example")
    controller = await start_controller(cluster)
    assert await served(controller.http_port, "old.example")

    cluster.server.stall_watches()  # the controller hears nothing of what follows...
    await cluster.networking.delete_namespaced_ingress("old", "default")
    await cluster.networking.create_namespaced_ingress("default", ingress("new", "new.example"))
    cluster.server.compact()  # ...and the history it would resume from is gone
    cluster.server.drop_watches()
    await eventually(lambda: served(controller.http_port, "new.example"), bool, CONVERGENCE_DEADLINE, "created while away")
    await eventually(
        lambda: http_get(controller.http_port, "old.example"), lambda a: a.status == 404, CONVERGENCE_DEADLINE, "deleted while away"
    )
    assert await controller.metric("ingress_proxy_kubernetes_watch_restarts_total", kind="Ingress", reason="expired") >= 1


async def test_dropped_watches_and_api_server_restarts_converge(
    cluster: Cluster, start_controller: StartController, start_backends: StartBackends
) -> None:
    await seed(cluster, start_backends, "app.example")
    controller = await start_controller(cluster)
    server = cluster.server

    server.drop_watches()  # a clean end of every stream: the client resumes from its resourceVersion
    await cluster.networking.create_namespaced_ingress("default", ingress("after-drop", "after-drop.example"))
    await eventually(lambda: served(controller.http_port, "after-drop.example"), bool, CONVERGENCE_DEADLINE, "after drop")

    await server.stop()  # a control-plane upgrade: traffic keeps flowing on the last configuration
    assert await served(controller.http_port, "app.example")
    server.store.create(INGRESSES, "default", ingress("during-outage", "during-outage.example"))
    await asyncio.sleep(0.5)
    await server.start()
    await eventually(lambda: served(controller.http_port, "during-outage.example"), bool, CONVERGENCE_DEADLINE, "after restart")

    await server.restart(keep_state=False)  # etcd wiped: resumes get 410, the relist finds nothing
    await eventually(
        lambda: http_get(controller.http_port, "app.example"), lambda a: a.status == 404, CONVERGENCE_DEADLINE, "wiped state"
    )
    await seed(cluster, start_backends, "rebuilt.example")
    await eventually(lambda: served(controller.http_port, "rebuilt.example"), bool, CONVERGENCE_DEADLINE, "re-created objects")
    assert controller.process.returncode is None
