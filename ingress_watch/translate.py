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
- Where each part lives: this module claims Ingresses and collects routes; `objects` (accessors,
  the live-object index, endpoints), `annotations` (policy keys and their table), `backend_transport`
  (backend protocol and upstream TLS), `tls_secrets` (Secrets → certificates), `configmap` (global
  settings and their table).
- Shapes: the API server validates objects, so a list where a mapping belongs cannot come from
  it; should one arrive anyway (a lax fake, a hand-made snapshot) that Ingress gets a problem
  and the translation goes on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from config.model import (
    Backend,
    Canary,
    Certificate,
    ClientAuth,
    Configuration,
    PathRule,
    Problem,
    RoutePolicy,
    RouteTable,
)
from config.route_policy import PolicyValueError
from config.route_rules import HostTable, RuleError, check_path, parse_path_type
from config.tls_material import HostPatternError, parse_host_pattern
from ingress_watch.annotations import IngressAnnotations, NGINX_PREFIX, read_annotations, read_canary
from ingress_watch.backend_transport import (
    NGINX_PREFIX,
    TransportAnnotations,
    transport_annotations,
    with_transport,
)
from ingress_watch.client_auth import ClientAuthAnnotations, read_client_auth
from ingress_watch.configmap import read_configmap
from ingress_watch.objects import (
    MALFORMED,
    ObjectIndex,
    Rejected,
    ServiceReference,
    age_order,
    is_live,
    object_metadata,
    object_name,
    object_namespace,
    object_ref,
)
from ingress_watch.snapshot import Snapshot
from ingress_watch.tls_secrets import (
    CertificateCollector,
    PARSED_SECRETS,
    covered_by_certificate,
    load_tls_secret,
)

INGRESS_CLASS_ANNOTATION = "kubernetes.io/ingress.class"
DEFAULT_CLASS_ANNOTATION = "ingressclass.kubernetes.io/is-default-class"
SSL_REDIRECT_ANNOTATION = "ingress.kubernetes.io/ssl-redirect"


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
    # (namespace, name) of every ConfigMap of headers looked up, found or not: what the watch keeps
    named_configmaps: frozenset[tuple[str, str]] = frozenset()


