"""Ingress annotations → `RoutePolicy` and `Canary`, and the table of supported keys.

Part of `ingress_watch.translate` (its theory of operation states the rules); pure, no I/O."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from config.model import Affinity, Canary, Cors, HeaderEdits, IpNetwork, Problem, Redirect, RoutePolicy
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
    check_weight,
    check_weight_total,
    check_positive,
    check_token_list,
    header_edits,
    parse_header_lines,
    parse_size,
    parse_timeout,
    split_list,
)
from ingress_watch.header_configmaps import configmap_headers, configmap_reference, merged_edits, set_edits
from ingress_watch.objects import ObjectIndex, Rejected, object_metadata, object_namespace, parse_bool

# ingress-nginx keys under `nginx.ingress.kubernetes.io/`, and the same names under
# `ingress.kubernetes.io/` (haproxy-ingress's legacy prefix, which this controller read first).
# Every key under those prefixes that is not in SUPPORTED_ANNOTATIONS, and every value that is
# refused, is a Problem on the Ingress (a Warning Event, a log line and the problems gauge); a
# refused value leaves the Ingress served without that key's effect, except where serving
# without it would open what the user meant to close (a bad source range, body size or regex),
# where the Ingress's paths are left out instead.

_T = TypeVar("_T")
NGINX_PREFIX = "nginx.ingress.kubernetes.io/"
ANNOTATION_PREFIXES = (NGINX_PREFIX, "ingress.kubernetes.io/")
# SUPPORTED_ANNOTATIONS (the table, beside SUPPORTED_CONFIGMAP_KEYS) says what each key does.


@dataclass(frozen=True)
class IngressAnnotations:
    """What an Ingress's annotations ask for; `policy_for(path)` checks what depends on the path."""

    ssl_redirect: bool | None = None
    force_ssl_redirect: bool = False
    policy: RoutePolicy | None = None
    refusal: str | None = None  # set: a value whose absence would serve too much; paths are skipped
    rewrite_key: str = ""  # the rewrite-target annotation as written, for messages

    def policy_for(self, path: str) -> RoutePolicy | None:
        if self.refusal is not None:
            raise Rejected(self.refusal)
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


