"""Writes `status.loadBalancer.ingress` on the Ingresses this controller serves (leader only).

The address comes from `--publish-status-address` (IPs and/or hostnames) or from the
`--publish-service` Service: its own load-balancer status, else its externalIPs, else its
ClusterIP. The writer compares what each Ingress in the latest snapshot shows with what it should
show and patches the difference: Ingresses of our class get the address (again, if someone
cleared it); an Ingress that left our class and still shows exactly our address is cleared. It
never touches an Ingress showing someone else's address unless that Ingress is ours.

`update()` may be called on every rebuild, leader or not; only `run()` — which the leader elector
runs while this replica holds the Lease and cancels when it loses it — performs writes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass

import aiohttp
from kubernetes_asyncio import client

from ingress_watch.cache import JsonObject, ObjectKey, object_key
from ingress_watch.snapshot import Snapshot

logger = logging.getLogger(__name__)

LoadBalancerIngress = tuple[tuple[str, str], ...]  # (("ip", "10.0.0.1"), ("hostname", "lb.example"))


@dataclass(frozen=True)
class PublishSettings:
    addresses: tuple[str, ...] = ()  # --publish-status-address: IPs or hostnames
    service: tuple[str, str] | None = None  # --publish-service: (namespace, name)
    retry_delay: float = 1.0


def _entry(address: str) -> tuple[str, str]:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return ("hostname", address)
    return ("ip", address)


def desired_load_balancer(settings: PublishSettings, snapshot: Snapshot) -> LoadBalancerIngress:
    if settings.addresses:
        return tuple(_entry(address) for address in settings.addresses)
    if settings.service is None:
        return ()
    service = next((s for s in snapshot.services if object_key(s) == settings.service), None)
    if service is None:
        return ()
    published = current_load_balancer(service)
    if published:
        return published
    spec = service.get("spec") or {}
    if spec.get("externalIPs"):
        return tuple(("ip", ip) for ip in spec["externalIPs"])
    cluster_ip = spec.get("clusterIP")
    return (("ip", cluster_ip),) if cluster_ip and cluster_ip != "None" else ()


def current_load_balancer(obj: JsonObject) -> LoadBalancerIngress:
    entries = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    return tuple((key, entry[key]) for entry in entries for key in ("ip", "hostname") if entry.get(key))


class StatusWriter:
    def __init__(self, api_client: client.ApiClient, settings: PublishSettings) -> None:
        self._api = client.NetworkingV1Api(api_client)
        self._settings = settings
        self._latest: tuple[Snapshot, frozenset[ObjectKey]] | None = None
        self._wake = asyncio.Event()
        self._written: dict[ObjectKey, tuple[str, LoadBalancerIngress]] = {}  # key → (resourceVersion seen, value written)
        self.writes = 0

    def update(self, snapshot: Snapshot, claimed: frozenset[ObjectKey]) -> None:
        self._latest = (snapshot, claimed)
        self._wake.set()

    async def run(self) -> None:
        """Keep statuses right until cancelled (when leadership is lost)."""
        self._written.clear()
        self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._sync()
            except (client.ApiException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
                logger.warning("writing Ingress status failed (%s): retrying in %.1fs", error, self._settings.retry_delay)
                await asyncio.sleep(self._settings.retry_delay)
                self._wake.set()

    async def _sync(self) -> None:
        if self._latest is None:
            return
        snapshot, claimed = self._latest
        desired = desired_load_balancer(self._settings, snapshot)
        for ingress in snapshot.ingresses:
            key = object_key(ingress)
            current = current_load_balancer(ingress)
            if key in claimed and desired and current != desired:
                target = desired
            elif key not in claimed and desired and current == desired:
                target = ()
            else:
                continue
            version = (ingress.get("metadata") or {}).get("resourceVersion", "")
            if self._written.get(key) == (version, target):
                continue  # already written; the watch has not caught up yet
            value = [{kind: address} for kind, address in target] if target else None
            try:
                await self._api.patch_namespaced_ingress_status(key[1], key[0], {"status": {"loadBalancer": {"ingress": value}}})
            except client.ApiException as error:
                if error.status != 404:  # deleted meanwhile: nothing to write
                    raise
            self._written[key] = (version, target)
            self.writes += 1
            logger.info("Ingress %s/%s status: %s", key[0], key[1], value or "cleared")
