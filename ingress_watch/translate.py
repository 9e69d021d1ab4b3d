"""Kubernetes objects → the routing model, as a pure function of a `Snapshot`.

Theory of operation
-------------------
`translate(snapshot, options)` reads raw API objects and returns a `Configuration` plus the
problems it met, as data. It performs no I/O and reads no clock; everything it emits is sorted,
so the same objects in any order give an identical result and the watch loop can skip publishing
when nothing changed. One bad Ingress, Secret or ConfigMap key becomes a `Problem` naming the
object and the fix; the part it spoils is left out and everything else is still served.

The rules (shared/NOTES.md §4), in the order they are applied:

- Liveness: objects carrying `metadata.deletionTimestamp` are ignored, whatever their kind.
- Class: an Ingress is ours when `spec.ingressClassName` names an IngressClass whose
  `spec.controller` is `options.controller_class`; else when the legacy
  `kubernetes.io/ingress.class` annotation equals `options.ingress_class`; else (no class at
  all) when one of our IngressClasses is annotated `ingressclass.kubernetes.io/is-default-class:
  "true"` or `options.watch_ingress_without_class` is set. `options.watch_namespace` restricts
  Ingresses to one namespace.
- Age: Ingresses are processed oldest first (`creationTimestamp`, then namespace/name); on any
  conflict the older one wins and the younger gets a Problem.
- Hosts: lower-cased; precise, `*.one-label` wildcard, or empty (= any host), checked by
  `config.tls_material.parse_host_pattern` like routes-file hosts (the API server's own rules
  already exclude ports and trailing dots). A rule with a host but no `http` produces nothing.
- Paths: an empty path means "/". Which rules are the same rule, and what a conflict is, is
  `config.route_rules`'s, shared with the routes file: Prefix and ImplementationSpecific with a
  trailing "/" ignored share one key, Exact has its own, a regex path (use-regex) is its own key.
  Two rules with one key and a different backend or policy conflict (the older Ingress wins); the
  same backend and policy twice is kept once. A path whose backend cannot be resolved is skipped
  before it claims its key, so a younger Ingress's valid rule for the same path is served rather
  than nothing. A canary Ingress claims no key: it attaches to the main rule (below).
- Annotations (`nginx.ingress.kubernetes.io/`, and `ingress.kubernetes.io/`): each supported key
  (SUPPORTED_ANNOTATIONS, beside the ConfigMap keys) fills the Ingress's `RoutePolicy`, checked by
  `config.route_policy` exactly as the routes file's `policy:` keys are; an unknown key or a
  refused value is a Problem. A refused source range, body size or regex leaves the Ingress's
  paths out (serving them open is the opposite of what was asked); other refused values drop just
  that key. ConfigMap `proxy-body-size` is every path's default limit. An Ingress with `canary:
  "true"` becomes the weighted alternative (`Canary`) of the main rule with the same match key,
  whatever their ages, attached after every main Ingress was read (the first canary of a rule,
  oldest first, wins); its other annotations are reported and ignored.
- Default backend: the oldest Ingress whose `spec.defaultBackend` resolves wins.
- Backends are named "namespace/service:port" (port as written: number or name), which
  `resolve_endpoints` parses back. Endpoints come from EndpointSlices labelled
  `kubernetes.io/service-name`: the slice port whose name equals the Service port's name (both
  unnamed counts as equal), the first address of each endpoint (Kubernetes treats the others as
  fungible), endpoints with `conditions.ready: false` skipped (absent = ready), FQDN slices
  ignored. The ClusterIP is never used. A Service with no ready endpoints still yields its
  backend with `endpoints=()`, so the data plane answers 503 rather than 404. A missing Service
  or port, an ExternalName Service or a `resource` backend is a problem and that path is skipped.
- TLS: one Certificate per Secret (`origin="Secret ns/name"`), hosts merged over every Ingress
  that references it. When `spec.tls[].hosts` is empty the certificate's DNS SANs that are valid
  host patterns are used: they are the only names it can prove, so serving it for any other name
  would fail verification. A host claimed by two different Secrets stays with the older
  Ingress's Secret. A Secret is used only if it is `kubernetes.io/tls`, both keys decode, tls.crt
  parses, tls.key (PKCS#1, SEC1 or PKCS#8, unencrypted) parses and matches the first certificate
  (the checks of `config.tls_material`, shared with the routes file); else the Ingress gets a problem
  "Secret ns/name: ..." and its routes are still served (with the default certificate). Parsing
  is memoized by content: OpenSSL 3 spends ~36 ms checking each RSA-2048 key. A tls entry with
  no secretName is left to the default certificate, as the Ingress API specifies.
  An HSM-backed key: tls.key may hold a `pkcs11:` URI instead (bare, or in pkcs11-provider's
  `PKCS#11 PROVIDER URI` PEM block); it becomes a `StoreKey` that the data plane opens through
  the providers of the ConfigMap (`ssl-provider`), and the private key never leaves the token.
  Whether it pairs with tls.crt is only known once the token is asked: a mismatch is a problem
  when the contexts are built ("certificate left out"), not here. The PIN is no Secret key: give
  pkcs11-provider `pkcs11-module-token-pin=file:<mounted Secret>` in `ssl-provider-parameters`.
- `ssl-redirect` (ConfigMap, default false, overridden by the per-Ingress annotation
  `ingress.kubernetes.io/ssl-redirect` of the oldest Ingress routing that host) only redirects
  virtual hosts that some certificate covers: redirecting to HTTPS a host served only by the
  default (possibly self-signed) certificate would lock clients out. The catch-all host "" never
  redirects for the same reason. `force-ssl-redirect` redirects without that check (TLS terminated
  in front of us); `nginx.ingress.kubernetes.io/ssl-redirect` is read like the legacy key.
- ConfigMap keys use haproxy-ingress spelling; durations are HAProxy-style integers with a unit
  (us, ms, s, m, h, d) and, as in HAProxy, a bare number means milliseconds. A bad value is a
  problem and keeps the default; an unknown key is a problem (typos would otherwise go unseen).
  HSTS is on only with `hsts: "true"`. The TLS policy keys take ingress-nginx's spelling and
  syntax (`ssl-ciphers`, `ssl-ciphersuites`, `ssl-protocols: "TLSv1.2 TLSv1.3"`, `ssl-ecdh-curve`,
  where "auto" means the default) and are checked by `config.tls_policy` like the routes file's;
  a key with a bad value is a problem and keeps the default for that key. `use-http2: "false"`
  offers only http/1.1 in ALPN. Providers: `ssl-provider` lists names in order (HAProxy's
  `ssl-provider`, one key for all), `ssl-provider-path` (HAProxy's) and `ssl-propquery` (HAProxy's
  `ssl-propquery`) as written, `ssl-provider-parameters` one `<provider> <parameter>=<value>` a line,
  `ssl-provider-optional` the providers whose failure to load is a warning (software fallback)
  rather than a stop.
- Backend protocol (issue 12), per Ingress by annotation, else per Service port by
  `appProtocol` (`https`, `kubernetes.io/h2c`), else HTTP: ingress-nginx's `backend-protocol:
  HTTPS | GRPC | GRPCS | H2C` (GRPC and H2C are HTTP/2 over TCP, GRPCS over TLS) with
  `proxy-ssl-secret` (a Secret of the Ingress's own namespace, Opaque or kubernetes.io/tls,
  holding `ca.crt` and optionally a client `tls.crt`/`tls.key`), `proxy-ssl-verify`,
  `proxy-ssl-name`, `proxy-ssl-server-name`; haproxy-ingress's `backend-protocol: h1 | h1-ssl |
  h2 | h2-ssl`,
  `secure-backends: "true"` and `secure-verify-ca-secret` (with either annotation prefix). A CA
  turns verification on unless `proxy-ssl-verify: "off"`; the name verified (and sent as SNI
  unless `proxy-ssl-server-name: "off"`) is `proxy-ssl-name`, else `<service>.<namespace>.svc`,
  the name in-cluster certificates carry. A Secret that cannot be used makes the path a problem
  and skips it: a backend the user declared TLS never gets plaintext or an unverified connection.
  Two Ingresses reaching one Service port over different protocols: the older one wins.
- Shapes: the API server validates objects, so a list where a mapping belongs cannot come from
  it; should one arrive anyway (a lax fake, a hand-made snapshot) that Ingress gets a problem
  and the translation goes on.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from config.crypto import ALGORITHM_FLAGS, split_pin
from config.model import (
    Address,
    Affinity,
    Backend,
    BackendProtocol,
    Canary,
    Certificate,
    ClientCertificate,
    Configuration,
    Cors,
    CryptoSettings,
    EngineSettings,
    HeaderEdits,
    Hsts,
    IpNetwork,
    PathRule,
    KeySource,
    PemKey,
    Problem,
    ProviderSettings,
    RealIp,
    Redirect,
    RoutePolicy,
    RouteTable,
    StoreKey,
    Timeouts,
    TlsPolicy,
    UpstreamTls,
)
from config.route_policy import (
    PolicyValueError,
    check_path_value,
    check_redirect_code,
    check_redirect_location,
    check_regex,
    check_rewrite_target,
    parse_networks,
    check_cookie_name,
    check_cors_origins,
    check_header_edit,
    check_host_value,
    check_max_age,
    check_percent,
    check_positive,
    check_token_list,
    header_edits,
    parse_header_lines,
    parse_size,
    parse_timeout,
    split_list,
)
from config.route_rules import HostTable, RuleError, check_path, parse_path_type
from config.tls_policy import PolicyError, check_ciphers, check_ciphersuites, check_curves, check_protocols
from config.tls_material import (
    CertificateParseError,
    EncryptedKeyError,
    HostPatternError,
    KeyParseError,
    KeyUriError,
    NoCertificateError,
    is_dns_name,
    key_matches_certificate,
    key_uri_in,
    parse_certificate_chain,
    parse_host_pattern,
    parse_private_key,
    san_host_patterns,
)
from ingress_watch.snapshot import Snapshot

INGRESS_CLASS_ANNOTATION = "kubernetes.io/ingress.class"
DEFAULT_CLASS_ANNOTATION = "ingressclass.kubernetes.io/is-default-class"
SSL_REDIRECT_ANNOTATION = "ingress.kubernetes.io/ssl-redirect"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TLS_SECRET_TYPE = "kubernetes.io/tls"

DURATION_MICROSECONDS = {"us": 1, "ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
DURATION = re.compile(r"(\d+)(us|ms|s|m|h|d)?")


@dataclass(frozen=True)
class TranslateOptions:
    ingress_class: str = "ingress-proxy"
    controller_class: str = "ingress-proxy.dev/controller"
    watch_ingress_without_class: bool = False
    watch_namespace: str | None = None
    default_ssl_certificate: tuple[str, str] | None = None  # (namespace, name) of a TLS Secret


@dataclass(frozen=True)
class Translation:
    configuration: Configuration
    problems: tuple[Problem, ...]  # location: "Ingress ns/name", "Secret ns/name", "ConfigMap ns/name"
    claimed_ingresses: tuple[tuple[str, str], ...]  # (namespace, name) of Ingresses of our class, sorted


class _Rejected(Exception):
    """One object or field cannot be used; the message says why and how to fix it."""


# What reading an object of the wrong shape raises (a list where a mapping belongs, a port that is
# not a number). The API server validates shapes, so this only guards against objects from a
# source that does not, such as a fake server: such an Ingress becomes a problem, not a crash.
MALFORMED = (AttributeError, TypeError, ValueError, KeyError, IndexError)


def translate(snapshot: Snapshot, options: TranslateOptions) -> Translation:
    _PARSED_SECRETS.start_translation()
    index = _ObjectIndex(snapshot)
    problems: list[Problem] = []
    settings = _read_configmap(index.configmap, problems)
    ingresses = _claimed_ingresses(snapshot, options)
    routes = _RouteCollector(index, problems, settings.default_policy)
    certificates = _CertificateCollector(index, problems)
    for ingress in ingresses:
        try:
            routes.add(ingress)
            for tls_number, tls in enumerate((ingress.get("spec") or {}).get("tls") or ()):
                certificates.add(ingress, tls_number, tls)
        except MALFORMED as error:
            problems.append(Problem(f"Ingress {_ref(ingress)}", (
                f"malformed ({type(error).__name__}: {error}); what came before the error is used; "
                "fix the object to match networking.k8s.io/v1"
            )))
    issued = certificates.result()
    configuration = Configuration(
        routes=routes.result(issued, settings.ssl_redirect),
        certificates=issued,
        default_certificate=_default_certificate(index, options, problems),
        crypto=settings.crypto,
        timeouts=settings.timeouts,
        hsts=settings.hsts,
        tls_policy=settings.tls_policy,
        real_ip=settings.real_ip,
    )
    return Translation(
        configuration=configuration,
        problems=tuple(sorted(set(problems), key=lambda problem: (problem.location, problem.message))),
        claimed_ingresses=tuple(sorted((_namespace(ingress), _name(ingress)) for ingress in ingresses)),
    )


def resolve_endpoints(snapshot: Snapshot, backends: tuple[Backend, ...]) -> tuple[Backend, ...]:
    """The same backends, in the same order, with endpoints re-read from `snapshot`.

    The fast path for EndpointSlice changes: routes and certificates stay as they are. A backend
    whose Service or port has gone gets `endpoints=()` (503) until the next full translation
    reports why; a name this module did not produce is returned unchanged.
    """
    index = _ObjectIndex(snapshot)
    resolved = []
    for backend in backends:
        reference = _ServiceReference.parse(backend.name)
        if reference is None:
            resolved.append(backend)
            continue
        try:
            endpoints = index.endpoints(reference)
        except (_Rejected, *MALFORMED):
            endpoints = ()
        resolved.append(dataclasses.replace(backend, endpoints=endpoints))
    return tuple(resolved)


# --- objects ---------------------------------------------------------------------------------


def _metadata(obj: dict) -> dict:
    return obj.get("metadata") or {}


def _namespace(obj: dict) -> str:
    return _metadata(obj).get("namespace") or ""


def _name(obj: dict) -> str:
    return _metadata(obj).get("name") or ""


def _ref(obj: dict) -> str:
    return f"{_namespace(obj)}/{_name(obj)}"


def _live(obj: dict) -> bool:
    return not _metadata(obj).get("deletionTimestamp")


def _age(obj: dict) -> tuple[bool, str, str, str]:
    """Oldest first; an object without a creationTimestamp counts as the youngest."""
    created = _metadata(obj).get("creationTimestamp")
    return (created is None, created or "", _namespace(obj), _name(obj))


def _claimed_ingresses(snapshot: Snapshot, options: TranslateOptions) -> list[dict]:
    our_classes = {
        _name(ingress_class): ingress_class
        for ingress_class in snapshot.ingress_classes
        if _live(ingress_class) and (ingress_class.get("spec") or {}).get("controller") == options.controller_class
    }
    default_class_is_ours = any(
        (_metadata(ingress_class).get("annotations") or {}).get(DEFAULT_CLASS_ANNOTATION) == "true"
        for ingress_class in our_classes.values()
    )

    def is_ours(ingress: dict) -> bool:
        if not _live(ingress):
            return False
        if options.watch_namespace is not None and _namespace(ingress) != options.watch_namespace:
            return False
        class_name = (ingress.get("spec") or {}).get("ingressClassName")
        if class_name:
            return class_name in our_classes
        legacy_class = (_metadata(ingress).get("annotations") or {}).get(INGRESS_CLASS_ANNOTATION)
        if legacy_class:
            return legacy_class == options.ingress_class
        return default_class_is_ours or options.watch_ingress_without_class

    return sorted(filter(is_ours, snapshot.ingresses), key=_age)


@dataclass(frozen=True)
class _ServiceReference:
    namespace: str
    service: str
    port: int | str  # Service port number or name, as the Ingress wrote it

    @property
    def backend_name(self) -> str:
        return f"{self.namespace}/{self.service}:{self.port}"

    @classmethod
    def parse(cls, backend_name: str) -> _ServiceReference | None:
        """Inverse of `backend_name`: namespaces, Service names and port names hold no '/' or ':'."""
        namespace, slash, rest = backend_name.partition("/")
        service, colon, port = rest.partition(":")
        if not (slash and colon and namespace and service and port):
            return None
        return cls(namespace, service, int(port) if port.isdigit() else port)


class _ObjectIndex:
    """Live objects looked up by what the translation asks for."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.services = {(_namespace(s), _name(s)): s for s in snapshot.services if _live(s)}
        self.secrets = {(_namespace(s), _name(s)): s for s in snapshot.secrets if _live(s)}
        self.slices: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for endpoint_slice in snapshot.endpoint_slices:
            service = (_metadata(endpoint_slice).get("labels") or {}).get(SERVICE_NAME_LABEL)
            if service and _live(endpoint_slice):
                self.slices[(_namespace(endpoint_slice), service)].append(endpoint_slice)
        self.configmap = snapshot.configmap if snapshot.configmap is not None and _live(snapshot.configmap) else None
        self._endpoints: dict[_ServiceReference, tuple[Address, ...] | str] = {}  # str: why not; few Services, many paths

    def resolve_backend(self, namespace: str, backend_spec: dict) -> Backend:
        if backend_spec.get("resource") is not None:
            kind = (backend_spec["resource"] or {}).get("kind", "?")
            raise _Rejected(f"resource backends ({kind}) are not supported; use backend.service")
        service = backend_spec.get("service")
        if not service or not service.get("name"):
            raise _Rejected("backend has no service.name; name a Service and its port")
        port = service.get("port") or {}
        if port.get("number") is not None:
            port_key: int | str = _port_number(port["number"])
        elif port.get("name"):
            port_key = str(port["name"])
        else:
            raise _Rejected(f"backend service {service['name']} has no port.number or port.name; add one")
        reference = _ServiceReference(namespace, service["name"], port_key)
        return Backend(reference.backend_name, self.endpoints(reference))

    def app_protocol(self, reference: _ServiceReference) -> str | None:
        """The Service port's `appProtocol` (after `endpoints` accepted the reference)."""
        service = self.services.get((reference.namespace, reference.service)) or {}
        field_name = "port" if isinstance(reference.port, int) else "name"
        for port in (service.get("spec") or {}).get("ports") or ():
            if port.get(field_name) == reference.port:
                return port.get("appProtocol")
        return None

    def endpoints(self, reference: _ServiceReference) -> tuple[Address, ...]:
        if reference not in self._endpoints:
            try:
                self._endpoints[reference] = self._read_endpoints(reference)
            except _Rejected as rejected:
                self._endpoints[reference] = str(rejected)
        found = self._endpoints[reference]
        if isinstance(found, str):
            raise _Rejected(found)
        return found

    def _read_endpoints(self, reference: _ServiceReference) -> tuple[Address, ...]:
        service_ref = f"{reference.namespace}/{reference.service}"
        service = self.services.get((reference.namespace, reference.service))
        if service is None:
            raise _Rejected(f"Service {service_ref} not found; create it or fix backend.service.name")
        spec = service.get("spec") or {}
        if spec.get("type") == "ExternalName":
            raise _Rejected(
                f"Service {service_ref} is of type ExternalName, which is not supported; use a Service with endpoints"
            )
        ports = spec.get("ports") or ()
        field_name = "port" if isinstance(reference.port, int) else "name"
        service_port = next((port for port in ports if port.get(field_name) == reference.port), None)
        if service_port is None:
            known = ", ".join(f"{port.get('name') or '(unnamed)'}={port.get('port')}" for port in ports) or "none"
            wanted = reference.port if field_name == "port" else f"named {reference.port!r}"
            raise _Rejected(
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
                target_port = _port_number(target)
            except _Rejected:
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


def _port_number(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
        raise _Rejected(f"port {value!r} is not a number")
    return int(value)


def _host_problem(where: str, written_host: str, error: HostPatternError) -> str:
    if error.wildcard_fault:
        fault = "a wildcard must be the whole first label, like *.example.com"
        return f"{where}.host {written_host.lower()!r}: {fault}; rule skipped"
    return f"{where}.host: {error}; rule skipped"


class _RouteCollector:
    """Virtual hosts, the default backend and the backends they use, from Ingresses oldest first.

    Which rules are the same rule and who wins a conflict is `config.route_rules`'s, shared with
    the routes file; this class adds only the Kubernetes side (age order, problems per Ingress)."""

    def __init__(self, index: _ObjectIndex, problems: list[Problem], default_policy: RoutePolicy | None) -> None:
        self._index = index
        self._problems = problems
        self._default_policy = default_policy
        self._backends: dict[str, Backend] = {}
        self._table = HostTable()
        self._redirects: dict[str, _HostRedirect] = {}
        self._default_backend: str | None = None
        self._default_backend_owner = ""
        self._transport = _TransportAnnotations()  # of the Ingress being added
        self._ingress_ref = ""
        self._backend_owner: dict[str, str] = {}  # backend name → Ingress that set its protocol
        self._canaries: list[tuple[dict, Canary]] = []  # (Ingress, its canary with backend "")

    def add(self, ingress: dict) -> None:
        location = f"Ingress {_ref(ingress)}"
        spec = ingress.get("spec") or {}
        canary = _read_canary(ingress, location, self._problems)
        if canary is not None:
            self._canaries.append((ingress, canary))  # attached once every main rule is filed
            return
        if spec.get("defaultBackend") is not None:
            self._add_default_backend(ingress, spec["defaultBackend"], location)
        annotations = _read_annotations(ingress, location, self._problems, self._default_policy)
        self._transport = _transport_annotations(ingress, location, self._problems)
        self._ingress_ref = _ref(ingress)
        for rule_number, rule in enumerate(spec.get("rules") or ()):
            where = f"spec.rules[{rule_number}]"
            written_host = rule.get("host") or ""
            try:
                host = parse_host_pattern(written_host, allow_any=True)
            except HostPatternError as error:
                self._problems.append(Problem(location, _host_problem(where, written_host, error)))
                continue
            http = rule.get("http")
            if not http:
                continue
            redirect = self._redirects.setdefault(host, _HostRedirect())
            redirect.note(annotations, _ref(ingress), host, location, self._problems)
            for path_number, path_spec in enumerate(http.get("paths") or ()):
                path_where = f"{where}.http.paths[{path_number}]"
                try:
                    path_rule = self._path_rule(_namespace(ingress), path_spec, annotations)
                except _Rejected as rejected:
                    self._problems.append(Problem(location, f"{path_where}: {rejected}"))
                    continue
                conflict = self._table.add(host, path_rule, f"Ingress {_ref(ingress)}")
                if conflict is not None:
                    self._problems.append(Problem(location, (
                        f"{path_where}: {conflict.describe(host)}, which wins (older or listed first); "
                        "change the path or remove one"
                    )))

    def _attach_canaries(self) -> None:
        """Each canary Ingress's paths become the alternative of the main rule they match."""
        for ingress, canary in self._canaries:
            location = f"Ingress {_ref(ingress)}"
            self._transport = _transport_annotations(ingress, location, self._problems)  # its backend's protocol
            self._ingress_ref = _ref(ingress)
            for rule_number, rule in enumerate((ingress.get("spec") or {}).get("rules") or ()):
                try:
                    host = parse_host_pattern(rule.get("host") or "", allow_any=True)
                except HostPatternError as error:
                    self._problems.append(Problem(location, _host_problem(f"spec.rules[{rule_number}]", rule.get("host") or "", error)))
                    continue
                for path_number, path_spec in enumerate((rule.get("http") or {}).get("paths") or ()):
                    where = f"spec.rules[{rule_number}].http.paths[{path_number}]"
                    try:
                        path_rule = self._path_rule(_namespace(ingress), path_spec, _IngressAnnotations())
                    except _Rejected as rejected:
                        self._problems.append(Problem(location, f"{where}: {rejected}"))
                        continue
                    main = self._table.find(host, path_rule)
                    if main is None:
                        self._problems.append(Problem(location, (
                            f"{where}: canary for path {path_rule.path!r} on host {host or '*'!r}, which no other Ingress "
                            "routes; ignored (create the main Ingress first)"
                        )))
                        continue
                    if main.policy is not None and main.policy.canary is not None:
                        self._problems.append(Problem(location, (
                            f"{where}: path {path_rule.path!r} on host {host or '*'!r} already has the canary "
                            f"{main.policy.canary.backend}; ignored (keep one canary per path)"
                        )))
                        continue
                    attached = dataclasses.replace(canary, backend=path_rule.backend)
                    policy = dataclasses.replace(main.policy or RoutePolicy(), canary=attached)
                    self._table.replace(host, dataclasses.replace(main, policy=policy))

    def result(self, certificates: tuple[Certificate, ...], ssl_redirect: bool) -> RouteTable:
        self._attach_canaries()
        certificate_hosts = frozenset(host for certificate in certificates for host in certificate.hosts)
        redirects: dict[str, bool] = {}
        for host in self._table.hosts():
            if not self._table.rules(host):
                continue
            routes = self._redirects[host]
            covered = _covered_by_certificate(host, certificate_hosts)
            if routes.redirect and not covered and not routes.forced:
                self._problems.append(Problem(f"Ingress {routes.owner}", (
                    f"{SSL_REDIRECT_ANNOTATION} is true but no certificate covers host {host!r}; "
                    "add the host to spec.tls so it can be served over HTTPS "
                    f"(or set {NGINX_PREFIX}force-ssl-redirect to redirect anyway)"
                )))
            redirect = routes.redirect if routes.redirect is not None else ssl_redirect
            redirects[host] = bool(redirect and (covered or routes.forced))
        virtual_hosts = self._table.virtual_hosts(redirects)
        used = {rule.backend for virtual_host in virtual_hosts for rule in virtual_host.paths}
        used |= {  # a canary's backend is served too
            rule.policy.canary.backend
            for virtual_host in virtual_hosts for rule in virtual_host.paths
            if rule.policy is not None and rule.policy.canary is not None
        }  # fmt: skip
        if self._default_backend is not None:
            used.add(self._default_backend)
        return RouteTable(
            virtual_hosts=virtual_hosts,
            backends=tuple(self._backends[name] for name in sorted(used)),
            default_backend=self._default_backend,
        )

    def _add_default_backend(self, ingress: dict, backend_spec: dict, location: str) -> None:
        if self._default_backend is not None:
            self._problems.append(Problem(location, (
                f"spec.defaultBackend ignored: the older Ingress {self._default_backend_owner} already sets the "
                "default backend; remove one of them"
            )))
            return
        try:
            backend = self._backend(_namespace(ingress), _ref(ingress), backend_spec)
        except _Rejected as rejected:
            self._problems.append(Problem(location, f"spec.defaultBackend: {rejected}"))
            return
        self._default_backend, self._default_backend_owner = backend.name, _ref(ingress)

    def _backend(self, namespace: str, ingress: str, backend_spec: dict) -> Backend:
        """The resolved backend, with the protocol the Ingress (or the Service port) asks for."""
        plain = self._index.resolve_backend(namespace, backend_spec)
        reference = _ServiceReference.parse(plain.name)
        assert reference is not None, "resolve_backend names backends after their Service reference"
        backend = _with_transport(plain, reference, self._transport, self._index)
        if not backend.protocol.uses_tls and self._transport.tls_settings_given:
            self._problems.append(Problem(f"Ingress {ingress}", (
                f"proxy-ssl / secure-verify annotations have no effect on {backend.name}: its protocol "
                f"{backend.protocol.value} does not use TLS; set nginx.ingress.kubernetes.io/backend-protocol: "
                "HTTPS or GRPCS (or appProtocol: https) or remove them"
            )))
        known = self._backends.get(backend.name)
        if known is not None and (known.protocol, known.tls) != (backend.protocol, backend.tls):
            raise _Rejected(
                f"Service port {backend.name} is already reached over {known.protocol.value} (with its TLS settings) "
                f"by the older Ingress {self._backend_owner[backend.name]}, which wins; make their "
                "backend-protocol and proxy-ssl annotations agree"
            )
        self._backends[backend.name] = backend
        self._backend_owner.setdefault(backend.name, ingress)
        return backend

    def _path_rule(self, namespace: str, path_spec: dict, annotations: _IngressAnnotations) -> PathRule:
        path = path_spec.get("path") or "/"
        try:
            path_type = parse_path_type(path_spec.get("pathType") or "")
        except RuleError as error:
            raise _Rejected(f"pathType: {error}") from None
        try:
            check_path(path, path_type)
        except RuleError as error:
            raise _Rejected(str(error)) from None
        try:
            policy = annotations.policy_for(path)
        except PolicyValueError as error:
            raise _Rejected(str(error)) from None
        backend = self._backend(namespace, self._ingress_ref, path_spec.get("backend") or {})
        return PathRule(path, path_type, backend.name, policy)


@dataclass
class _HostRedirect:
    """The HTTPS redirect of one host, decided by the oldest Ingress that says anything about it."""

    redirect: bool | None = None
    forced: bool = False
    owner: str = ""

    def note(
        self, annotations: _IngressAnnotations, ingress: str, host: str, location: str, problems: list[Problem]
    ) -> None:
        redirect = annotations.ssl_redirect
        if redirect is None:
            return
        if self.redirect is None:
            self.redirect, self.forced, self.owner = redirect, annotations.force_ssl_redirect, ingress
        elif self.redirect != redirect and self.owner != ingress:
            problems.append(Problem(location, (
                f"{SSL_REDIRECT_ANNOTATION}={str(redirect).lower()} is overridden on host {host or '*'!r} by the "
                f"older Ingress {self.owner} ({str(self.redirect).lower()}); make them agree"
            )))


# --- annotations (issue 13) --------------------------------------------------------------------
#
# ingress-nginx keys under `nginx.ingress.kubernetes.io/`, and the same names under
# `ingress.kubernetes.io/` (haproxy-ingress's legacy prefix, which this controller read first).
# Every key under those prefixes that is not in SUPPORTED_ANNOTATIONS, and every value that is
# refused, is a Problem on the Ingress (a Warning Event, a log line and the problems gauge); a
# refused value leaves the Ingress served without that key's effect, except where serving
# without it would open what the user meant to close (a bad source range, body size or regex),
# where the Ingress's paths are left out instead.

NGINX_PREFIX = "nginx.ingress.kubernetes.io/"
ANNOTATION_PREFIXES = (NGINX_PREFIX, "ingress.kubernetes.io/")
# SUPPORTED_ANNOTATIONS (the table, beside SUPPORTED_CONFIGMAP_KEYS) says what each key does.


@dataclass(frozen=True)
class _IngressAnnotations:
    """What an Ingress's annotations ask for; `policy_for(path)` checks what depends on the path."""

    ssl_redirect: bool | None = None
    force_ssl_redirect: bool = False
    policy: RoutePolicy | None = None
    refusal: str | None = None  # set: a value whose absence would serve too much; paths are skipped
    rewrite_key: str = ""  # the rewrite-target annotation as written, for messages

    def policy_for(self, path: str) -> RoutePolicy | None:
        if self.refusal is not None:
            raise _Rejected(self.refusal)
        policy = self.policy
        if policy is None:
            return None
        groups = check_regex(path) if policy.regex else 0
        if policy.rewrite_target is not None:
            try:
                check_rewrite_target(policy.rewrite_target, groups)
            except PolicyValueError as error:
                raise PolicyValueError(f"annotation {self.rewrite_key}: {error.problem}", error.fix) from None
        return policy


def _read_annotations(
    ingress: dict, location: str, problems: list[Problem], default_policy: RoutePolicy | None
) -> _IngressAnnotations:
    values: dict[str, str] = {}
    keys: dict[str, str] = {}  # name → the annotation key as written, for messages
    for key, value in sorted((_metadata(ingress).get("annotations") or {}).items()):
        prefix = next((prefix for prefix in ANNOTATION_PREFIXES if key.startswith(prefix)), None)
        if prefix is None:
            continue  # someone else's annotation (kubectl, cert-manager, ...)
        name = key[len(prefix):]
        if name in TRANSPORT_ANNOTATIONS:
            continue  # how the backend is reached: `_transport_annotations` reads (and checks) these
        if name not in SUPPORTED_ANNOTATIONS:
            problems.append(Problem(location, (
                f"annotation {key} is not supported by ingress-proxy and is ignored; "
                f"supported: {', '.join(sorted(SUPPORTED_ANNOTATIONS))} (README: Annotations)"
            )))
            continue
        if name in values and values[name] != str(value):
            problems.append(Problem(location, f"annotation {key} disagrees with the same key under another prefix; keep one"))
            continue
        values[name], keys[name] = str(value), key
    reader = _AnnotationReader(values, keys, location, problems)
    fields: dict[str, object] = {}
    if default_policy is not None and default_policy.max_body_size is not None:
        fields["max_body_size"] = default_policy.max_body_size
    refusal = None
    refusing_checks: tuple[tuple[str, Callable[[str], object]], ...] = (
        ("whitelist-source-range", _networks), ("allowlist-source-range", _networks),
        ("denylist-source-range", _networks), ("proxy-body-size", parse_size),
    )
    for name, refusing_check in refusing_checks:
        if name not in values:
            continue
        try:
            value = refusing_check(values[name])
        except PolicyValueError as error:
            refusal = f"annotation {keys[name]}: {error.problem}; the Ingress's paths are not served until you {error.fix}"
            continue
        target = {"proxy-body-size": "max_body_size", "denylist-source-range": "deny_sources"}.get(name, "allow_sources")
        fields[target] = value
    for kind, default_code in (("permanent", 301), ("temporal", 302)):
        location_value = reader.read(f"{kind}-redirect", check_redirect_location)
        if location_value is not None:
            code = reader.read(f"{kind}-redirect-code", check_redirect_code) or default_code
            fields.setdefault("redirect", Redirect(location_value, code))
    lenient_checks: tuple[tuple[str, str, Callable[[str], object]], ...] = (
        ("app-root", "app_root", lambda raw: check_path_value(raw, "app-root")),
        ("rewrite-target", "rewrite_target", lambda raw: raw),  # checked per path (capture groups)
        ("x-forwarded-prefix", "forwarded_prefix", lambda raw: check_path_value(raw, "x-forwarded-prefix")),
        ("use-regex", "regex", _parse_bool),
        ("proxy-connect-timeout", "connect_timeout", parse_timeout),
        ("proxy-read-timeout", "read_timeout", parse_timeout),
        ("proxy-send-timeout", "send_timeout", parse_timeout),
        ("upstream-vhost", "upstream_host", check_host_value),
    )
    for name, field_name, lenient_check in lenient_checks:
        value = reader.read(name, lenient_check)
        if value is not None:
            fields[field_name] = value
    rate = reader.read("limit-rps", lambda raw: check_positive(raw, "limit-rps"))
    if rate is not None:
        fields["limit_rps"] = rate
        multiplier = reader.read("limit-burst-multiplier", lambda raw: check_positive(raw, "limit-burst-multiplier"))
        if multiplier is not None:
            fields["limit_burst"] = rate * multiplier
    connections = reader.read("limit-connections", lambda raw: check_positive(raw, "limit-connections", whole=True))
    if connections is not None:
        fields["limit_connections"] = int(connections)
    if reader.read("affinity", _check_affinity_mode):
        name = reader.read("session-cookie-name", check_cookie_name)
        max_age = reader.read("session-cookie-max-age", check_max_age)
        cookie_path = reader.read("session-cookie-path", lambda raw: check_path_value(raw, "session-cookie-path"))
        fields["affinity"] = Affinity(name or Affinity().cookie_name, max_age, cookie_path or "/")
    if reader.read("enable-cors", _parse_bool):
        fields["cors"] = reader.read_cors()
    for direction in ("request", "response"):
        edits = reader.read_edits(direction)
        if edits is not None:
            fields[f"{direction}_headers"] = edits
    policy = RoutePolicy(**fields)  # type: ignore[arg-type]
    forced = reader.read("force-ssl-redirect", _parse_bool)
    ssl_redirect = reader.read("ssl-redirect", _parse_bool)
    return _IngressAnnotations(
        ssl_redirect=True if forced else ssl_redirect,
        force_ssl_redirect=bool(forced),
        policy=policy if policy != RoutePolicy() else None,  # no policy: today's path, no per-request work
        refusal=refusal,
        rewrite_key=keys.get("rewrite-target", ""),
    )


@dataclass
class _AnnotationReader:
    values: dict[str, str]
    keys: dict[str, str]
    location: str
    problems: list[Problem]
    reported: set[str] = field(default_factory=set)

    def read(self, name: str, check: Callable[[str], _T]) -> _T | None:
        if name not in self.values:
            return None
        try:
            return check(self.values[name])
        except (PolicyValueError, _Rejected) as error:
            if name not in self.reported:
                self.reported.add(name)
                self.problems.append(Problem(self.location, f"annotation {self.keys[name]}: {error}; annotation ignored"))
            return None


    def read_cors(self) -> Cors:
        defaults = Cors()
        origins = self.read("cors-allow-origin", lambda raw: check_cors_origins(split_list(raw)))
        methods = self.read("cors-allow-methods", lambda raw: check_token_list(raw, "method"))
        headers = self.read("cors-allow-headers", lambda raw: check_token_list(raw, "header"))
        exposed = self.read("cors-expose-headers", lambda raw: check_token_list(raw, "header"))
        credentials = self.read("cors-allow-credentials", _parse_bool)
        max_age = self.read("cors-max-age", check_max_age)
        return Cors(
            allow_origins=origins or defaults.allow_origins,
            allow_methods=methods or defaults.allow_methods,
            allow_headers=headers or defaults.allow_headers,
            expose_headers=exposed if exposed is not None else defaults.expose_headers,
            allow_credentials=credentials if credentials is not None else defaults.allow_credentials,
            max_age=max_age if max_age is not None else defaults.max_age,
        )

    def read_edits(self, direction: str) -> HeaderEdits | None:
        names = [f"{direction}-{verb}-headers" for verb in ("set", "add", "remove")]
        if not any(name in self.values for name in names):
            return None
        request = direction == "request"

        def check(_: str) -> HeaderEdits | None:
            return header_edits(
                parse_header_lines(self.values.get(names[0], "")),
                parse_header_lines(self.values.get(names[1], "")),
                tuple(split_list(self.values.get(names[2], ""))),
                request,
            )

        return self.read(next(name for name in names if name in self.values), check)


def _read_canary(ingress: dict, location: str, problems: list[Problem]) -> Canary | None:
    """The canary an Ingress declares (backend filled in per path), or None for a main Ingress."""
    values: dict[str, str] = {}
    keys: dict[str, str] = {}
    for key, value in (_metadata(ingress).get("annotations") or {}).items():
        for prefix in ANNOTATION_PREFIXES:
            if key.startswith(prefix) and key[len(prefix):].startswith("canary"):
                values[key[len(prefix):]], keys[key[len(prefix):]] = str(value), key
    reader = _AnnotationReader(values, keys, location, problems)
    if not reader.read("canary", _parse_bool):
        return None
    for key in sorted(_metadata(ingress).get("annotations") or {}):
        ours = next((written for written in ANNOTATION_PREFIXES if key.startswith(written)), None)
        if ours is not None and key[len(ours):] not in CANARY_ANNOTATIONS:
            problems.append(Problem(location, (
                f"annotation {key} is ignored on a canary Ingress (only {', '.join(sorted(CANARY_ANNOTATIONS))} "
                "apply; the main Ingress's policy serves both); move it to the main Ingress or remove it"
            )))
    weight = reader.read("canary-weight", lambda raw: int(check_percent(raw)))
    return Canary(
        backend="",
        weight=weight or 0,
        header=reader.read("canary-by-header", lambda raw: check_header_edit(raw.strip(), None, request=True)),
        header_value=reader.read("canary-by-header-value", lambda raw: raw),
        cookie=reader.read("canary-by-cookie", lambda raw: check_cookie_name(raw.strip())),
    )


def _check_affinity_mode(raw: str) -> bool:
    if str(raw).strip() != "cookie":
        raise PolicyValueError(f"affinity {raw!r} is not an affinity kind", 'write "cookie" (the only one ingress-nginx has)')
    return True


def _networks(raw: str) -> tuple[IpNetwork, ...]:
    return parse_networks(split_list(raw))


# --- backend protocols and upstream TLS (issue 12) -----------------------------------------------

NGINX_PREFIX = "nginx.ingress.kubernetes.io/"
HAPROXY_PREFIXES = ("haproxy-ingress.github.io/", "ingress.kubernetes.io/")  # current, legacy
_NGINX_PROTOCOLS = {
    "HTTP": BackendProtocol.HTTP,
    "HTTPS": BackendProtocol.HTTPS,
    "GRPC": BackendProtocol.H2C,
    "GRPCS": BackendProtocol.H2,
    "H2C": BackendProtocol.H2C,
}
_HAPROXY_PROTOCOLS = {
    "h1": BackendProtocol.HTTP,
    "h1-ssl": BackendProtocol.HTTPS,
    "h2": BackendProtocol.H2C,
    "h2-ssl": BackendProtocol.H2,
}
_APP_PROTOCOLS = {"http": BackendProtocol.HTTP, "https": BackendProtocol.HTTPS, "kubernetes.io/h2c": BackendProtocol.H2C}
_ON_OFF = {"on": True, "off": False, "true": True, "false": False}


@dataclass(frozen=True)
class _TransportAnnotations:
    """What one Ingress's annotations say about how to reach its backends (None: not said)."""

    protocol: BackendProtocol | None = None
    ca_secret: str | None = None  # Secret name in the Ingress's namespace
    ca_secret_annotation: str = ""
    ca_secret_refused: str | None = None  # why the CA Secret named cannot be used: its paths are skipped
    verify: bool | None = None
    server_name: str | None = None
    send_sni: bool | None = None

    @property
    def tls_settings_given(self) -> bool:
        return (self.ca_secret, self.ca_secret_refused, self.verify, self.server_name, self.send_sni) != (None,) * 5


def _transport_annotations(ingress: dict, location: str, problems: list[Problem]) -> _TransportAnnotations:
    annotations = _metadata(ingress).get("annotations") or {}
    found: dict[str, object] = {}

    def note(annotation: str, message: str) -> None:
        problems.append(Problem(location, f"annotation {annotation}: {message}; annotation ignored"))

    def read(suffix: str, prefixes: tuple[str, ...]) -> tuple[str, str] | None:
        for prefix in prefixes:
            if prefix + suffix in annotations:
                return prefix + suffix, str(annotations[prefix + suffix])
        return None

    if (given := read("backend-protocol", (NGINX_PREFIX,))) is not None:
        annotation, value = given
        if value.upper() in _NGINX_PROTOCOLS:
            found["protocol"] = _NGINX_PROTOCOLS[value.upper()]
        else:
            note(annotation, f"{value!r} is not supported (use {', '.join(_NGINX_PROTOCOLS)})")
    elif (given := read("backend-protocol", HAPROXY_PREFIXES)) is not None:
        annotation, value = given
        if value.lower() in _HAPROXY_PROTOCOLS:
            found["protocol"] = _HAPROXY_PROTOCOLS[value.lower()]
        else:
            note(annotation, f"{value!r} is not supported (use {', '.join(_HAPROXY_PROTOCOLS)})")
    elif (given := read("secure-backends", HAPROXY_PREFIXES)) is not None:
        annotation, value = given
        try:
            found["protocol"] = BackendProtocol.HTTPS if _parse_bool(value) else BackendProtocol.HTTP
        except _Rejected as rejected:
            note(annotation, str(rejected))
    if (given := read("proxy-ssl-secret", (NGINX_PREFIX,)) or read("secure-verify-ca-secret", HAPROXY_PREFIXES)) is not None:
        annotation, value = given
        namespace, slash, name = value.rpartition("/")
        if slash and namespace != _namespace(ingress):
            found["ca_secret_refused"] = (
                f"annotation {annotation}: Secret {value} is in another namespace; use a Secret in {_namespace(ingress)}"
            )
        elif not name:
            found["ca_secret_refused"] = f"annotation {annotation}: no Secret named; write namespace/name or name"
        else:
            found["ca_secret"], found["ca_secret_annotation"] = name, annotation
    for key, suffix in (("verify", "proxy-ssl-verify"), ("send_sni", "proxy-ssl-server-name")):
        if (given := read(suffix, (NGINX_PREFIX,))) is not None:
            annotation, value = given
            if value.strip().lower() in _ON_OFF:
                found[key] = _ON_OFF[value.strip().lower()]
            else:
                note(annotation, f'{value!r} is not "on" or "off"')
    if (given := read("proxy-ssl-name", (NGINX_PREFIX,))) is not None:
        annotation, value = given
        name = value.strip().lower()
        if is_dns_name(name) or _is_ip(name):
            found["server_name"] = name
        else:
            note(annotation, f"{value!r} is not a DNS name or IP address; write the name the backend's certificate carries")
    return _TransportAnnotations(**found)  # type: ignore[arg-type]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _with_transport(
    backend: Backend, reference: _ServiceReference, transport: _TransportAnnotations, index: _ObjectIndex
) -> Backend:
    """`backend` with its protocol and TLS settings; _Rejected when they cannot be had."""
    protocol = transport.protocol
    if protocol is None:
        app_protocol = index.app_protocol(reference)
        protocol = _APP_PROTOCOLS.get((app_protocol or "http").lower(), BackendProtocol.HTTP)
    if not protocol.uses_tls:
        return backend if protocol is BackendProtocol.HTTP else dataclasses.replace(backend, protocol=protocol)
    if transport.ca_secret_refused is not None:
        raise _Rejected(transport.ca_secret_refused)
    ca_pem = None
    client_certificate = None
    if transport.ca_secret is not None:
        ca_pem, client_certificate = _load_ca_secret(index, reference.namespace, transport.ca_secret, transport.ca_secret_annotation)
    tls = UpstreamTls(
        ca_pem=ca_pem,
        verify=transport.verify if transport.verify is not None else ca_pem is not None,
        server_name=transport.server_name or f"{reference.service}.{reference.namespace}.svc",
        send_sni=transport.send_sni is not False,
        client_certificate=client_certificate,
    )
    return dataclasses.replace(backend, protocol=protocol, tls=tls)


def _load_ca_secret(
    index: _ObjectIndex, namespace: str, name: str, annotation: str
) -> tuple[bytes, ClientCertificate | None]:
    """A proxy-ssl Secret's CA bundle, and its client certificate when it holds tls.crt + tls.key."""
    secret_ref = f"{namespace}/{name}"
    secret = index.secrets.get((namespace, name))
    if secret is None:
        raise _Rejected(f"Secret {secret_ref} (annotation {annotation}) not found; create it with a ca.crt key")
    data = secret.get("data") or {}
    if not isinstance(data.get("ca.crt"), str):
        raise _Rejected(f"Secret {secret_ref} (annotation {annotation}) has no ca.crt; store the PEM CA bundle there")
    try:
        ca_pem = parse_certificate_chain(base64.b64decode(data["ca.crt"], validate=True)).pem
    except (binascii.Error, ValueError):
        raise _Rejected(f"Secret {secret_ref}: ca.crt is not valid base64; store it base64-encoded under data") from None
    except (CertificateParseError, NoCertificateError):
        raise _Rejected(f"Secret {secret_ref}: ca.crt holds no usable PEM certificate; store the CA bundle as PEM") from None
    if not (isinstance(data.get("tls.crt"), str) and isinstance(data.get("tls.key"), str)):
        return ca_pem, None
    material = _PARSED_SECRETS.parse(data["tls.crt"], data["tls.key"])
    if isinstance(material, str):
        raise _Rejected(f"Secret {secret_ref}: client certificate: {material}")
    return ca_pem, ClientCertificate(material.chain_pem, material.key, f"Secret {secret_ref}")


# --- TLS -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TlsMaterial:
    chain_pem: bytes
    key: KeySource
    dns_names: tuple[str, ...]

    def certificate(self, hosts: tuple[str, ...], origin: str) -> Certificate:
        return Certificate(self.chain_pem, self.key, hosts, origin)


def _load_tls_secret(secret: dict | None, reference_to_fix: str) -> _TlsMaterial:
    if secret is None:
        raise _Rejected(f"not found; create it (kubectl create secret tls) or fix {reference_to_fix}")
    if secret.get("type") != TLS_SECRET_TYPE:
        raise _Rejected(
            f"type is {secret.get('type')!r}, expected {TLS_SECRET_TYPE}; recreate it with kubectl create secret tls"
        )
    data = secret.get("data") or {}
    for key, content in (("tls.crt", "PEM certificate chain"), ("tls.key", "PEM private key")):
        if not data.get(key):
            raise _Rejected(f"has no {key}; store the {content} there")
        if not isinstance(data[key], str):
            raise _Rejected(f"{key} is not a string; store the base64-encoded {content} there")
    material = _PARSED_SECRETS.parse(data["tls.crt"], data["tls.key"])
    if isinstance(material, str):
        raise _Rejected(material)
    return material


def _parse_tls_data(certificate_base64: str, key_base64: str) -> _TlsMaterial | str:
    """Decode and check a Secret's tls.crt/tls.key; a string is the reason they cannot be used.
    Memoized by content in `_PARSED_SECRETS` (a pure function, so the output cannot change)."""
    decoded = {}
    for key, value in (("tls.crt", certificate_base64), ("tls.key", key_base64)):
        try:
            decoded[key] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError, TypeError):
            return f"{key} is not valid base64; store it base64-encoded under data"
    try:
        chain = parse_certificate_chain(decoded["tls.crt"])
    except CertificateParseError as error:
        return f"tls.crt holds a PEM certificate that does not parse ({error.detail}); re-export the chain"
    except NoCertificateError:
        return "tls.crt holds no PEM certificate (-----BEGIN CERTIFICATE-----); re-export the chain as PEM"
    dns_names = tuple(sorted(san_host_patterns(chain.leaf)))
    try:
        uri = key_uri_in(decoded["tls.key"])
    except KeyUriError as error:
        return f"tls.key {error}"
    if uri is not None:  # an HSM-backed key: the token checks the pair when the key is loaded
        uri_without_pin, pin = split_pin(uri)
        return _TlsMaterial(decoded["tls.crt"], StoreKey(uri_without_pin, pin), dns_names)
    try:
        private_key = parse_private_key(decoded["tls.key"])
    except (EncryptedKeyError, KeyParseError):
        return (
            "tls.key is not an unencrypted PEM private key (PKCS#1 or PKCS#8) nor a pkcs11: key URI; "
            "re-export the key"
        )
    if not key_matches_certificate(private_key, chain.leaf):
        return "tls.key does not match the first certificate in tls.crt; store the key of that certificate"
    return _TlsMaterial(decoded["tls.crt"], PemKey(decoded["tls.key"]), dns_names)


