"""The object store behind the fake API server: resources, versions, history, validation.

One global, monotonically increasing resourceVersion counter (like etcd's revision) stamps every
write. Every write appends a `WatchEvent` to a bounded history (the "compaction window") and is
pushed synchronously to every subscribed watch, so a watch that replays history and then
subscribes in one synchronous step can neither miss nor duplicate an event. Stored objects are
never mutated in place: each write stores a fresh dict, so history entries may share them.
"""

from __future__ import annotations

import copy
import datetime
import ipaddress
import itertools
import re
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.fake_apiserver.selectors import SelectorError, parse_field_selector, parse_label_selector

JsonObject = dict[str, Any]


def _metadata_name(obj: JsonObject) -> str:
    return str(obj.get("metadata", {}).get("name", ""))


def _metadata_namespace(obj: JsonObject) -> str:
    return str(obj.get("metadata", {}).get("namespace", ""))


def _secret_type(obj: JsonObject) -> str:
    return str(obj.get("type", ""))


_COMMON_FIELDS: dict[str, Callable[[JsonObject], str]] = {
    "metadata.name": _metadata_name,
    "metadata.namespace": _metadata_namespace,
}


@dataclass(frozen=True)
class ResourceType:
    group: str  # "" = the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    has_status: bool = False
    extra_fields: tuple[tuple[str, Callable[[JsonObject], str]], ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified_name(self) -> str:
        """How error messages name the resource: `ingresses.networking.k8s.io`, `configmaps`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def field_getters(self) -> dict[str, Callable[[JsonObject], str]]:
        return {**_COMMON_FIELDS, **dict(self.extra_fields)}


RESOURCES: tuple[ResourceType, ...] = (
    ResourceType("networking.k8s.io", "v1", "ingresses", "Ingress", True, has_status=True),
    ResourceType("networking.k8s.io", "v1", "ingressclasses", "IngressClass", False),
    ResourceType("", "v1", "services", "Service", True, has_status=True),
    ResourceType("", "v1", "secrets", "Secret", True, extra_fields=(("type", _secret_type),)),
    ResourceType("", "v1", "configmaps", "ConfigMap", True),
    ResourceType("", "v1", "events", "Event", True),
    ResourceType("", "v1", "namespaces", "Namespace", False, has_status=True),
    ResourceType("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True),
)


class ApiError(Exception):
    """An error the API answers with a `kind: Status` body."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: JsonObject | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details = details
        self.retry_after = retry_after

    def status(self) -> JsonObject:
        body: JsonObject = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def expired(requested: int, oldest: int) -> ApiError:
    return ApiError(410, "Expired", f"too old resource version: {requested} ({oldest})")


def _details(resource: ResourceType, name: str, causes: list[JsonObject] | None = None) -> JsonObject:
    details: JsonObject = {"name": name, "group": resource.group, "kind": resource.plural}
    if causes:
        details["causes"] = causes
    return details


def not_found(resource: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{resource.qualified_name} "{name}" not found', _details(resource, name))


def invalid(resource: ResourceType, name: str, causes: list[tuple[str, str, str]]) -> ApiError:
    """causes: (field, reason, message) as the real validation reports them."""
    summary = ", ".join(f"{field_path}: {message}" for field_path, _, message in causes)
    return ApiError(
        422,
        "Invalid",
        f'{resource.kind}{"." + resource.group if resource.group else ""} "{name}" is invalid: {summary}',
        _details(resource, name, [{"reason": r, "message": m, "field": f} for f, r, m in causes]),
    )


@dataclass(frozen=True)
class WatchEvent:
    resource_version: int
    resource: ResourceType
    type: str  # ADDED, MODIFIED, DELETED
    object: JsonObject
    previous: JsonObject | None  # the object before this event (None for ADDED)


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _body_without(obj: JsonObject, *keys: str) -> JsonObject:
    return {key: value for key, value in obj.items() if key not in keys}


@dataclass
class Selection:
    """Which objects a LIST or WATCH asks for."""

    resource: ResourceType
    namespace: str | None
    label_selector: str | None = None
    field_selector: str | None = None
    _label_predicate: Callable[..., bool] = field(init=False, repr=False)
    _field_predicate: Callable[..., bool] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self._label_predicate = parse_label_selector(self.label_selector)
            self._field_predicate = parse_field_selector(self.field_selector, self.resource.field_getters)
        except SelectorError as error:
            raise ApiError(400, "BadRequest", str(error)) from error

    def matches(self, obj: JsonObject | None) -> bool:
        if obj is None:
            return False
        metadata = obj.get("metadata", {})
        if self.namespace is not None and metadata.get("namespace") != self.namespace:
            return False
        return self._label_predicate(metadata.get("labels") or {}) and self._field_predicate(obj)


class Store:
    def __init__(self, *, allow_loopback: bool, history_limit: int) -> None:
        self.allow_loopback = allow_loopback
        self.resource_version = 1
        self.objects: dict[str, dict[tuple[str, str], JsonObject]] = {r.plural: {} for r in RESOURCES}
        self.history: deque[WatchEvent] = deque(maxlen=history_limit)
        self.compacted_through = 1  # watches may start from any version >= this
        self.subscribers: set[Callable[[WatchEvent], None]] = set()
        self._cluster_ips = (f"10.96.{n // 250}.{n % 250 + 2}" for n in itertools.count(8))

    # -- reading ----------------------------------------------------------------------------

    def list(self, selection: Selection) -> list[JsonObject]:
        objects = self.objects[selection.resource.plural]
        return [objects[key] for key in sorted(objects) if selection.matches(objects[key])]

    def list_at(self, selection: Selection, resource_version: int) -> list[JsonObject]:
        """The state at an older version, rebuilt by undoing history (resourceVersionMatch=Exact)."""
        if resource_version < self.compacted_through:
            raise expired(resource_version, self.compacted_through)
        state = dict(self.objects[selection.resource.plural])
        for event in reversed(self.history):
            if event.resource_version <= resource_version:
                break
            if event.resource is not selection.resource:
                continue
            key = (_metadata_namespace(event.object), _metadata_name(event.object))
            if event.previous is None:
                state.pop(key, None)
            else:
                state[key] = event.previous
        return [state[key] for key in sorted(state) if selection.matches(state[key])]

    def get(self, resource: ResourceType, namespace: str, name: str) -> JsonObject:
        try:
            return self.objects[resource.plural][(namespace, name)]
        except KeyError:
            raise not_found(resource, name) from None

    def events_since(self, resource_version: int) -> list[WatchEvent]:
        if resource_version < self.compacted_through:
            raise expired(resource_version, self.compacted_through)
        return [event for event in self.history if event.resource_version > resource_version]

    # -- writing ----------------------------------------------------------------------------

    def _commit(self, resource: ResourceType, event_type: str, obj: JsonObject, previous: JsonObject | None) -> JsonObject:
        self.resource_version += 1
        obj["metadata"]["resourceVersion"] = str(self.resource_version)
        key = (_metadata_namespace(obj), _metadata_name(obj))
        if event_type == "DELETED":
            del self.objects[resource.plural][key]
        else:
            self.objects[resource.plural][key] = obj
        if len(self.history) == self.history.maxlen:
            self.compacted_through = self.history[0].resource_version
        event = WatchEvent(self.resource_version, resource, event_type, obj, previous)
        self.history.append(event)
        for subscriber in list(self.subscribers):
            subscriber(event)
        return obj

    def compact(self) -> None:
        """Forget all history: every watch or exact list from an older version now gets 410."""
        self.history.clear()
        self.compacted_through = self.resource_version

    def create(self, resource: ResourceType, namespace: str, body: JsonObject) -> JsonObject:
        obj = copy.deepcopy(body)
        metadata = obj.setdefault("metadata", {})
        if not metadata.get("name") and metadata.get("generateName"):
            metadata["name"] = metadata["generateName"] + uuid.uuid4().hex[:5]
        name = metadata.get("name") or ""
        self._check_namespace(resource, namespace, metadata, name)
        if (namespace, name) in self.objects[resource.plural]:
            raise ApiError(
                409, "AlreadyExists", f'{resource.qualified_name} "{name}" already exists', _details(resource, name)
            )
        obj["kind"], obj["apiVersion"] = resource.kind, resource.api_version
        if resource.namespaced:
            metadata["namespace"] = namespace
        for server_field in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            metadata.pop(server_field, None)
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = _now()
        metadata["generation"] = 1
        if resource.has_status:
            obj["status"] = {}
        self._default(resource, obj, None)
        self._validate(resource, obj, None)
        return self._commit(resource, "ADDED", obj, None)

    def update(
        self, resource: ResourceType, namespace: str, name: str, body: JsonObject, subresource: str | None
    ) -> JsonObject:
        current = self.get(resource, namespace, name)
        obj = copy.deepcopy(body)
        metadata = obj.setdefault("metadata", {})
        self._check_namespace(resource, namespace, metadata, name)
        if metadata.get("name") != name:
            raise ApiError(
                400, "BadRequest", f"the name of the object ({metadata.get('name')}) does not match the name on the URL ({name})"
            )
        requested_version = metadata.get("resourceVersion")
        if requested_version and requested_version != current["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {resource.qualified_name} "{name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
                _details(resource, name),
            )
        if subresource == "status":
            obj = {**copy.deepcopy(current), "status": obj.get("status", {})}
        else:
            if resource.has_status:
                obj["status"] = copy.deepcopy(current.get("status", {}))
            server_metadata = {
                key: current["metadata"][key]
                for key in ("uid", "creationTimestamp", "generation", "deletionTimestamp", "deletionGracePeriodSeconds")
                if key in current["metadata"]
            }
            obj["metadata"] = {**metadata, **server_metadata}
            obj["kind"], obj["apiVersion"] = resource.kind, resource.api_version
            if resource.namespaced:
                obj["metadata"]["namespace"] = namespace
            self._default(resource, obj, current)
            if _body_without(obj, "metadata", "status") != _body_without(current, "metadata", "status"):
                obj["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        self._validate(resource, obj, current)
        if obj["metadata"].get("deletionTimestamp") and not obj["metadata"].get("finalizers"):
            return self._commit(resource, "DELETED", obj, current)
        return self._commit(resource, "MODIFIED", obj, current)

    def delete(self, resource: ResourceType, namespace: str, name: str) -> tuple[JsonObject, bool]:
        """Returns the object and whether it is gone (False: finalizers keep it, now terminating)."""
        current = self.get(resource, namespace, name)
        if current["metadata"].get("finalizers"):
            if current["metadata"].get("deletionTimestamp"):
                return current, False
            obj = copy.deepcopy(current)
            obj["metadata"]["deletionTimestamp"] = _now()
            obj["metadata"]["deletionGracePeriodSeconds"] = 0
            return self._commit(resource, "MODIFIED", obj, current), False
        return self._commit(resource, "DELETED", copy.deepcopy(current), current), True

    # -- defaults and validation ------------------------------------------------------------

    def _check_namespace(self, resource: ResourceType, namespace: str, metadata: JsonObject, name: str) -> None:
        body_namespace = metadata.get("namespace")
        if resource.namespaced and body_namespace and body_namespace != namespace:
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        if not name:
            raise invalid(resource, name, [("metadata.name", "FieldValueRequired", "Required value: name or generateName is required")])
        if not _DNS_SUBDOMAIN.match(name) or len(name) > 253:
            raise invalid(
                resource,
                name,
                [(
                    "metadata.name",
                    "FieldValueInvalid",
                    f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric '
                    "characters, '-' or '.', and must start and end with an alphanumeric character",
                )],
            )

    def _default(self, resource: ResourceType, obj: JsonObject, current: JsonObject | None) -> None:
        if resource.kind == "Service":
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            spec.setdefault("sessionAffinity", "None")
            for port in spec.get("ports") or []:
                port.setdefault("protocol", "TCP")
                port.setdefault("targetPort", port.get("port"))
            if spec["type"] != "ExternalName":
                if current is not None and "clusterIP" not in spec:
                    spec["clusterIP"] = current.get("spec", {}).get("clusterIP")
                if not spec.get("clusterIP"):
                    spec["clusterIP"] = next(self._cluster_ips)
                spec.setdefault("clusterIPs", [spec["clusterIP"]])
        elif resource.kind == "Secret":
            obj.setdefault("type", "Opaque")
        elif resource.kind == "EndpointSlice":
            for port in obj.get("ports") or []:
                port.setdefault("protocol", "TCP")

    def _validate(self, resource: ResourceType, obj: JsonObject, current: JsonObject | None) -> None:
        causes: list[tuple[str, str, str]] = []
        name = _metadata_name(obj)
        if resource.kind == "EndpointSlice":
            causes += self._endpoint_slice_causes(obj)
        elif resource.kind == "Secret":
            if current is not None and current.get("type") != obj.get("type"):
                causes.append(("type", "FieldValueInvalid", f'Invalid value: "{obj.get("type")}": field is immutable'))
            if obj.get("type") == "kubernetes.io/tls":
                for key in ("tls.crt", "tls.key"):
                    if key not in (obj.get("data") or {}) and key not in (obj.get("stringData") or {}):
                        causes.append((f"data[{key}]", "FieldValueRequired", "Required value"))
        elif resource.kind == "Service" and current is not None:
            old_ip, new_ip = current.get("spec", {}).get("clusterIP"), obj.get("spec", {}).get("clusterIP")
            if old_ip and new_ip != old_ip:
                causes.append(("spec.clusterIP", "FieldValueInvalid", f'Invalid value: "{new_ip}": field is immutable'))
        elif resource.kind == "Ingress":
            causes += _ingress_causes(obj)
        if causes:
            raise invalid(resource, name, causes)

    def _endpoint_slice_causes(self, obj: JsonObject) -> list[tuple[str, str, str]]:
        causes: list[tuple[str, str, str]] = []
        address_type = obj.get("addressType")
        if address_type not in ("IPv4", "IPv6", "FQDN"):
            causes.append(("addressType", "FieldValueNotSupported", f'Unsupported value: "{address_type}"'))
            return causes
        for i, endpoint in enumerate(obj.get("endpoints") or []):
            addresses = endpoint.get("addresses") or []
            if not addresses:
                causes.append((f"endpoints[{i}].addresses", "FieldValueRequired", "Required value: must contain at least 1 address"))
            for j, address in enumerate(addresses):
                where = f"endpoints[{i}].addresses[{j}]"
                if address_type == "FQDN":
                    continue
                try:
                    ip = ipaddress.ip_address(address)
                except ValueError:
                    causes.append((where, "FieldValueInvalid", f'Invalid value: "{address}": must be a valid IP address'))
                    continue
                if (ip.version == 4) != (address_type == "IPv4"):
                    causes.append((where, "FieldValueInvalid", f'Invalid value: "{address}": must be an {address_type} address'))
                elif ip.is_loopback and not self.allow_loopback:
                    causes.append(
                        (where, "FieldValueInvalid", f'Invalid value: "{address}": may not be in the loopback range (127.0.0.0/8, ::1/128)')
                    )
        return causes


def _ingress_causes(obj: JsonObject) -> list[tuple[str, str, str]]:
    causes: list[tuple[str, str, str]] = []

    def check_backend(where: str, backend: JsonObject) -> None:
        service, resource = backend.get("service"), backend.get("resource")
        if bool(service) == bool(resource):
            causes.append((where, "FieldValueInvalid", "Invalid value: cannot set both service and resource backends"
                           if service else "Required value: one of service or resource backend must be set"))
            return
        if service:
            port = service.get("port") or {}
            if ("number" in port) == ("name" in port):
                causes.append((f"{where}.service.port", "FieldValueInvalid", "Invalid value: cannot set both port name & port number"
                               if port else "Required value: port name or number is required"))

    spec = obj.get("spec") or {}
    if spec.get("defaultBackend"):
        check_backend("spec.defaultBackend", spec["defaultBackend"])
    for i, rule in enumerate(spec.get("rules") or []):
        for j, path in enumerate((rule.get("http") or {}).get("paths") or []):
            where = f"spec.rules[{i}].http.paths[{j}]"
            path_type = path.get("pathType")
            if path_type not in ("Exact", "Prefix", "ImplementationSpecific"):
                causes.append((f"{where}.pathType", "FieldValueRequired" if path_type is None else "FieldValueNotSupported",
                               "Required value: pathType must be specified" if path_type is None
                               else f'Unsupported value: "{path_type}"'))
            value = path.get("path", "")
            if path_type in ("Exact", "Prefix") and not value.startswith("/"):
                causes.append((f"{where}.path", "FieldValueInvalid", f'Invalid value: "{value}": must be an absolute path'))
            check_backend(f"{where}.backend", path.get("backend") or {})
    return causes
