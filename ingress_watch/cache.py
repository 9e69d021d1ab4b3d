"""The controller's copy of the watched Kubernetes objects, as raw JSON dicts.

Watch loops write here (a whole LIST via `replace`, single events via `apply`); the controller
reads `snapshot()` when a rebuild is due. The cache tracks which kinds completed their initial
LIST (nothing may be published before all have: a half-listed cluster would serve 404s for
routes that exist) and which kinds changed since the controller last looked, so that a change
touching only EndpointSlices can take the fast path.
"""

from __future__ import annotations

import enum
from typing import Any

from ingress_watch.snapshot import Snapshot

JsonObject = dict[str, Any]
ObjectKey = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped kinds


class Kind(enum.Enum):
    INGRESS = "Ingress"
    INGRESS_CLASS = "IngressClass"
    SERVICE = "Service"
    ENDPOINT_SLICE = "EndpointSlice"
    SECRET = "Secret"
    CA_SECRET = "Secret (Opaque, ca.crt)"  # CA bundles for backend TLS, trimmed (watch.ca_bundle_only)
    CONFIGMAP = "ConfigMap"
    NAMED_CONFIGMAP = "ConfigMap (headers)"  # the ones translation named, trimmed (watch.NamedConfigMaps)


def object_key(obj: JsonObject) -> ObjectKey:
    metadata = obj.get("metadata") or {}
    return (metadata.get("namespace") or "", metadata.get("name") or "")


class ObjectCache:
    def __init__(self, kinds: tuple[Kind, ...]) -> None:
        self.kinds = kinds
        self._objects: dict[Kind, dict[ObjectKey, JsonObject]] = {kind: {} for kind in kinds}
        self._listed: set[Kind] = set()
        self._changed: set[Kind] = set()

    @property
    def synced(self) -> bool:
        """Every kind completed its initial LIST."""
        return self._listed.issuperset(self.kinds)

    def count(self, kind: Kind) -> int:
        return len(self._objects[kind])

    def replace(self, kind: Kind, objects: list[JsonObject]) -> list[JsonObject]:
        """Install a fresh LIST. Returns the objects it deleted (gone while we were not watching),
        which is how a relist after 410 Expired synthesises the DELETE events it never saw."""
        fresh = {object_key(obj): obj for obj in objects}
        stale = self._objects[kind]
        deleted = [obj for key, obj in stale.items() if key not in fresh]
        if fresh != stale or kind not in self._listed:
            self._changed.add(kind)
        self._objects[kind] = fresh
        self._listed.add(kind)
        return deleted

    def unlist(self, kind: Kind) -> None:
        """`kind` must be LISTed again before anything is published (its narrowing changed)."""
        self._listed.discard(kind)

    def apply(self, kind: Kind, event_type: str, obj: JsonObject) -> bool:
        """Apply one watch event (ADDED, MODIFIED, DELETED). Returns whether anything changed."""
        key, objects = object_key(obj), self._objects[kind]
        if event_type == "DELETED":
            if objects.pop(key, None) is None:
                return False
        elif objects.get(key) == obj:
            return False
        else:
            objects[key] = obj
        self._changed.add(kind)
        return True

    def take_changed(self) -> frozenset[Kind]:
        """The kinds changed since the last call (and forget them)."""
        changed, self._changed = frozenset(self._changed), set()
        return changed

    def snapshot(self) -> Snapshot:
        def objects(kind: Kind) -> tuple[JsonObject, ...]:
            return tuple(self._objects[kind].values()) if kind in self._objects else ()

        configmaps = objects(Kind.CONFIGMAP)
        return Snapshot(
            ingresses=objects(Kind.INGRESS),
            ingress_classes=objects(Kind.INGRESS_CLASS),
            services=objects(Kind.SERVICE),
            endpoint_slices=objects(Kind.ENDPOINT_SLICE),
            secrets=objects(Kind.SECRET) + objects(Kind.CA_SECRET),
            configmap=configmaps[0] if configmaps else None,
            named_configmaps=objects(Kind.NAMED_CONFIGMAP),
        )