def read_annotations(
    ingress: dict, location: str, problems: list[Problem], default_policy: RoutePolicy | None, index: ObjectIndex
) -> IngressAnnotations:
    values: dict[str, str] = {}
    keys: dict[str, str] = {}  # name → the annotation key as written, for messages
    for key, value in sorted((object_metadata(ingress).get("annotations") or {}).items()):
        prefix = next((prefix for prefix in ANNOTATION_PREFIXES if key.startswith(prefix)), None)
        if prefix is None:
            continue  # someone else's annotation (kubectl, cert-manager, ...)
        name = key[len(prefix):]
        if name in TRANSPORT_ANNOTATIONS:
            continue  # how the backend is reached: `transport_annotations` reads (and checks) these
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
    reader = AnnotationReader(values, keys, location, problems)
    fields: dict[str, object] = {}
    if default_policy is not None and default_policy.max_body_size is not None:
        fields["max_body_size"] = default_policy.max_body_size
    refusal = None
    refusing_checks: tuple[tuple[str, Callable[[str], object]], ...] = (
        ("whitelist-source-range", source_networks), ("allowlist-source-range", source_networks),
        ("denylist-source-range", source_networks), ("proxy-body-size", parse_size),
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
        ("use-regex", "regex", parse_bool),
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
    if reader.read("enable-cors", parse_bool):
        fields["cors"] = reader.read_cors()
    custom = reader.read("custom-headers", lambda raw: configmap_reference(raw, object_namespace(ingress)))
    custom_edits = None
    if custom is not None:
        pairs = configmap_headers(index, custom, False, f"annotation {keys['custom-headers']}", location, problems)
        custom_edits = set_edits(pairs)
    for direction in ("request", "response"):
        own = reader.read_edits(direction)
        if direction == "response":
            own = merged_edits(custom_edits, own)  # the Ingress's own response-*-headers win
        base = None if default_policy is None else getattr(default_policy, f"{direction}_headers")
        edits = merged_edits(base, own)  # ConfigMap add-headers / proxy-set-headers, under the Ingress's
        if edits is not None:
            fields[f"{direction}_headers"] = edits
    policy = RoutePolicy(**fields)  # type: ignore[arg-type]
    forced = reader.read("force-ssl-redirect", parse_bool)
    ssl_redirect = reader.read("ssl-redirect", parse_bool)
    return IngressAnnotations(
        ssl_redirect=True if forced else ssl_redirect,
        force_ssl_redirect=bool(forced),
        policy=policy if policy != RoutePolicy() else None,  # no policy: today's path, no per-request work
        refusal=refusal,
        rewrite_key=keys.get("rewrite-target", ""),
    )


@dataclass
class AnnotationReader:
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
        except (PolicyValueError, Rejected) as error:
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
        credentials = self.read("cors-allow-credentials", parse_bool)
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


def read_canary(ingress: dict, location: str, problems: list[Problem]) -> Canary | None:
    """The canary an Ingress declares (backend filled in per path), or None for a main Ingress."""
    values: dict[str, str] = {}
    keys: dict[str, str] = {}
    for key, value in (object_metadata(ingress).get("annotations") or {}).items():
        for prefix in ANNOTATION_PREFIXES:
            if key.startswith(prefix) and key[len(prefix):].startswith("canary"):
                values[key[len(prefix):]], keys[key[len(prefix):]] = str(value), key
    reader = AnnotationReader(values, keys, location, problems)
    if not reader.read("canary", parse_bool):
        return None
    for key in sorted(object_metadata(ingress).get("annotations") or {}):
        ours = next((written for written in ANNOTATION_PREFIXES if key.startswith(written)), None)
        if ours is not None and key[len(ours):] not in CANARY_ANNOTATIONS:
            problems.append(Problem(location, (
                f"annotation {key} is ignored on a canary Ingress (only {', '.join(sorted(CANARY_ANNOTATIONS))} "
                "apply; the main Ingress's policy serves both); move it to the main Ingress or remove it"
            )))
    total = reader.read("canary-weight-total", check_weight_total) or 100
    weight = reader.read("canary-weight", lambda raw: check_weight(raw, total))
    return Canary(
        backend="",
        weight=weight or 0,
        weight_total=total,
        header=reader.read("canary-by-header", lambda raw: check_header_edit(raw.strip(), None, request=True)),
        header_value=reader.read("canary-by-header-value", lambda raw: raw),
        cookie=reader.read("canary-by-cookie", lambda raw: check_cookie_name(raw.strip())),
    )


def _check_affinity_mode(raw: str) -> bool:
    if str(raw).strip() != "cookie":
        raise PolicyValueError(f"affinity {raw!r} is not an affinity kind", 'write "cookie" (the only one ingress-nginx has)')
    return True


def source_networks(raw: str) -> tuple[IpNetwork, ...]:
    return parse_networks(split_list(raw))


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
    "canary-weight": "requests sent to the canary, out of canary-weight-total (0-100 by default)",
    "canary-weight-total": "the denominator of canary-weight (default 100; 1000 gives tenths of a percent)",
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
    "auth-tls-secret": "namespace/name (or name) of a Secret in the Ingress's namespace whose ca.crt verifies client certificates for its hosts",
    "auth-tls-verify-client": "on (default: a valid certificate required, else 400), optional, optional_no_ca or off",
    "auth-tls-verify-depth": "intermediates allowed between the client's certificate and a CA of the Secret (default 1, OpenSSL's verify depth)",
    "auth-tls-pass-certificate-to-upstream": "also send the client's certificate upstream in ssl-client-cert (URL-escaped PEM)",
    "auth-tls-error-page": "redirect (302) a request refused for its client certificate here instead of answering 400",
    "auth-tls-match-cn": "a regex searched in the client certificate's subject DN (RFC 2253, as ssl-client-subject-dn); no match → 403",
    "custom-headers": "namespace/name of a ConfigMap whose data are response headers set on every response of the Ingress",
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
# How the backend is reached (README: Backends over TLS and HTTP/2), read by `transport_annotations`
# under NGINX_PREFIX or HAPROXY_PREFIXES (the legacy `ingress.kubernetes.io/` is both projects').
TRANSPORT_ANNOTATIONS = frozenset((
    "backend-protocol", "proxy-ssl-secret", "proxy-ssl-verify", "proxy-ssl-name", "proxy-ssl-server-name",
    "secure-backends", "secure-verify-ca-secret",
))  # fmt: skip
