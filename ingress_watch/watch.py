"""LIST+WATCH loops that keep an `ObjectCache` in step with the API server, one task per kind.

Theory of operation
-------------------
Each loop LISTs its kind (the response's `metadata.resourceVersion` is where the list ends),
installs the list in the cache with `replace` — which also drops objects deleted while nobody was
watching — and then WATCHes from that version with `allowWatchBookmarks`, applying each event and
remembering the newest resourceVersion it saw, BOOKMARKs included. Objects stay raw JSON dicts
(`raw_object`; the Watch is given return_type "object" so no model classes are built). A target
may narrow its objects before they reach the cache (`WatchTarget.narrow`): Opaque Secrets are
watched for backend CA bundles only, so everything else in them is dropped on arrival, and one
that stops holding a ca.crt leaves the cache as if deleted. ConfigMaps are watched for the
header ConfigMaps the Ingresses and the controller's ConfigMap name (`NamedConfigMaps`): only
those reach the cache; when the set of names changes the controller relists that kind.

kubernetes-asyncio's `Watch` quirks (NOTES §3) shape the rest:

* It reconnects by itself, without backoff, when the stream ends or a read times out — but only
  when `timeout_seconds` is absent, so it is never passed. A half-open connection would hang
  forever without a client timeout: `sock_read` (default 80 s, above the ~60 s bookmark interval of
  a real API server) turns silence into a reconnect from the last resourceVersion.
* It retries "410 Expired" once with the same version, which fails again, then raises
  `ApiException(410)`: the loop relists (the history it needed is compacted) and re-watches.
* Any other failure (connection refused while the server restarts, 5xx, 429) escapes as an
  exception: the loop waits with exponential backoff and jitter (or the server's Retry-After) and
  resumes the WATCH from its last version, relisting only when that answers 410.
* With `_preload_content=False` the client does not raise on HTTP errors, so the LIST here checks
  the status itself. A WATCH answered with an error reaches us as the `Watch` parsing the Status
  body into an `ApiException` without headers: Retry-After is honoured for LISTs only, watches
  use the backoff. Every `Watch` owns an `ApiClient`, closed by `async with`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.rest import RESTResponse
from prometheus_client import Counter

from ingress_watch.cache import JsonObject, Kind, ObjectCache, ObjectKey, object_key

logger = logging.getLogger(__name__)

WATCH_RESTARTS = Counter(
    "ingress_proxy_kubernetes_watch_restarts_total",
    "Watch streams restarted, by kind and reason (expired = relist after 410, error = backoff)",
    ["kind", "reason"],
)


@dataclass(frozen=True)
class WatchSettings:
    connect_timeout: float = 10.0
    read_timeout: float = 80.0  # silence longer than this = half-open connection: reconnect
    initial_backoff: float = 0.5
    max_backoff: float = 30.0


@dataclass(frozen=True)
class WatchTarget:
    """One kind to watch: which API class and list method, with which arguments."""

    kind: Kind
    api: type
    list_method: str
    args: tuple[str, ...] = ()
    field_selector: str | None = None
    # What of each object to keep (None: drop it, as if deleted); absent = the whole object.
    narrow: Callable[[JsonObject], JsonObject | None] | None = None

    def describe(self) -> str:
        where = f" in {self.args[0]}" if self.args else ""
        selector = f" ({self.field_selector})" if self.field_selector else ""
        return f"{self.kind.value}{where}{selector}"


CA_BUNDLE_KEYS = ("ca.crt", "tls.crt", "tls.key")  # ingress-nginx's proxy-ssl-secret: CA, client cert and key
_KEPT_METADATA = ("namespace", "name", "resourceVersion", "creationTimestamp", "deletionTimestamp")


def ca_bundle_only(secret: JsonObject) -> JsonObject | None:
    """An Opaque Secret narrowed to what backend TLS reads, or None when it holds no ca.crt.

    Opaque Secrets are mostly application passwords: the cache keeps none of those, and of a CA
    Secret only its CA bundle and the client certificate and key that may sit beside it
    (NOTES §6: ingress-nginx users keep proxy-ssl-secret CAs in Opaque Secrets)."""
    data = secret.get("data") or {}
    if not isinstance(data, dict) or "ca.crt" not in data:
        return None
    metadata = secret.get("metadata") or {}
    return {
        "metadata": {key: metadata[key] for key in _KEPT_METADATA if key in metadata},
        "type": secret.get("type"),
        "data": {key: data[key] for key in CA_BUNDLE_KEYS if key in data},
    }


class NamedConfigMaps:
    """The header ConfigMaps the last translation named (`Translation.named_configmaps`): the
    only ConfigMaps besides the controller's own that the cache keeps, trimmed to their data.

    Memory stays bounded by what Ingresses name, not by the cluster's ConfigMaps (application
    configuration, often large). The price: every ConfigMap event crosses the wire and is dropped
    here, and a change of the names relists ConfigMaps (the controller restarts that watch)."""

    def __init__(self) -> None:
        self.wanted: frozenset[ObjectKey] = frozenset()

    def narrow(self, configmap: JsonObject) -> JsonObject | None:
        if object_key(configmap) not in self.wanted:
            return None
        metadata = configmap.get("metadata") or {}
        return {"metadata": {key: metadata[key] for key in _KEPT_METADATA if key in metadata}, "data": configmap.get("data") or {}}


def watch_targets(
    namespace: str | None, configmap: tuple[str, str] | None, named_configmaps: NamedConfigMaps | None = None
) -> tuple[WatchTarget, ...]:
    """What the controller watches: everything in `namespace` (None = all namespaces), TLS Secrets,
    Opaque Secrets narrowed to their CA bundle, ConfigMaps narrowed to `named_configmaps` (None:
    all of them, for a one-time LIST), and the one ConfigMap `configmap` = (namespace, name) if
    given."""

    def namespaced(
        kind: Kind,
        api: type,
        resource: str,
        field_selector: str | None = None,
        narrow: Callable[[JsonObject], JsonObject | None] | None = None,
    ) -> WatchTarget:
        if namespace is None:
            return WatchTarget(kind, api, f"list_{resource}_for_all_namespaces", (), field_selector, narrow)
        return WatchTarget(kind, api, f"list_namespaced_{resource}", (namespace,), field_selector, narrow)

    targets = [
        namespaced(Kind.INGRESS, client.NetworkingV1Api, "ingress"),
        WatchTarget(Kind.INGRESS_CLASS, client.NetworkingV1Api, "list_ingress_class"),
        namespaced(Kind.SERVICE, client.CoreV1Api, "service"),
        namespaced(Kind.ENDPOINT_SLICE, client.DiscoveryV1Api, "endpoint_slice"),
        namespaced(Kind.SECRET, client.CoreV1Api, "secret", "type=kubernetes.io/tls"),
        namespaced(Kind.CA_SECRET, client.CoreV1Api, "secret", "type=Opaque", ca_bundle_only),
        namespaced(Kind.NAMED_CONFIGMAP, client.CoreV1Api, "config_map", None, None if named_configmaps is None else named_configmaps.narrow),
    ]
    if configmap is not None:
        targets.append(
            WatchTarget(Kind.CONFIGMAP, client.CoreV1Api, "list_namespaced_config_map", (configmap[0],), f"metadata.name={configmap[1]}")
        )
    return tuple(targets)


class _Backoff:
    def __init__(self, settings: WatchSettings) -> None:
        self._settings = settings
        self._failures = 0

    def reset(self) -> None:
        self._failures = 0

    def next_delay(self) -> float:
        ceiling = min(self._settings.max_backoff, self._settings.initial_backoff * 2**self._failures)
        self._failures += 1
        return ceiling * random.uniform(0.5, 1.0)


def _retry_after(error: client.ApiException) -> float | None:
    try:
        return float(error.headers["Retry-After"]) if error.headers else None
    except (KeyError, ValueError):
        return None


class KindWatcher:
    """Keeps one kind of the cache current; `on_change(kind)` after every change it applies."""

    def __init__(
        self,
        api_client: client.ApiClient,
        target: WatchTarget,
        cache: ObjectCache,
        on_change: Callable[[Kind], None],
        settings: WatchSettings,
    ) -> None:
        self.target = target
        self._list_function: Callable[..., Any] = getattr(target.api(api_client), target.list_method)
        self._cache = cache
        self._on_change = on_change
        self._settings = settings
        self._timeout = aiohttp.ClientTimeout(sock_connect=settings.connect_timeout, sock_read=settings.read_timeout)
        self._kwargs: dict[str, Any] = {"field_selector": target.field_selector} if target.field_selector else {}

    async def run(self) -> None:
        backoff = _Backoff(self._settings)
        kind = self.target.kind
        resource_version: str | None = None
        while True:
            listing = resource_version is None
            try:
                if resource_version is None:
                    resource_version = await self._relist()
                    backoff.reset()
                async with watch.Watch(return_type="object") as stream:
                    stream.stream(
                        self._list_function,
                        *self.target.args,
                        **self._kwargs,
                        resource_version=resource_version,
                        allow_watch_bookmarks=True,
                        _request_timeout=self._timeout,
                    )
                    async for event in stream:
                        obj: JsonObject = event["raw_object"]
                        resource_version = (obj.get("metadata") or {}).get("resourceVersion") or resource_version
                        backoff.reset()
                        if event["type"] == "BOOKMARK":
                            continue
                        event_type, kept = self._narrowed(event["type"], obj)
                        if self._cache.apply(kind, event_type, kept):
                            self._on_change(kind)
                delay = backoff.next_delay()  # not reached while the server is healthy: Watch reconnects itself
            except client.ApiException as error:
                if error.status == 410 and not listing:
                    logger.info("watch %s: resourceVersion %s expired (410): relisting", self.target.describe(), resource_version)
                    WATCH_RESTARTS.labels(kind.value, "expired").inc()
                    resource_version = None
                    continue
                delay = _retry_after(error) or backoff.next_delay()
                logger.warning("watch %s: API error %s %s: retrying in %.1fs", self.target.describe(), error.status, error.reason, delay)
                WATCH_RESTARTS.labels(kind.value, "error").inc()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as error:
                delay = backoff.next_delay()
                logger.warning("watch %s: %s: retrying in %.1fs", self.target.describe(), error or type(error).__name__, delay)
                WATCH_RESTARTS.labels(kind.value, "error").inc()
            await asyncio.sleep(delay)

    def _narrowed(self, event_type: str, obj: JsonObject) -> tuple[str, JsonObject]:
        """The event as the cache should see it: an object narrowed away is a deletion."""
        narrow = self.target.narrow
        if narrow is None:
            return event_type, obj
        kept = narrow(obj)
        if kept is None:
            return "DELETED", obj
        return event_type, kept

    async def _relist(self) -> str:
        response = await self._list_function(
            *self.target.args, **self._kwargs, _preload_content=False, _request_timeout=self._timeout
        )
        try:
            data = await response.read()
        finally:
            response.release()
        if not 200 <= response.status <= 299:
            raise client.ApiException(http_resp=RESTResponse(response, data))  # type: ignore[arg-type]  # what the client's own REST layer passes
        body = json.loads(data)
        kind = self.target.kind
        items = body.get("items") or []
        if self.target.narrow is not None:
            items = [kept for kept in map(self.target.narrow, items) if kept is not None]
        deleted = self._cache.replace(kind, items)
        if deleted:
            logger.info("relist %s: %d objects deleted while not watching", self.target.describe(), len(deleted))
        self._on_change(kind)
        return str(body["metadata"]["resourceVersion"])
