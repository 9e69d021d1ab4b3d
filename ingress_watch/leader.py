"""Leader election on a coordination.k8s.io/v1 Lease, so that one replica alone writes status.

kubernetes-asyncio's `LeaderElection.run()` acquires the Lease, starts `onstarted_leading` as a
task, renews, and *returns* once a renewal fails (leadership lost); it raises on connection errors
and then leaves the leading task running. `LeaderElector.run()` therefore loops around it and
owns the leading task itself: whenever `run()` ends — returned, raised or cancelled — the task
is cancelled and the replica is a follower again before it competes anew.

On a clean stop (cancellation) a leader releases the Lease by removing its holderIdentity, so a
standby takes over after its next retry instead of waiting for the lease to expire; a replica
that dies without releasing is replaced after `lease_duration`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.leaderelection import electionconfig, leaderelection
from kubernetes_asyncio.leaderelection.resourcelock.leaselock import LeaseLock
from prometheus_client import Gauge

logger = logging.getLogger(__name__)

IS_LEADER = Gauge("ingress_proxy_kubernetes_leader", "1 while this replica holds the leader Lease")


def _default_identity() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class LeaderSettings:
    """Durations in seconds; the library requires lease > renew > 1.2 * retry and retry >= 1."""

    namespace: str = "default"
    lease_name: str = "ingress-proxy-leader"
    identity: str = field(default_factory=_default_identity)
    lease_duration: int = 15  # whole seconds: the library writes it as leaseDurationSeconds
    renew_deadline: float = 10.0
    retry_period: float = 2.0


class LeaderElector:
    def __init__(self, api_client: client.ApiClient, settings: LeaderSettings, lead: Callable[[], Awaitable[None]]) -> None:
        self._api_client = api_client
        self._settings = settings
        self._lead = lead
        self._leading_task: asyncio.Task[None] | None = None
        self.is_leader = False

    async def run(self) -> None:
        settings = self._settings
        try:
            while True:
                config = electionconfig.Config(
                    LeaseLock(settings.lease_name, settings.namespace, settings.identity, self._api_client),
                    lease_duration=settings.lease_duration,
                    renew_deadline=settings.renew_deadline,
                    retry_period=settings.retry_period,
                    onstarted_leading=self._leading,
                    onstopped_leading=self._stopped_leading,
                )
                try:
                    await leaderelection.LeaderElection(config).run()
                except (client.ApiException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
                    logger.warning("leader election on Lease %s/%s failed: %s", settings.namespace, settings.lease_name, error)
                finally:
                    self._step_down()
                await asyncio.sleep(settings.retry_period)
        finally:
            if self._leading_task is not None:
                with contextlib.suppress(client.ApiException, aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    await asyncio.wait_for(self._release(), settings.retry_period)

    async def _leading(self) -> None:
        self._leading_task = asyncio.current_task()
        self.is_leader = True
        IS_LEADER.set(1)
        logger.info("%s became the leader (Lease %s/%s)", self._settings.identity, self._settings.namespace, self._settings.lease_name)
        await self._lead()

    async def _stopped_leading(self) -> None:
        logger.warning("%s lost the leader Lease", self._settings.identity)

    def _step_down(self) -> None:
        if self._leading_task is not None and not self._leading_task.done():
            self._leading_task.cancel()
        if self.is_leader:
            self.is_leader = False
            IS_LEADER.set(0)

    async def _release(self) -> None:
        api = client.CoordinationV1Api(self._api_client)
        lease = await api.read_namespaced_lease(self._settings.lease_name, self._settings.namespace)
        if lease.spec is not None and lease.spec.holder_identity == self._settings.identity:
            patch = {"metadata": {"resourceVersion": lease.metadata.resource_version}, "spec": {"holderIdentity": None}}
            await api.patch_namespaced_lease(self._settings.lease_name, self._settings.namespace, patch)
            logger.info("%s released the leader Lease", self._settings.identity)