class _ParsedSecretMemo:
    """`_parse_tls_data` results by content, kept while the latest translations use them.

    Loading an RSA-2048 key costs ~36 ms here (OpenSSL 3 checks it) and every full translation
    re-reads every referenced Secret, so results are memoized. An LRU bound does not fit: every
    translation walks all Secrets in the same order, so with more Secrets than the bound nothing
    ever hits (5,000 TLS Ingresses cost ~7 s per change with a 1,024-entry LRU). Instead each
    translation keeps what it used and what the previous one used; older entries (rotated or
    deleted Secrets) are dropped, so memory follows the cluster's current Secrets.
    """

    def __init__(self) -> None:
        self._previous: dict[tuple[str, str], _TlsMaterial | str] = {}
        self._current: dict[tuple[str, str], _TlsMaterial | str] = {}

    def start_translation(self) -> None:
        self._previous, self._current = self._current, {}

    def parse(self, certificate_base64: str, key_base64: str) -> _TlsMaterial | str:
        content = (certificate_base64, key_base64)
        result = self._current.get(content)
        if result is None:
            result = self._previous.get(content)
            if result is None:
                result = _parse_tls_data(certificate_base64, key_base64)
            self._current[content] = result
        return result


_PARSED_SECRETS = _ParsedSecretMemo()


