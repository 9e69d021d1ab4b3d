"""The API objects a translation reads: metadata accessors, the live-object index (Services,
Secrets, EndpointSlices, the ConfigMap) and the refusal every part of the translation raises.

Part of `ingress_watch.translate` (its theory of operation states the rules); pure, no I/O."""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from dataclasses import dataclass

from config.model import Address, Backend
from ingress_watch.snapshot import Snapshot

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class Rejected(Exception):
    """One object or field cannot be used; the message says why and how to fix it."""


# What reading an object of the wrong shape raises (a list where a mapping belongs, a port that is
# not a number). The API server validates shapes, so this only guards against objects from a
# source that does not, such as a fake server: such an Ingress becomes a problem, not a crash.
MALFORMED = (AttributeError, TypeError, ValueError, KeyError, IndexError)


def object_metadata(obj: dict) -> dict:
    return obj.get("metadata") or {}


def object_namespace(obj: dict) -> str:
    return object_metadata(obj).get("namespace") or ""


def object_name(obj: dict) -> str:
    return object_metadata(obj).get("name") or ""


def object_ref(obj: dict) -> str:
    return f"{object_namespace(obj)}/{object_name(obj)}"


def is_live(obj: dict) -> bool:
    return not object_metadata(obj).get("deletionTimestamp")


def age_order(obj: dict) -> tuple[bool, str, str, str]:
    """Oldest first; an object without a creationTimestamp counts as the youngest."""
    created = object_metadata(obj).get("creationTimestamp")
    return (created is None, created or "", object_namespace(obj), object_name(obj))


@dataclass(frozen=True)
class ServiceReference:
    namespace: str
    service: str
    port: int | str  # Service port number or name, as the Ingress wrote it

    @property
    def backend_name(self) -> str:
        return f"{self.namespace}/{self.service}:{self.port}"

    @classmethod
    def parse(cls, backend_name: str) -> ServiceReference | None:
        """Inverse of `backend_name`: namespaces, Service names and port names hold no '/' or ':'."""
        namespace, slash, rest = backend_name.partition("/")
        service, colon, port = rest.partition(":")
        if not (slash and colon and namespace and service and port):
            return None
        return cls(namespace, service, int(port) if port.isdigit() else port)


class ObjectIndex:
    """Live objects looked up by what the translation asks for."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.services = {(object_namespace(s), object_name(s)): s for s in snapshot.services if is_live(s)}
        self.secrets = {(object_namespace(s), object_name(s)): s for s in snapshot.secrets if is_live(s)}
        self.slices: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for endpoint_slice in snapshot.endpoint_slices:
            service = (object_metadata(endpoint_slice).get("labels") or {}).get(SERVICE_NAME_LABEL)
            if service and is_live(endpoint_slice):
                self.slices[(object_namespace(endpoint_slice), service)].append(endpoint_slice)
        self.configmap = snapshot.configmap if snapshot.configmap is not None and is_live(snapshot.configmap) else None
        self._named_configmaps = {(object_namespace(c), object_name(c)): c for c in snapshot.named_configmaps if is_live(c)}
        self.named_configmaps: set[tuple[str, str]] = set()  # every ConfigMap of headers looked up, found or not
        self._endpoints: dict[ServiceReference, tuple[Address, ...] | str] = {}  # str: why not; few Services, many paths

    def named_configmap(self, reference: tuple[str, str]) -> dict | None:
        """A ConfigMap of headers (ingress_watch.header_configmaps); the lookup is remembered."""
        self.named_configmaps.add(reference)
        return self._named_configmaps.get(reference)

    def resolve_backend(self, namespace: str, backend_spec: dict) -> Backend:
        if backend_spec.get("resource") is not None:
            kind = (backend_spec["resource"] or {}).get("kind", "?")
            raise Rejected(f"resource backends ({kind}) are not supported; use backend.service")
        service = backend_spec.get("service")
        if not service or not service.get("name"):
            raise Rejected("backend has no service.name; name a Service and its port")
        port = service.get("port") or {}
        if port.get("number") is not None:
            port_key: int | str = port_number(port["number"])
        elif port.get("name"):
            port_key = str(port["name"])
        else:
            raise Rejected(f"backend service {service['name']} has no port.number or port.name; add one")
        reference = ServiceReference(namespace, service["name"], port_key)
        return Backend(reference.backend_name, self.endpoints(reference))

    def app_protocol(self, reference: ServiceReference) -> str | None:
        """The Service port's `appProtocol` (after `endpoints` accepted the reference)."""
        service = self.services.get((reference.namespace, reference.service)) or {}
        field_name = "port" if isinstance(reference.port, int) else "name"
        for port in (service.get("spec") or {}).get("ports") or ():
            if port.get(field_name) == reference.port:
                return port.get("appProtocol")
        return None

    def endpoints(self, reference: ServiceReference) -> tuple[Address, ...]:
        if reference not in self._endpoints:
            try:
                self._endpoints[reference] = self._read_endpoints(reference)
            except Rejected as rejected:
                self._endpoints[reference] = str(rejected)
        found = self._endpoints[reference]
        if isinstance(found, str):
            raise Rejected(found)
        return found

    def _read_endpoints(self, reference: ServiceReference) -> tuple[Address, ...]:
        service_ref = f"{reference.namespace}/{reference.service}"
        service = self.services.get((reference.namespace, reference.service))
        if service is None:
            raise Rejected(f"Service {service_ref} not found; create it or fix backend.service.name")
        spec = service.get("spec") or {}
        if spec.get("type") == "ExternalName":
            raise Rejected(
                f"Service {service_ref} is of type ExternalName, which is not supported; use a Service with endpoints"
            )
        ports = spec.get("ports") or ()
        field_name = "port" if isinstance(reference.port, int) else "name"
        service_port = next((port for port in ports if port.get(field_name) == reference.port), None)
        if service_port is None:
            known = ", ".join(f"{port.get('name') or '(unnamed)'}={port.get('port')}" for port in ports) or "none"
            wanted = reference.port if field_name == "port" else f"named {reference.port!r}"
            raise Rejected(
                f"Service {service_ref} has no port {wanted} (its ports: {known}); "
                "fix backend.service.port"
            )
        port_name = service_port.get("name") or ""
        found: set[tuple[int, int, int, str]] = set()  # (IP version, IP as int, port, text) sorts numerically
        for endpoint_slice in self.slices.get((reference.namespace, reference.service), ()):
            if endpoint_slice.get("addressType") not in ("IPv4", "IPv6"):
                continue
            slice_ports = endpoint_slice.get("ports") or ()
            target = next((port.get("port") for port in slice_ports if (port.get("name") or "") == port_name), None)
            try:
                target_port = port_number(target)
            except Rejected:
                continue  # no port of that name here, or a null port (Kubernetes: "all ports"), useless to us
            for endpoint in endpoint_slice.get("endpoints") or ():
                if (endpoint.get("conditions") or {}).get("ready") is False or not endpoint.get("addresses"):
                    continue
                try:
                    ip = ipaddress.ip_address(endpoint["addresses"][0])
                except ValueError:
                    continue  # the API server validates addresses; skip what it would have refused
                found.add((ip.version, int(ip), target_port, str(ip)))
        return tuple(Address(text, port) for _, _, port, text in sorted(found))


def port_number(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
        raise Rejected(f"port {value!r} is not a number")
    return int(value)


def parse_bool(raw: str) -> bool:
    value = str(raw).strip().lower()
    if value not in ("true", "false"):
        raise Rejected(f"{raw!r} is not a boolean; use \"true\" or \"false\"")
    return value == "true"
