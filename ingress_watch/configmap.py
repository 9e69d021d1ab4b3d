"""The controller's ConfigMap → global settings (timeouts, HSTS, TLS policy, crypto, defaults),
and the table of supported keys.

Part of `ingress_watch.translate` (its theory of operation states the rules); pure, no I/O."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from config.crypto import ALGORITHM_FLAGS
from config.model import (
    CryptoSettings,
    EngineSettings,
    HeaderEdits,
    Hsts,
    IpNetwork,
    Problem,
    ProviderSettings,
    RealIp,
    RoutePolicy,
    Timeouts,
    TlsPolicy,
)
from config.route_policy import PolicyValueError, parse_size
from config.tls_policy import PolicyError, check_ciphers, check_ciphersuites, check_curves, check_protocols
from ingress_watch.annotations import source_networks
from ingress_watch.header_configmaps import configmap_headers, configmap_reference, set_edits
from ingress_watch.objects import ObjectIndex, Rejected, object_namespace, object_ref, parse_bool

DURATION_MICROSECONDS = {"us": 1, "ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
DURATION = re.compile(r"(\d+)(us|ms|s|m|h|d)?")



@dataclass(frozen=True)
class GlobalSettings:
    crypto: CryptoSettings = CryptoSettings()
    timeouts: Timeouts = Timeouts()
    hsts: Hsts | None = None
    ssl_redirect: bool = False
    tls_policy: TlsPolicy = TlsPolicy()
    default_policy: RoutePolicy | None = None  # what every Ingress path gets unless its annotations say otherwise
    real_ip: RealIp | None = None
    proxy_protocol: tuple[str, ...] = ()  # listener names: use-proxy-protocol applies to all (https, http)


def _parse_duration(raw: str) -> float:
    match = DURATION.fullmatch(str(raw).strip())
    if match is None:
        raise Rejected(f"{raw!r} is not a duration; use an integer and a unit (us, ms, s, m, h, d) like 500ms, 5s, 1m")
    seconds = int(match[1]) * DURATION_MICROSECONDS[match[2] or "ms"] / 1_000_000
    if seconds <= 0:
        raise Rejected(f"{raw!r} must be greater than zero")
    return seconds


def _parse_seconds(raw: str) -> int:
    value = str(raw).strip()
    if not value.isdigit():
        raise Rejected(f"{raw!r} is not a whole number of seconds")
    return int(value)


def _parse_engine(raw: str) -> EngineSettings | None:
    words = str(raw).split()
    if not words:
        return None
    if len(words) == 1:
        return EngineSettings(id=words[0])
    if len(words) != 3 or words[1] != "algo":
        raise Rejected(f"{raw!r} is not '<engine-id>' or '<engine-id> algo <ALG,...>' (e.g. qatengine algo RSA,EC)")
    algorithms = tuple(name.strip().upper() for name in words[2].split(",") if name.strip())
    unknown = sorted(set(algorithms) - set(ALGORITHM_FLAGS))
    if unknown or not algorithms:
        raise Rejected(
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
        raise Rejected(f"{bad[0]!r} is not a provider name; list names like \"pkcs11\" or \"qatprovider\"")
    if len(set(names)) != len(names):
        raise Rejected("a provider is listed twice; list each once")
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
            raise Rejected(
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
SUPPORTED_CONFIGMAP_KEYS = (  # sorted: the unknown-key message lists them
    "add-headers", "compute-full-forwarded-for", "hsts", "hsts-include-subdomains", "hsts-max-age",
    "hsts-preload", "proxy-body-size", "proxy-real-ip-cidr", "proxy-set-headers", "ssl-ciphers",
    "ssl-ciphersuites", "ssl-ecdh-curve", "ssl-engine", "ssl-mode-async", "ssl-propquery", "ssl-protocols",
    "ssl-provider", "ssl-provider-optional", "ssl-provider-parameters", "ssl-provider-path", "ssl-redirect",
    "timeout-client", "timeout-connect", "timeout-http-request", "timeout-server", "use-forwarded-headers",
    "use-http2", "use-proxy-protocol",
)


def _policy_check(check: Callable[[str], _T]) -> Callable[[str], _T]:
    """`check` (a config.tls_policy or config.route_policy check) raising our Rejected instead."""

    def parse(raw: str) -> _T:
        try:
            return check(str(raw))
        except (PolicyError, PolicyValueError) as error:
            raise Rejected(str(error)) from None

    return parse


def _parse_curves(raw: str) -> str:
    return TlsPolicy().curves if str(raw).strip() == "auto" else check_curves(str(raw))  # ingress-nginx's default value


def read_configmap(index: ObjectIndex, problems: list[Problem]) -> GlobalSettings:
    configmap = index.configmap
    if configmap is None:
        return GlobalSettings()
    location = f"ConfigMap {object_ref(configmap)}"
    data = configmap.get("data") or {}

    def read(key: str, parse: Callable[[str], _T], default: _T) -> _T:
        if key not in data:
            return default
        try:
            return parse(data[key])
        except Rejected as rejected:
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
        async_mode=read("ssl-mode-async", parse_bool, False),
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
        include_subdomains=read("hsts-include-subdomains", parse_bool, hsts_defaults.include_subdomains),
        preload=read("hsts-preload", parse_bool, hsts_defaults.preload),
    )
    enabled_hsts = hsts if read("hsts", parse_bool, False) else None
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
        alpn=policy_defaults.alpn if read("use-http2", parse_bool, True) else ("http/1.1",),  # ingress-nginx's key
    )
    ssl_redirect = read("ssl-redirect", parse_bool, False)
    body_size = read("proxy-body-size", _policy_check(parse_size), None)  # default: no limit (README)
    header_sets: dict[bool, HeaderEdits | None] = {}  # request? → what the ConfigMap it names sets
    for key, request in (("proxy-set-headers", True), ("add-headers", False)):  # ingress-nginx: namespace/name
        reference = read(key, _policy_check(lambda raw: configmap_reference(raw, object_namespace(configmap))), None)
        if reference is not None:
            header_sets[request] = set_edits(configmap_headers(index, reference, request, key, location, problems))
    policy = RoutePolicy(max_body_size=body_size, request_headers=header_sets.get(True), response_headers=header_sets.get(False))
    default_policy = policy if policy != RoutePolicy() else None
    real_ip = None
    compute_full = read("compute-full-forwarded-for", parse_bool, False)
    proxy_protocol = ("https", "http") if read("use-proxy-protocol", parse_bool, False) else ()
    if read("use-forwarded-headers", parse_bool, False):  # ingress-nginx: trusted from proxy-real-ip-cidr
        trusted = read("proxy-real-ip-cidr", _policy_check(source_networks), INGRESS_NGINX_REAL_IP_CIDR)
        real_ip = RealIp(trusted, compute_full_forwarded_for=compute_full)
        if proxy_protocol and trusted == INGRESS_NGINX_REAL_IP_CIDR:
            problems.append(Problem(location, (
                "use-forwarded-headers with use-proxy-protocol: every PROXY header's source is trusted to set "
                "X-Forwarded-For, so any client can claim an address; set proxy-real-ip-cidr to the L7 proxies "
                "in front of the balancer, or drop use-forwarded-headers"
            )))
    elif compute_full:
        problems.append(Problem(location, (
            "compute-full-forwarded-for: has no effect without use-forwarded-headers: \"true\" (an untrusted "
            "client's X-Forwarded-For is replaced, never appended to); set both, or drop it"
        )))
    return GlobalSettings(crypto, timeouts, enabled_hsts, ssl_redirect, tls_policy, default_policy, real_ip, proxy_protocol)