class _CertificateCollector:
    """One Certificate per Secret; each host served by the Secret of the oldest Ingress naming it."""

    def __init__(self, index: _ObjectIndex, problems: list[Problem]) -> None:
        self._index = index
        self._problems = problems
        self._loaded: dict[tuple[str, str], _TlsMaterial | _Rejected] = {}
        self._hosts: dict[str, set[str]] = {}  # Secret ref → hosts
        self._material: dict[str, _TlsMaterial] = {}
        self._host_owner: dict[str, tuple[str, str]] = {}  # host → (Secret ref, Ingress ref)

    def add(self, ingress: dict, tls_number: int, tls: dict) -> None:
        secret_name = tls.get("secretName")
        if not secret_name:
            return  # these hosts get the default certificate, as the Ingress API specifies
        location = f"Ingress {_ref(ingress)}"
        key = (_namespace(ingress), secret_name)
        secret_ref = f"{key[0]}/{key[1]}"
        if key not in self._loaded:
            try:
                self._loaded[key] = _load_tls_secret(self._index.secrets.get(key), "spec.tls[].secretName")
            except _Rejected as rejected:
                self._loaded[key] = rejected
        material = self._loaded[key]
        if isinstance(material, _Rejected):
            self._problems.append(Problem(location, f"Secret {secret_ref}: {material} (spec.tls[{tls_number}])"))
            return
        hosts = [host.lower() for host in tls.get("hosts") or ()] or list(material.dns_names)
        if not hosts:
            self._problems.append(Problem(location, (
                f"Secret {secret_ref}: spec.tls[{tls_number}] lists no hosts and the certificate has no DNS names; "
                "add spec.tls[].hosts"
            )))
            return
        for host in hosts:
            owner_secret, owner_ingress = self._host_owner.setdefault(host, (secret_ref, _ref(ingress)))
            if owner_secret != secret_ref:
                self._problems.append(Problem(location, (
                    f"Secret {secret_ref}: host {host!r} is already served by Secret {owner_secret} of the older "
                    f"Ingress {owner_ingress}; remove it from one spec.tls"
                )))
                continue
            self._material[secret_ref] = material
            self._hosts.setdefault(secret_ref, set()).add(host)

    def result(self) -> tuple[Certificate, ...]:
        return tuple(
            self._material[secret_ref].certificate(tuple(sorted(hosts)), origin=f"Secret {secret_ref}")
            for secret_ref, hosts in sorted(self._hosts.items())
        )