def translate(snapshot: Snapshot, options: TranslateOptions) -> Translation:
    PARSED_SECRETS.start_translation()
    index = ObjectIndex(snapshot)
    problems: list[Problem] = []
    settings = read_configmap(index, problems)
    ingresses = _claimed_ingresses(snapshot, options)
    routes = _RouteCollector(index, problems, settings.default_policy)
    certificates = CertificateCollector(index, problems)
    for ingress in ingresses:
        try:
            routes.add(ingress)
            for tls_number, tls in enumerate((ingress.get("spec") or {}).get("tls") or ()):
                certificates.add(ingress, tls_number, tls)
        except MALFORMED as error:
            problems.append(Problem(f"Ingress {object_ref(ingress)}", (
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
        proxy_protocol=settings.proxy_protocol,
    )
    return Translation(
        configuration=configuration,
        problems=tuple(sorted(set(problems), key=lambda problem: (problem.location, problem.message))),
        claimed_ingresses=tuple(sorted((object_namespace(ingress), object_name(ingress)) for ingress in ingresses)),
        named_configmaps=frozenset(index.named_configmaps),
    )


def resolve_endpoints(snapshot: Snapshot, backends: tuple[Backend, ...]) -> tuple[Backend, ...]:
    """The same backends, in the same order, with endpoints re-read from `snapshot`.

    The fast path for EndpointSlice changes: routes and certificates stay as they are. A backend
    whose Service or port has gone gets `endpoints=()` (503) until the next full translation
    reports why; a name this module did not produce is returned unchanged.
    """
    index = ObjectIndex(snapshot)
    resolved = []
    for backend in backends:
        reference = ServiceReference.parse(backend.name)
        if reference is None:
            resolved.append(backend)
            continue
        try:
            endpoints = index.endpoints(reference)
        except (Rejected, *MALFORMED):
            endpoints = ()
        resolved.append(dataclasses.replace(backend, endpoints=endpoints))
    return tuple(resolved)


def _claimed_ingresses(snapshot: Snapshot, options: TranslateOptions) -> list[dict]:
    our_classes = {
        object_name(ingress_class): ingress_class
        for ingress_class in snapshot.ingress_classes
        if is_live(ingress_class) and (ingress_class.get("spec") or {}).get("controller") == options.controller_class
    }
    default_class_is_ours = any(
        (object_metadata(ingress_class).get("annotations") or {}).get(DEFAULT_CLASS_ANNOTATION) == "true"
        for ingress_class in our_classes.values()
    )

    def is_ours(ingress: dict) -> bool:
        if not is_live(ingress):
            return False
        if options.watch_namespace is not None and object_namespace(ingress) != options.watch_namespace:
            return False
        class_name = (ingress.get("spec") or {}).get("ingressClassName")
        if class_name:
            return class_name in our_classes
        legacy_class = (object_metadata(ingress).get("annotations") or {}).get(INGRESS_CLASS_ANNOTATION)
        if legacy_class:
            return legacy_class == options.ingress_class
        return default_class_is_ours or options.watch_ingress_without_class

    return sorted(filter(is_ours, snapshot.ingresses), key=age_order)


def _host_problem(where: str, written_host: str, error: HostPatternError) -> str:
    if error.wildcard_fault:
        fault = "a wildcard must be the whole first label, like *.example.com"
        return f"{where}.host {written_host.lower()!r}: {fault}; rule skipped"
    return f"{where}.host: {error}; rule skipped"


class _RouteCollector:
    """Virtual hosts, the default backend and the backends they use, from Ingresses oldest first.

    Which rules are the same rule and who wins a conflict is `config.route_rules`'s, shared with
    the routes file; this class adds only the Kubernetes side (age order, problems per Ingress)."""

    def __init__(self, index: ObjectIndex, problems: list[Problem], default_policy: RoutePolicy | None) -> None:
        self._index = index
        self._problems = problems
        self._default_policy = default_policy
        self._backends: dict[str, Backend] = {}
        self._table = HostTable()
        self._redirects: dict[str, _HostRedirect] = {}
        self._client_auth: dict[str, tuple[ClientAuth | None, str]] = {}  # host → (its client auth, the Ingress that set it)
        self._default_backend: str | None = None
        self._default_backend_owner = ""
        self._transport = TransportAnnotations()  # of the Ingress being added
        self._ingress_ref = ""
        self._backend_owner: dict[str, str] = {}  # backend name → Ingress that set its protocol
        self._canaries: list[tuple[dict, Canary]] = []  # (Ingress, its canary with backend "")

    def add(self, ingress: dict) -> None:
        location = f"Ingress {object_ref(ingress)}"
        spec = ingress.get("spec") or {}
        canary = read_canary(ingress, location, self._problems)
        if canary is not None:
            self._canaries.append((ingress, canary))  # attached once every main rule is filed
            return
        if spec.get("defaultBackend") is not None:
            self._add_default_backend(ingress, spec["defaultBackend"], location)
        annotations = read_annotations(ingress, location, self._problems, self._default_policy, self._index)
        self._transport = transport_annotations(ingress, location, self._problems)
        self._ingress_ref = object_ref(ingress)
        client_auth = read_client_auth(ingress, self._index)
        if client_auth.refusal is not None:
            self._problems.append(Problem(location, client_auth.refusal))
            return
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
            if not self._note_client_auth(client_auth, host, where, location):
                continue
            redirect = self._redirects.setdefault(host, _HostRedirect())
            redirect.note(annotations, object_ref(ingress), host, location, self._problems)
            for path_number, path_spec in enumerate(http.get("paths") or ()):
                path_where = f"{where}.http.paths[{path_number}]"
                try:
                    path_rule = self._path_rule(object_namespace(ingress), path_spec, annotations)
                except Rejected as rejected:
                    self._problems.append(Problem(location, f"{path_where}: {rejected}"))
                    continue
                conflict = self._table.add(host, path_rule, f"Ingress {object_ref(ingress)}")
                if conflict is not None:
                    self._problems.append(Problem(location, (
                        f"{path_where}: {conflict.describe(host)}, which wins (older or listed first); "
                        "change the path or remove one"
                    )))

    def _note_client_auth(self, said: ClientAuthAnnotations, host: str, where: str, location: str) -> bool:
        """File the Ingress's client auth for `host` (the oldest Ingress that says anything sets
        it); False when it disagrees with the older one, whose setting stays: the rule is skipped."""
        if not said.said:
            return True
        if not host:
            self._problems.append(Problem(location, (
                f"{where}: auth-tls-* needs a host (client certificates are asked for by the name a client sends "
                "as SNI); rule skipped, give the rule a host"
            )))
            return False
        owned = self._client_auth.setdefault(host, (said.client_auth, self._ingress_ref))
        if owned[0] != said.client_auth:
            self._problems.append(Problem(location, (
                f"{where}: host {host!r} already has other auth-tls-* settings from the older Ingress {owned[1]}, "
                "which win; rule skipped (make the annotations agree)"
            )))
            return False
        return True

    def _attach_canaries(self) -> None:
        """Each canary Ingress's paths become the alternative of the main rule they match."""
        for ingress, canary in self._canaries:
            location = f"Ingress {object_ref(ingress)}"
            self._transport = transport_annotations(ingress, location, self._problems)  # its backend's protocol
            self._ingress_ref = object_ref(ingress)
            for rule_number, rule in enumerate((ingress.get("spec") or {}).get("rules") or ()):
                try:
                    host = parse_host_pattern(rule.get("host") or "", allow_any=True)
                except HostPatternError as error:
                    self._problems.append(Problem(location, _host_problem(f"spec.rules[{rule_number}]", rule.get("host") or "", error)))
                    continue
                for path_number, path_spec in enumerate((rule.get("http") or {}).get("paths") or ()):
                    where = f"spec.rules[{rule_number}].http.paths[{path_number}]"
                    try:
                        path_rule = self._path_rule(object_namespace(ingress), path_spec, IngressAnnotations())
                    except Rejected as rejected:
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
            covered = covered_by_certificate(host, certificate_hosts)
            if routes.redirect and not covered and not routes.forced:
                self._problems.append(Problem(f"Ingress {routes.owner}", (
                    f"{SSL_REDIRECT_ANNOTATION} is true but no certificate covers host {host!r}; "
                    "add the host to spec.tls so it can be served over HTTPS "
                    f"(or set {NGINX_PREFIX}force-ssl-redirect to redirect anyway)"
                )))
            redirect = routes.redirect if routes.redirect is not None else ssl_redirect
            redirects[host] = bool(redirect and (covered or routes.forced))
        client_auth = {host: auth for host, (auth, _) in self._client_auth.items()}
        virtual_hosts = self._table.virtual_hosts(redirects, None, client_auth)
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
            backend = self._backend(object_namespace(ingress), object_ref(ingress), backend_spec)
        except Rejected as rejected:
            self._problems.append(Problem(location, f"spec.defaultBackend: {rejected}"))
            return
        self._default_backend, self._default_backend_owner = backend.name, object_ref(ingress)

    def _backend(self, namespace: str, ingress: str, backend_spec: dict) -> Backend:
        """The resolved backend, with the protocol the Ingress (or the Service port) asks for."""
        plain = self._index.resolve_backend(namespace, backend_spec)
        reference = ServiceReference.parse(plain.name)
        assert reference is not None, "resolve_backend names backends after their Service reference"
        backend = with_transport(plain, reference, self._transport, self._index)
        if not backend.protocol.uses_tls and self._transport.tls_settings_given:
            self._problems.append(Problem(f"Ingress {ingress}", (
                f"proxy-ssl / secure-verify annotations have no effect on {backend.name}: its protocol "
                f"{backend.protocol.value} does not use TLS; set nginx.ingress.kubernetes.io/backend-protocol: "
                "HTTPS or GRPCS (or appProtocol: https) or remove them"
            )))
        known = self._backends.get(backend.name)
        if known is not None and (known.protocol, known.tls) != (backend.protocol, backend.tls):
            raise Rejected(
                f"Service port {backend.name} is already reached over {known.protocol.value} (with its TLS settings) "
                f"by the older Ingress {self._backend_owner[backend.name]}, which wins; make their "
                "backend-protocol and proxy-ssl annotations agree"
            )
        self._backends[backend.name] = backend
        self._backend_owner.setdefault(backend.name, ingress)
        return backend

    def _path_rule(self, namespace: str, path_spec: dict, annotations: IngressAnnotations) -> PathRule:
        path = path_spec.get("path") or "/"
        try:
            path_type = parse_path_type(path_spec.get("pathType") or "")
        except RuleError as error:
            raise Rejected(f"pathType: {error}") from None
        try:
            check_path(path, path_type)
        except RuleError as error:
            raise Rejected(str(error)) from None
        try:
            policy = annotations.policy_for(path)
        except PolicyValueError as error:
            raise Rejected(str(error)) from None
        backend = self._backend(namespace, self._ingress_ref, path_spec.get("backend") or {})
        return PathRule(path, path_type, backend.name, policy)


@dataclass
class _HostRedirect:
    """The HTTPS redirect of one host, decided by the oldest Ingress that says anything about it."""

    redirect: bool | None = None
    forced: bool = False
    owner: str = ""

    def note(
        self, annotations: IngressAnnotations, ingress: str, host: str, location: str, problems: list[Problem]
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


def _default_certificate(index: ObjectIndex, options: TranslateOptions, problems: list[Problem]) -> Certificate | None:
    if options.default_ssl_certificate is None:
        return None
    namespace, name = options.default_ssl_certificate
    try:
        material = load_tls_secret(index.secrets.get((namespace, name)), "the default SSL certificate option")
    except Rejected as rejected:
        problems.append(Problem(f"Secret {namespace}/{name}", f"default SSL certificate: {rejected}"))
        return None
    return material.certificate(hosts=(), origin=f"Secret {namespace}/{name}")