def _default_certificate(index: _ObjectIndex, options: TranslateOptions, problems: list[Problem]) -> Certificate | None:
    if options.default_ssl_certificate is None:
        return None
    namespace, name = options.default_ssl_certificate
    try:
        material = _load_tls_secret(index.secrets.get((namespace, name)), "the default SSL certificate option")
    except _Rejected as rejected:
        problems.append(Problem(f"Secret {namespace}/{name}", f"default SSL certificate: {rejected}"))
        return None
    return material.certificate(hosts=(), origin=f"Secret {namespace}/{name}")


def _covered_by_certificate(host: str, certificate_hosts: frozenset[str]) -> bool:
    """Would SNI `host` find a certificate: its own name, or a wildcard one label up."""
    if not host:
        return False
    if host in certificate_hosts:
        return True
    return not host.startswith("*.") and "*." + host.partition(".")[2] in certificate_hosts


# --- ConfigMap -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GlobalSettings:
    crypto: CryptoSettings = CryptoSettings()
    timeouts: Timeouts = Timeouts()
    hsts: Hsts | None = None
    ssl_redirect: bool = False
    tls_policy: TlsPolicy = TlsPolicy()
    default_policy: RoutePolicy | None = None  # what every Ingress path gets unless its annotations say otherwise
    real_ip: RealIp | None = None


def _parse_bool(raw: str) -> bool:
    value = str(raw).strip().lower()
    if value not in ("true", "false"):
        raise _Rejected(f"{raw!r} is not a boolean; use \"true\" or \"false\"")
    return value == "true"


def _parse_duration(raw: str) -> float:
    match = DURATION.fullmatch(str(raw).strip())
    if match is None:
        raise _Rejected(f"{raw!r} is not a duration; use an integer and a unit (us, ms, s, m, h, d) like 500ms, 5s, 1m")
    seconds = int(match[1]) * DURATION_MICROSECONDS[match[2] or "ms"] / 1_000_000
    if seconds <= 0:
        raise _Rejected(f"{raw!r} must be greater than zero")
    return seconds


def _parse_seconds(raw: str) -> int:
    value = str(raw).strip()
    if not value.isdigit():
        raise _Rejected(f"{raw!r} is not a whole number of seconds")
    return int(value)


def _parse_engine(raw: str) -> EngineSettings | None:
    words = str(raw).split()
    if not words:
        return None
    if len(words) == 1:
        return EngineSettings(id=words[0])
    if len(words) != 3 or words[1] != "algo":
        raise _Rejected(f"{raw!r} is not '<engine-id>' or '<engine-id> algo <ALG,...>' (e.g. qatengine algo RSA,EC)")
    algorithms = tuple(name.strip().upper() for name in words[2].split(",") if name.strip())
    unknown = sorted(set(algorithms) - set(ALGORITHM_FLAGS))
    if unknown or not algorithms:
        raise _Rejected(
            f"unknown algorithm(s) {', '.join(unknown) or '(none)'}; use some of {', '.join(sorted(ALGORITHM_FLAGS))}"
        )
    return EngineSettings(id=words[0], algorithms=algorithms)


_PROVIDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _parse_provider_names(raw: str) -> tuple[str, ...]:
    """`ssl-provider`: provider names in activation order, separated by spaces or commas (HAProxy
    takes one `ssl-provider` line per provider; a ConfigMap key holds them all)."""
    names = tuple(name for name in re.split(r"[\s,]+", str(raw)) if name)
    bad = [name for name in names if not _PROVIDER_NAME.fullmatch(name)]
    if bad:
        raise _Rejected(f"{bad[0]!r} is not a provider name; list names like \"pkcs11\" or \"qatprovider\"")
    if len(set(names)) != len(names):
        raise _Rejected("a provider is listed twice; list each once")
    return names


def _parse_provider_parameters(raw: str) -> tuple[tuple[str, str, str], ...]:
    """`ssl-provider-parameters`: one `<provider> <parameter>=<value>` a line, in order."""
    parameters = []
    for number, line in enumerate(str(raw).splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        provider, _, assignment = line.strip().partition(" ")
        name, equals, value = assignment.strip().partition("=")
        if not equals or not name.strip() or not provider:
            raise _Rejected(
                f"line {number} is not '<provider> <parameter>=<value>' "
                "(e.g. pkcs11 pkcs11-module-path=/usr/lib/softhsm/libsofthsm2.so)"
            )
        parameters.append((provider, name.strip(), value.strip()))
    return tuple(parameters)


def _provider_settings(
    names: tuple[str, ...],
    parameters: tuple[tuple[str, str, str], ...],
    optional: tuple[str, ...],
    location: str,
    problems: list[Problem],
) -> tuple[ProviderSettings, ...]:
    for key, named in (("ssl-provider-parameters", {provider for provider, _, _ in parameters}), ("ssl-provider-optional", set(optional))):
        unknown = sorted(named - set(names))
        if unknown:
            problems.append(Problem(location, f"{key}: {', '.join(unknown)} not in ssl-provider; ignored"))
    return tuple(
        ProviderSettings(
            name,
            parameters=tuple((key, value) for provider, key, value in parameters if provider == name),
            required=name not in optional,
        )
        for name in names
    )


_T = TypeVar("_T")
# ingress-nginx's proxy-real-ip-cidr default: with use-forwarded-headers every peer is trusted.
INGRESS_NGINX_REAL_IP_CIDR: tuple[IpNetwork, ...] = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
SUPPORTED_CONFIGMAP_KEYS = (
    "hsts", "hsts-include-subdomains", "hsts-max-age", "hsts-preload", "ssl-ciphers", "ssl-ciphersuites", "ssl-ecdh-curve",
    "proxy-body-size", "proxy-real-ip-cidr", "ssl-engine", "ssl-mode-async", "ssl-propquery", "ssl-protocols",
    "ssl-provider", "ssl-provider-optional", "ssl-provider-parameters", "ssl-provider-path", "ssl-redirect",
    "timeout-client", "timeout-connect", "timeout-http-request", "timeout-server", "use-forwarded-headers", "use-http2",
)


# Annotation names (after ANNOTATION_PREFIXES) → what we do with them. README's "Annotations" table
# is checked against this one (tests/translate/test_annotations.py), so docs and code cannot drift.
SUPPORTED_ANNOTATIONS = {  # name → what we do with it (README's table is written from this)
    "ssl-redirect": "redirect plain-HTTP requests for the Ingress's hosts to HTTPS (308) when a certificate covers them",
    "force-ssl-redirect": "redirect to HTTPS even when no certificate of ours covers the host",
    "permanent-redirect": "answer every request with 301 and this Location",
    "permanent-redirect-code": "the status for permanent-redirect (301, 302, 303, 307 or 308)",
    "temporal-redirect": "answer every request with 302 and this Location",
    "temporal-redirect-code": "the status for temporal-redirect",
    "app-root": "redirect (302) requests for / to this path",
    "proxy-body-size": "request bodies over this size (nginx syntax: 8m) get 413; 0 = no limit",
    "whitelist-source-range": "only these client CIDRs are served (else 403)",
    "allowlist-source-range": "same as whitelist-source-range",
    "denylist-source-range": "these client CIDRs get 403",
    "use-regex": "paths are regexes, anchored and case-insensitive (checked for catastrophic backtracking)",
    "rewrite-target": "the path sent upstream becomes this, with $1..$9 from the path's groups",
    "x-forwarded-prefix": "sent upstream as X-Forwarded-Prefix",
    "proxy-connect-timeout": "seconds to connect to an endpoint (timeout-connect for this Ingress)",
    "proxy-read-timeout": "seconds each wait for the backend's response may take (timeout-server for this Ingress)",
    "proxy-send-timeout": "seconds each wait for the backend to take request body bytes may take",
    "upstream-vhost": "the Host header sent upstream (X-Forwarded-Host keeps the client's)",
    "enable-cors": "answer CORS preflights and add CORS headers to responses",
    "cors-allow-origin": "origins allowed (*, exact, or https://*.example.com)",
    "cors-allow-methods": "Access-Control-Allow-Methods of preflight answers",
    "cors-allow-headers": "Access-Control-Allow-Headers of preflight answers",
    "cors-expose-headers": "Access-Control-Expose-Headers",
    "cors-allow-credentials": "send Access-Control-Allow-Credentials: true (the Origin is then echoed, never *)",
    "cors-max-age": "Access-Control-Max-Age of preflight answers",
    "canary": "this Ingress is a weighted alternative to the main Ingress of the same host and paths",
    "canary-weight": "percent of requests (0-100) sent to the canary",
    "canary-by-header": "a request header: always → canary, never → main (or compared with canary-by-header-value)",
    "canary-by-header-value": "the canary-by-header value that selects the canary",
    "canary-by-cookie": "a cookie: always → canary, never → main",
    "affinity": "cookie: sticky endpoint by cookie (re-picked and re-issued when the endpoint is gone)",
    "session-cookie-name": "the affinity cookie's name (default INGRESSCOOKIE)",
    "session-cookie-max-age": "the affinity cookie's Max-Age in seconds (default: a session cookie)",
    "session-cookie-path": "the affinity cookie's Path (default /)",
    "limit-rps": "requests per second per client address, per replica (429 above it)",
    "limit-burst-multiplier": "burst = limit-rps × this (default 5)",
    "limit-connections": "requests in flight per client address, per replica (503 above it)",
    # ingress-proxy's own keys (ingress-nginx needs a configuration-snippet for these): one
    # "Name: value" per line for set/add, a comma-separated list of names for remove
    "request-set-headers": "request headers set (replacing the client's) before forwarding",
    "request-add-headers": "request headers added before forwarding",
    "request-remove-headers": "request headers removed before forwarding",
    "response-set-headers": "response headers set (replacing the backend's)",
    "response-add-headers": "response headers added",
    "response-remove-headers": "response headers removed",
}
CANARY_ANNOTATIONS = frozenset(name for name in SUPPORTED_ANNOTATIONS if name.startswith("canary"))
# How the backend is reached (README: Backends over TLS and HTTP/2), read by `_transport_annotations`
# under NGINX_PREFIX or HAPROXY_PREFIXES (the legacy `ingress.kubernetes.io/` is both projects').
TRANSPORT_ANNOTATIONS = frozenset((
    "backend-protocol", "proxy-ssl-secret", "proxy-ssl-verify", "proxy-ssl-name", "proxy-ssl-server-name",
    "secure-backends", "secure-verify-ca-secret",
))  # fmt: skip


def _policy_check(check: Callable[[str], _T]) -> Callable[[str], _T]:
    def parse(raw: str) -> _T:
        try:
            return check(str(raw))
        except PolicyError as error:
            raise _Rejected(str(error)) from None

    return parse


def _parse_curves(raw: str) -> str:
    return TlsPolicy().curves if str(raw).strip() == "auto" else check_curves(str(raw))  # ingress-nginx's default value


def _read_configmap(configmap: dict | None, problems: list[Problem]) -> _GlobalSettings:
    if configmap is None:
        return _GlobalSettings()
    location = f"ConfigMap {_ref(configmap)}"
    data = configmap.get("data") or {}

    def read(key: str, parse: Callable[[str], _T], default: _T) -> _T:
        if key not in data:
            return default
        try:
            return parse(data[key])
        except _Rejected as rejected:
            problems.append(Problem(location, f"{key}: {rejected}; using the default"))
            return default

    for key in sorted(set(data) - set(SUPPORTED_CONFIGMAP_KEYS)):
        supported = ", ".join(SUPPORTED_CONFIGMAP_KEYS)
        problems.append(Problem(location, f"{key}: unknown key, ignored; supported keys: {supported}"))

    defaults = Timeouts()
    timeouts = Timeouts(
        connect=read("timeout-connect", _parse_duration, defaults.connect),
        handshake=defaults.handshake,
        header_read=read("timeout-http-request", _parse_duration, defaults.header_read),
        idle=read("timeout-client", _parse_duration, defaults.idle),
        backend_response=read("timeout-server", _parse_duration, defaults.backend_response),
        drain=defaults.drain,
    )
    crypto = CryptoSettings(
        engine=read("ssl-engine", _parse_engine, None),
        async_mode=read("ssl-mode-async", _parse_bool, False),
        providers=_provider_settings(
            read("ssl-provider", _parse_provider_names, ()),
            read("ssl-provider-parameters", _parse_provider_parameters, ()),
            read("ssl-provider-optional", _parse_provider_names, ()),
            location,
            problems,
        ),
        propquery=read("ssl-propquery", lambda raw: str(raw).strip() or None, None),
        provider_path=read("ssl-provider-path", lambda raw: str(raw).strip() or None, None),
    )
    hsts_defaults = Hsts()
    hsts = Hsts(
        max_age=read("hsts-max-age", _parse_seconds, hsts_defaults.max_age),
        include_subdomains=read("hsts-include-subdomains", _parse_bool, hsts_defaults.include_subdomains),
        preload=read("hsts-preload", _parse_bool, hsts_defaults.preload),
    )
    enabled_hsts = hsts if read("hsts", _parse_bool, False) else None
    policy_defaults = TlsPolicy()
    min_version, max_version = read(
        "ssl-protocols", _policy_check(check_protocols), (policy_defaults.min_version, policy_defaults.max_version)
    )
    tls_policy = TlsPolicy(
        min_version=min_version,
        max_version=max_version,
        ciphers=read("ssl-ciphers", _policy_check(lambda raw: check_ciphers(raw, "ssl-ciphersuites")), policy_defaults.ciphers),
        ciphersuites=read("ssl-ciphersuites", _policy_check(check_ciphersuites), policy_defaults.ciphersuites),
        curves=read("ssl-ecdh-curve", _policy_check(_parse_curves), policy_defaults.curves),
        alpn=policy_defaults.alpn if read("use-http2", _parse_bool, True) else ("http/1.1",),  # ingress-nginx's key
    )
    ssl_redirect = read("ssl-redirect", _parse_bool, False)
    body_size = read("proxy-body-size", _policy_check_value(parse_size), None)  # default: no limit (README)
    default_policy = RoutePolicy(max_body_size=body_size) if body_size is not None else None
    real_ip = None
    if read("use-forwarded-headers", _parse_bool, False):  # ingress-nginx: trusted from proxy-real-ip-cidr
        trusted = read("proxy-real-ip-cidr", _policy_check_value(_networks), INGRESS_NGINX_REAL_IP_CIDR)
        real_ip = RealIp(trusted)
    return _GlobalSettings(crypto, timeouts, enabled_hsts, ssl_redirect, tls_policy, default_policy, real_ip)


def _policy_check_value(check: Callable[[str], _T]) -> Callable[[str], _T]:
    def parse(raw: str) -> _T:
        try:
            return check(str(raw))
        except PolicyValueError as error:
            raise _Rejected(str(error)) from None

    return parse
