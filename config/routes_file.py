"""The routes file (YAML, the standalone user contract) → listeners + `Configuration`.

Theory of operation. The file is *composed*, not constructed: `yaml.compose` returns the node
tree with a start mark on every node, so each problem can name FILE:LINE:COL of the token at
fault. A single `_Checker` walks the tree section by section, converting nodes to model values
and appending a `Problem` for everything wrong instead of stopping; only when the walk is over
are the problems (sorted by position) raised together as one `RoutesFileError`, one line each:
"FILE:LINE:COL: where: what is wrong (how to fix it)". The walk avoids cascades: a part that
fails yields None and checks depending on it are skipped, and a backend whose endpoints are bad
still counts as defined, so routes naming it are not reported again.

Decisions a user can observe (documented in examples/routes.yaml too):
- Scalars are read as typed by YAML 1.1: a string field takes any non-null scalar exactly as
  written (`id: 1234` is the text "1234"), a boolean field only a YAML boolean, a number field
  only an int or float. Duplicate mapping keys are problems (PyYAML would keep the last one).
- Two `routes` entries with the same host are merged into one VirtualHost, paths concatenated in
  file order; giving them different `redirect_to_https` values is a problem. The same
  (host, path, type) twice is a problem. Virtual hosts and backends keep file order. Every path
  starts with '/', ImplementationSpecific ones too: they are matched like Prefix.
- Hosts are lower-cased; a port, a trailing dot or a wildcard anywhere but as the whole leftmost
  label is a problem. A certificate without `hosts:` serves its subjectAltName DNS names.
- Listener and endpoint addresses are `host:port` with IPv6 in brackets; IP literals are stored
  in canonical form so `[::0001]:80` and `[::1]:80` are the same endpoint. Two listeners clash
  on the same port when their hosts are equal or either is 0.0.0.0 / [::].
- A PEM key is read from its file (PKCS#1, SEC1 or PKCS#8, unencrypted) and must match the
  certificate's public key. `key: "engine:<URI>"` becomes `EngineKey(URI)` and reads no file; a
  PIN from `pin_env`/`pin_file` is appended as `;pin-value=<PIN, percent-encoded>` in memory.
  `key: "pkcs11:<RFC 7512 URI>"` becomes `StoreKey(URI, PIN)`, opened through a provider's
  OSSL_STORE, and so does `key: "<name>:..."` for a provider <name> in `tls.providers` (a provider
  that holds keys under its own scheme, like the test suite's async fixture provider). A pkcs11:
  key needs a provider in `tls.providers` other than OpenSSL's own, and its PIN
  (pin_env/pin_file, or a pin-value taken out of the URI) travels beside the URI, not in it.
- `tls.providers` lists names or {name, module, parameters} mappings, each name once; config.crypto
  activates them with `default` first. Whether a key matches its certificate is checked for files
  here and for token keys by `ingress-proxy check`, which asks the token.
  Messages never contain key bytes, PINs or engine key URIs (which may carry a PIN). The chain,
  key, key-match, host and SAN checks are `config.tls_material`'s, shared with the translator.
- TLS policy (`tls.min_version`, `max_version`, `ciphers`, `ciphersuites`, `curves`, `alpn`):
  each list is a string in OpenSSL's syntax ("A:B") or a YAML list of names; every name is
  tried on a throwaway OpenSSL context (`config.tls_policy`, shared with the ConfigMap), so an
  unknown name is a located problem, never silently dropped. Omitted keys keep the defaults
  (Mozilla intermediate, `config.model.TlsPolicy`).
- Backends over TLS and HTTP/2 (issue 12): `protocol: http | https | h2c | h2` (h2c and h2 are
  HTTP/2, for gRPC; https and h2 are over TLS) plus, for the TLS ones, an optional `tls:` mapping — `ca` (PEM
  bundle; giving one turns `verify` on), `verify`, `server_name` (SNI and the name verified;
  default: the endpoint's host), `sni: false`, and `cert` + `key` (+ `pin_env`/`pin_file`, engine
  keys too) for a client certificate. `tls:` on a plain-HTTP backend, `verify: false` beside a
  `ca`, or a `cert` without its `key` are problems: nothing is silently dropped.
- OCSP: a certificate entry's `ocsp:` names a DER response file; without it, `<cert>.ocsp` is used
  when it exists (HAProxy's convention). It is read with the certificate on every load and checked
  against it when contexts are built (`proxy.stapling`): a response that does not fit is not stapled.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import pathlib
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import yaml

from config import client_auth as client_auth_rules
from config.crypto import ALGORITHM_FLAGS, ENGINE_KEY_PREFIX, split_pin
from config.model import (
    Address,
    Affinity,
    Backend,
    BackendProtocol,
    Canary,
    Certificate,
    ClientAuth,
    ClientCertificate,
    ClientVerify,
    Configuration,
    Cors,
    CryptoSettings,
    EngineKey,
    EngineSettings,
    HeaderEdits,
    Hsts,
    IpNetwork,
    KeySource,
    Listeners,
    PathRule,
    PathType,
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
    TlsVersion,
    UpstreamTls,
    VirtualHost,
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
    check_weight,
    check_weight_total,
    check_positive,
    check_token_list,
    header_edits,
    parse_size,
    parse_timeout,
)
from config.route_rules import HostTable, RuleError, check_path, parse_path_type
from config.tls_policy import (
    PolicyError,
    check_alpn,
    check_ciphers,
    check_ciphersuites,
    check_curves,
    check_policy,
    check_version,
)
from config.tls_material import (
    CertificateChain,
    CertificateParseError,
    EncryptedKeyError,
    HostPatternError,
    KeyParseError,
    NoCertificateError,
    PrivateKey,
    is_dns_name,
    is_ip_address,
    key_matches_certificate,
    parse_certificate_chain,
    parse_host_pattern,
    parse_private_key,
    san_host_patterns,
)

_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_SCALARS = yaml.constructor.SafeConstructor()  # only its stateless scalar converters are used
_TAG_NULL = "tag:yaml.org,2002:null"
_TAG_BOOL = "tag:yaml.org,2002:bool"
_TAG_INT = "tag:yaml.org,2002:int"
_TAG_FLOAT = "tag:yaml.org,2002:float"

# Known keys per section, in the order the hint lists them.
_TOP_KEYS = (
    "listen", "tls", "timeouts", "hsts", "access_log", "trusted_proxies", "compute_full_forwarded_for", "routes",
    "default_backend", "backends",
)
_LISTEN_KEYS = ("https", "http", "admin")
_LISTENER_KEYS = ("address", "proxy_protocol")  # `https: {address: ..., proxy_protocol: true}`
_TLS_POLICY_KEYS = ("min_version", "max_version", "ciphers", "ciphersuites", "curves", "alpn")
_TLS_KEYS = (
    "certificates", "default_certificate", "engine", "async", "providers", "propquery", "provider_path",
    "session_resumption",
) + _TLS_POLICY_KEYS
_PROVIDER_KEYS = ("name", "module", "parameters", "required")
_PROVIDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # an openssl.cnf section key
_CERTIFICATE_KEYS = ("cert", "key", "hosts", "pin_env", "pin_file", "ocsp")
_DEFAULT_CERTIFICATE_KEYS = ("cert", "key", "pin_env", "pin_file", "ocsp")
OCSP_SUFFIX = ".ocsp"  # HAProxy's name for the DER response beside a certificate file
_ENGINE_KEYS = ("id", "so_path", "ctrl", "algorithms", "required")
_TIMEOUT_KEYS = tuple(field.name for field in dataclasses.fields(Timeouts))
_HSTS_KEYS = ("max_age", "include_subdomains", "preload")
_ACCESS_LOG_KEYS = ("json",)
_ROUTE_KEYS = ("host", "redirect_to_https", "hsts", "client_auth", "policy", "paths")
_CLIENT_AUTH_KEYS = ("ca", "verify", "depth", "pass_certificate", "error_page", "match_subject")
_POLICY_KEYS = (
    "allow_sources", "deny_sources", "redirect", "app_root", "max_body_size", "regex", "rewrite_target", "forwarded_prefix",
    "connect_timeout", "read_timeout", "send_timeout", "request_headers", "response_headers", "upstream_host", "cors",
    "limit_rps", "limit_burst", "limit_connections", "canary", "affinity",
)
_AFFINITY_KEYS = ("cookie_name", "max_age", "path")
_CANARY_KEYS = ("backend", "weight", "weight_total", "header", "header_value", "cookie")
_CORS_KEYS = ("allow_origins", "allow_methods", "allow_headers", "expose_headers", "allow_credentials", "max_age")
_HEADER_EDIT_KEYS = ("set", "add", "remove")
_REDIRECT_KEYS = ("to", "code")
_PATH_KEYS = ("path", "type", "backend")
_BACKEND_KEYS = ("endpoints", "protocol", "tls")
_BACKEND_TLS_KEYS = ("ca", "verify", "server_name", "sni", "cert", "key", "pin_env", "pin_file")
_BACKEND_PROTOCOLS = {protocol.value: protocol for protocol in BackendProtocol}

_URI_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*:[^/\\]", re.IGNORECASE)
_UNQUOTED_IPV6 = re.compile(r"(?<![\"'])\[[0-9a-f.]*:[0-9a-f:.%]*\]", re.IGNORECASE)
_LOOKS_NUMERIC = re.compile(r"[0-9.]+")  # "127.0.0.01" is a mistyped IP, not a host name
_UNSPECIFIED_HOSTS = frozenset({"0.0.0.0", "::"})
_V = TypeVar("_V")
PKCS11_URI_SCHEME = "pkcs11:"  # RFC 7512 key URIs: opened by a provider's OSSL_STORE (pkcs11-provider)
_OPENSSL_OWN_PROVIDERS = frozenset({"default", "base", "legacy", "fips", "null"})


@dataclass(frozen=True)
class LoadedRoutes:
    listeners: Listeners
    configuration: Configuration


class _Refused:
    """A `policy:` block that had problems: its paths are checked but routed nowhere."""


_REFUSED = _Refused()


class RoutesFileError(Exception):
    """Everything wrong with one routes file; str() is one "FILE:LINE:COL: message" per line."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


def load_routes_file(path: pathlib.Path) -> LoadedRoutes:
    """Read, check and convert the routes file at `path`; raise RoutesFileError listing ALL problems."""
    checker = _Checker(path)
    try:
        text = path.read_bytes()
    except OSError as error:
        raise RoutesFileError(
            [Problem(str(path), f"cannot read the routes file: {error.strerror} (check the path and permissions)")]
        ) from None
    try:
        root = yaml.compose(text, Loader=_YAML_LOADER)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        location = checker.location_of_mark(mark) if mark else str(path)
        context = f" {error.context}" if error.context else ""
        lines = text.decode("utf-8", errors="replace").splitlines()
        line = lines[mark.line] if mark and mark.line < len(lines) else ""
        fix = 'quote IPv6 addresses: "[::1]:8443"' if _UNQUOTED_IPV6.search(line) else "fix the YAML at this position"
        raise RoutesFileError([Problem(location, f"YAML syntax error: {error.problem}{context} ({fix})")]) from None
    except yaml.YAMLError as error:
        raise RoutesFileError([Problem(str(path), f"not readable as YAML: {error} (save it as UTF-8 text)")]) from None
    return checker.load(root)


class _Checker:
    """One pass over a composed routes file; collects problems, returns model values or None."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.base_directory = path.parent
        self._problems: list[tuple[int, int, Problem]] = []
        self.store_provider_configured = False  # tls.providers names one that opens key URIs
        self.provider_schemes: frozenset[str] = frozenset()  # `<provider name>:` keys go to its store

    # ---- the document -------------------------------------------------------------------------

    def load(self, root: yaml.Node | None) -> LoadedRoutes:
        if root is None:
            raise RoutesFileError(
                [Problem(f"{self.path}:1:1", "the file is empty (start with listen: {https: 127.0.0.1:8443})")]
            )
        fields = self.mapping(root, "top level", _TOP_KEYS, required={"listen": "listen: {https: 127.0.0.1:8443}"})
        if fields is None:
            raise RoutesFileError(self.sorted_problems())
        listeners, proxy_protocol = self.listeners(fields["listen"]) if "listen" in fields else (None, ())
        backends, defined_backends = self.backends(fields.get("backends"), _has_key(fields.get("tls"), "engine"))
        virtual_hosts = self.routes(fields["routes"], defined_backends) if "routes" in fields else ()
        default_backend = None
        if "default_backend" in fields:
            default_backend = self.backend_reference(fields["default_backend"], "default_backend", defined_backends)
        certificates: tuple[Certificate, ...] = ()
        default_certificate, crypto, session_resumption = None, CryptoSettings(), True
        tls_policy = TlsPolicy()
        if "tls" in fields:
            certificates, default_certificate, crypto, session_resumption = self.tls(fields["tls"])
            tls_policy = self.tls_policy(fields["tls"])
        timeouts = self.timeouts(fields["timeouts"]) if "timeouts" in fields else Timeouts()
        hsts = self.hsts(fields["hsts"]) if "hsts" in fields else None
        access_log_json = self.access_log_json(fields["access_log"]) if "access_log" in fields else False
        real_ip = None
        compute_full = "compute_full_forwarded_for" in fields and self.flag(
            fields["compute_full_forwarded_for"], "compute_full_forwarded_for"
        )
        if compute_full and "trusted_proxies" not in fields:
            self.report(
                fields["compute_full_forwarded_for"],
                "compute_full_forwarded_for: needs trusted_proxies (an untrusted client's X-Forwarded-For is "
                "always replaced; add trusted_proxies: [CIDR, ...] naming the load balancers in front)",
            )
        if "trusted_proxies" in fields and (trusted := self.networks(fields["trusted_proxies"], "trusted_proxies")):
            real_ip = RealIp(trusted, compute_full_forwarded_for=bool(compute_full))
        problems = self.sorted_problems()
        if problems or listeners is None:
            raise RoutesFileError(problems)
        configuration = Configuration(
            routes=RouteTable(virtual_hosts=virtual_hosts, backends=backends, default_backend=default_backend),
            certificates=certificates,
            default_certificate=default_certificate,
            crypto=crypto,
            timeouts=timeouts,
            hsts=hsts,
            access_log_json=access_log_json,
            session_resumption=session_resumption,
            tls_policy=tls_policy,
            real_ip=real_ip,
            proxy_protocol=proxy_protocol,
        )
        return LoadedRoutes(listeners=listeners, configuration=configuration)

    # ---- listen -------------------------------------------------------------------------------

    def listeners(self, node: yaml.Node) -> tuple[Listeners | None, tuple[str, ...]]:
        """The listeners, and the names of those that require a PROXY protocol header."""
        fields = self.mapping(node, "listen", _LISTEN_KEYS, required={"https": "https: 127.0.0.1:8443"})
        if fields is None:
            return None, ()
        found: dict[str, Address] = {}
        proxy_protocol: list[str] = []
        for name in _LISTEN_KEYS:
            if name not in fields:
                continue
            address_node: yaml.Node | None = fields[name]
            if isinstance(address_node, yaml.MappingNode):
                address_node = self.listener_options(address_node, name, proxy_protocol)
            address = self.address(address_node, f"listen.{name}") if address_node is not None else None
            if address is None:
                continue
            for other_name, other in found.items():
                if _listeners_clash(address, other):
                    self.report(
                        fields[name],
                        f"listen.{name}: {address} clashes with listen.{other_name} ({other}) "
                        "(give each listener its own port)",
                    )
            found[name] = address
        if "https" not in found:
            return None, ()
        return Listeners(https=found["https"], http=found.get("http"), admin=found.get("admin")), tuple(proxy_protocol)

    def listener_options(self, node: yaml.MappingNode, name: str, proxy_protocol: list[str]) -> yaml.Node | None:
        """`listen.<name>: {address: ..., proxy_protocol: true}`: the address node; the name joins
        `proxy_protocol` when its connections must start with a PROXY protocol header."""
        where = f"listen.{name}"
        fields = self.mapping(node, where, _LISTENER_KEYS, required={"address": 'address: "127.0.0.1:8443"'})
        if fields is None:
            return None
        if "proxy_protocol" in fields and self.flag(fields["proxy_protocol"], f"{where}.proxy_protocol"):
            if name == "admin":
                self.report(fields["proxy_protocol"], f"{where}.proxy_protocol: only the https and http listeners "
                            "read a PROXY protocol header (remove it here; metrics are scraped directly)")
            else:
                proxy_protocol.append(name)
        return fields.get("address")

    def address(self, node: yaml.Node, where: str) -> Address | None:
        if isinstance(node, yaml.SequenceNode):  # `https: [::1]:8443` is a YAML list, then a syntax error
            self.report(node, f"""{where}: expected "host:port", got a list (quote IPv6 addresses: "[::1]:8443")""")
            return None
        text = self.text(node, where)
        if text is None:
            return None
        try:
            return _parse_address(text)
        except ValueError as error:
            self.report(node, f"{where}: {error}")
            return None

    # ---- backends and routes ------------------------------------------------------------------

    def backends(self, node: yaml.Node | None, engine_configured: bool) -> tuple[tuple[Backend, ...], set[str]]:
        """The backends that are fully valid, and the names of all defined (even broken) ones."""
        if node is None:
            return (), set()
        entries = self.mapping(node, "backends", known=None)
        if entries is None:
            return (), set()
        backends: list[Backend] = []
        for name, value in entries.items():
            where = f"backends.{name}"
            fields = self.mapping(value, where, _BACKEND_KEYS, required={"endpoints": 'endpoints: ["127.0.0.1:9001"]'})
            if fields is None or "endpoints" not in fields:
                continue
            items = self.sequence(fields["endpoints"], f"{where}.endpoints")
            if items is None:
                continue
            if not items:
                self.report(fields["endpoints"], f'{where}.endpoints: the list is empty (add at least one "host:port")')
                continue
            endpoints: list[Address] = []
            for index, item in enumerate(items):
                endpoint = self.address(item, f"{where}.endpoints[{index}]")
                if endpoint is None:
                    continue
                if endpoint in endpoints:
                    self.report(item, f"{where}.endpoints[{index}]: {endpoint} is listed twice (remove one)")
                    continue
                endpoints.append(endpoint)
            transport = self.backend_transport(fields, where, engine_configured)
            if transport is None:
                continue
            protocol, tls = transport
            backends.append(Backend(name=name, endpoints=tuple(endpoints), protocol=protocol, tls=tls))
        return tuple(backends), set(entries)

    def backend_transport(
        self, fields: Mapping[str, yaml.Node], where: str, engine_configured: bool
    ) -> tuple[BackendProtocol, UpstreamTls | None] | None:
        """A backend's `protocol` and `tls` keys; None when either is wrong (reported)."""
        protocol = BackendProtocol.HTTP
        if "protocol" in fields:
            text = self.text(fields["protocol"], f"{where}.protocol")
            if text is None:
                return None
            if text.lower() not in _BACKEND_PROTOCOLS:
                self.report(
                    fields["protocol"], f"{where}.protocol: unknown protocol '{text}' (use {', '.join(_BACKEND_PROTOCOLS)})"
                )
                return None
            protocol = _BACKEND_PROTOCOLS[text.lower()]
        if "tls" in fields and not protocol.uses_tls:
            self.report(
                fields["tls"], f"{where}.tls: the backend speaks {protocol.value}, not TLS (set protocol: https or h2, or remove tls)"
            )
            return None
        if not protocol.uses_tls:
            return protocol, None
        if "tls" not in fields:
            return protocol, UpstreamTls()
        tls = self.upstream_tls(fields["tls"], f"{where}.tls", engine_configured)
        return (protocol, tls) if tls is not None else None

    def upstream_tls(self, node: yaml.Node, where: str, engine_configured: bool) -> UpstreamTls | None:
        fields = self.mapping(node, where, _BACKEND_TLS_KEYS)
        if fields is None:
            return None
        usable = True
        ca_pem = None
        if "ca" in fields:
            chain = self.certificate_chain(fields["ca"], f"{where}.ca")
            usable = chain is not None
            ca_pem = chain.pem if chain is not None else None
        verify = "ca" in fields  # verification is on whenever a CA is given
        if "verify" in fields:
            flag = self.flag(fields["verify"], f"{where}.verify")
            if flag is False and "ca" in fields:
                self.report(
                    fields["verify"],
                    f"{where}.verify: false would ignore the ca given beside it (remove verify, or remove ca)",
                )
                usable = False
            verify = flag if flag is not None else verify
            usable = usable and flag is not None
        server_name = None
        if "server_name" in fields:
            server_name = self.text(fields["server_name"], f"{where}.server_name")
            if server_name is not None and not (is_dns_name(server_name.lower()) or is_ip_address(server_name)):
                self.report(
                    fields["server_name"],
                    f"{where}.server_name: '{server_name}' is not a DNS name or IP address (write the name the backend's certificate carries)",
                )
                server_name = None
                usable = False
            elif server_name is not None:
                server_name = server_name.lower()
            usable = usable and server_name is not None
        send_sni = True
        if "sni" in fields:
            flag = self.flag(fields["sni"], f"{where}.sni")
            send_sni = flag is not False
            usable = usable and flag is not None
        client_certificate = None
        if "cert" in fields or "key" in fields:
            client_certificate = self.client_certificate(fields, where, engine_configured)
            usable = usable and client_certificate is not None
        elif "pin_env" in fields or "pin_file" in fields:
            pin_field = "pin_env" if "pin_env" in fields else "pin_file"
            self.report(fields[pin_field], f"{where}.{pin_field}: a PIN needs a client key (add cert and key, or remove {pin_field})")
            usable = False
        if not usable:
            return None
        return UpstreamTls(
            ca_pem=ca_pem, verify=verify, server_name=server_name, send_sni=send_sni, client_certificate=client_certificate
        )

    def client_certificate(self, fields: Mapping[str, yaml.Node], where: str, engine_configured: bool) -> ClientCertificate | None:
        for present, missing, example in (("cert", "key", "key: certs/client.key"), ("key", "cert", "cert: certs/client.pem")):
            if present in fields and missing not in fields:
                self.report(fields[present], f"{where}: a client {present} needs its {missing} (add {example})")
                return None
        chain = self.certificate_chain(fields["cert"], f"{where}.cert")
        key, private_key = self.private_key(fields, where, engine_configured)
        if chain is None or key is None:
            return None
        if private_key is not None and not key_matches_certificate(private_key, chain.leaf):
            self.report(
                fields["key"],
                f"{where}.key: the key does not match the client certificate's public key "
                "(use the key the certificate was issued for)",
            )
            return None
        return ClientCertificate(chain_pem=chain.pem, key=key, origin=self.location(fields["cert"]))

    def backend_reference(self, node: yaml.Node, where: str, defined: set[str]) -> str | None:
        name = self.text(node, where)
        if name is None:
            return None
        if name not in defined:
            close = difflib.get_close_matches(name, sorted(defined), n=1)
            define = f"define it under backends: {{{name}: {{endpoints: [...]}}}}"
            hint = f"did you mean '{close[0]}'?" if close else define
            self.report(node, f"{where}: backend '{name}' is not defined ({hint})")
            return None
        return name

    def routes(self, node: yaml.Node, defined_backends: set[str]) -> tuple[VirtualHost, ...]:
        items = self.sequence(node, "routes")
        if items is None:
            return ()
        table = HostTable()  # which rules are one rule, and who wins: shared with the translator
        redirect_by_host: dict[str, tuple[bool, str]] = {}  # host → (value, where it was set)
        hsts_by_host: dict[str, tuple[Hsts | Literal[False], str]] = {}  # host → (its own HSTS or False for none, where)
        auth_by_host: dict[str, tuple[ClientAuth | None, str]] = {}  # host → (its client auth, where)
        for index, item in enumerate(items):
            where = f"routes[{index}]"
            fields = self.mapping(item, where, _ROUTE_KEYS, required={"paths": "paths: [{path: /, backend: NAME}]"})
            if fields is None:
                continue
            host: str | None = ""
            if "host" in fields:
                host = self.host_pattern(fields["host"], f"{where}.host", allow_any=True)
            redirect = False
            if "redirect_to_https" in fields:
                redirect = self.flag(fields["redirect_to_https"], f"{where}.redirect_to_https") is True
            policy = self.route_policy(fields["policy"], f"{where}.policy", defined_backends) if "policy" in fields else None
            if host is not None:
                redirect_node = fields.get("redirect_to_https", item)
                if host in redirect_by_host and redirect_by_host[host][0] != redirect:
                    first_value, first_location = redirect_by_host[host]
                    self.report(
                        redirect_node,
                        f"{where}.redirect_to_https: {_host_label(host)} already has redirect_to_https: "
                        f"{str(first_value).lower()} at {first_location} (use one value for all entries of a host)",
                    )
                redirect_by_host.setdefault(host, (redirect, self.location(redirect_node)))
                if "hsts" in fields:
                    own: Hsts | Literal[False] = self.hsts(fields["hsts"], f"{where}.hsts") or False
                    if host in hsts_by_host and hsts_by_host[host][0] != own:
                        self.report(fields["hsts"], (
                            f"{where}.hsts: {_host_label(host)} already has another hsts at {hsts_by_host[host][1]} "
                            "(use one value for all entries of a host)"
                        ))
                    hsts_by_host.setdefault(host, (own, self.location(fields["hsts"])))
            if "client_auth" in fields:
                auth_node = fields["client_auth"]
                checked = self.client_auth(auth_node, f"{where}.client_auth")
                if host == "":
                    self.report(auth_node, (
                        f"{where}.client_auth: needs a host (client certificates are asked for by the name a client "
                        "sends as SNI; add host: NAME)"
                    ))
                elif host is not None and not isinstance(checked, _Refused):
                    if host in auth_by_host and auth_by_host[host][0] != checked:
                        self.report(auth_node, (
                            f"{where}.client_auth: {_host_label(host)} already has another client_auth at "
                            f"{auth_by_host[host][1]} (use one value for all entries of a host)"
                        ))
                    auth_by_host.setdefault(host, (checked, self.location(auth_node)))
            if "paths" in fields:  # checked even without a usable host, but then filed nowhere
                self.path_rules(fields["paths"], f"{where}.paths", host, defined_backends, policy, table)
        return table.virtual_hosts(
            {host: value for host, (value, _) in redirect_by_host.items()},
            {host: value for host, (value, _) in hsts_by_host.items()},
            {host: value for host, (value, _) in auth_by_host.items()},
        )

    def path_rules(
        self,
        node: yaml.Node,
        where: str,
        host: str | None,
        defined_backends: set[str],
        policy: RoutePolicy | None | _Refused,
        table: HostTable,
    ) -> None:
        items = self.sequence(node, where)
        if items is None:
            return
        if not items:
            self.report(node, f"{where}: the list is empty (add {{path: /, backend: NAME}})")
            return
        for index, item in enumerate(items):
            item_where = f"{where}[{index}]"
            fields = self.mapping(
                item, item_where, _PATH_KEYS, required={"path": "path: /", "backend": "backend: NAME"}
            )
            if fields is None:
                continue
            path_type: PathType | None = PathType.PREFIX
            if "type" in fields:
                path_type = self.path_type(fields["type"], f"{item_where}.type")
            path = self.text(fields["path"], f"{item_where}.path") if "path" in fields else None
            backend = None
            if "backend" in fields:
                backend = self.backend_reference(fields["backend"], f"{item_where}.backend", defined_backends)
            if path is not None:
                try:
                    check_path(path, path_type or PathType.PREFIX)
                except RuleError as error:
                    message = str(error) if path_type is not None else str(error).replace("Prefix paths", "paths")
                    self.report(fields["path"], f"{item_where}.path: {message}")
                    continue
            if path is None or path_type is None or isinstance(policy, _Refused):
                continue
            if policy is not None:
                try:
                    groups = check_regex(path) if policy.regex else 0
                    if policy.rewrite_target is not None:
                        check_rewrite_target(policy.rewrite_target, groups)
                except PolicyValueError as error:
                    self.report(fields["path"], f"{item_where}.path: {error.problem} ({error.fix})")
                    continue
            if host is None or backend is None:
                continue
            conflict = table.add(host, PathRule(path, path_type, backend, policy), f"the rule at {self.location(item)}")
            if conflict is not None:
                self.report(item, f"{item_where}: {conflict.describe(host)} (remove one, or route them alike)")

    def path_type(self, node: yaml.Node, where: str) -> PathType | None:
        text = self.text(node, where)
        if text is None:
            return None
        try:
            return parse_path_type(text)
        except RuleError as error:
            self.report(node, f"{where}: {error}")
            return None

    # ---- per-route policy (issue 13) ------------------------------------------------------------

    def route_policy(self, node: yaml.Node, where: str, defined_backends: set[str]) -> RoutePolicy | None | _Refused:
        """A route entry's `policy:` → RoutePolicy (None when it asks for nothing); _Refused after
        a problem, so its paths are checked but not routed (the file is refused anyway)."""
        fields = self.mapping(node, where, _POLICY_KEYS)
        if fields is None:
            return _REFUSED
        before = len(self._problems)
        values: dict[str, Any] = {}
        for name in ("allow_sources", "deny_sources"):
            if name in fields:
                values[name] = self.networks(fields[name], f"{where}.{name}")
        if "redirect" in fields:
            values["redirect"] = self.redirect(fields["redirect"], f"{where}.redirect")
        for name in ("app_root", "forwarded_prefix"):
            if name in fields and (text := self.text(fields[name], f"{where}.{name}")) is not None:
                values[name] = self.checked(fields[name], f"{where}.{name}", check_path_value, text, name)
        if "max_body_size" in fields and (size := self.text(fields["max_body_size"], f"{where}.max_body_size")) is not None:
            values["max_body_size"] = self.checked(fields["max_body_size"], f"{where}.max_body_size", parse_size, size)
        if "regex" in fields:
            values["regex"] = self.flag(fields["regex"], f"{where}.regex") is True
        for name in ("connect_timeout", "read_timeout", "send_timeout"):
            if name in fields and (seconds := self.number(fields[name], f"{where}.{name}")) is not None:
                values[name] = self.checked(fields[name], f"{where}.{name}", parse_timeout, seconds)
        if "rewrite_target" in fields:
            values["rewrite_target"] = self.text(fields["rewrite_target"], f"{where}.rewrite_target")
        for name in ("request_headers", "response_headers"):
            if name in fields:
                values[name] = self.header_edits(fields[name], f"{where}.{name}", request=name == "request_headers")
        if "upstream_host" in fields and (host := self.text(fields["upstream_host"], f"{where}.upstream_host")) is not None:
            values["upstream_host"] = self.checked(fields["upstream_host"], f"{where}.upstream_host", check_host_value, host)
        if "cors" in fields:
            values["cors"] = self.cors(fields["cors"], f"{where}.cors")
        if "canary" in fields:
            values["canary"] = self.canary(fields["canary"], f"{where}.canary", defined_backends)
        if "affinity" in fields:
            values["affinity"] = self.affinity(fields["affinity"], f"{where}.affinity")
        for name in ("limit_rps", "limit_burst", "limit_connections"):
            if name in fields and (number := self.number(fields[name], f"{where}.{name}")) is not None:
                whole = name == "limit_connections"
                limit = self.checked(fields[name], f"{where}.{name}", check_positive, number, name, whole)
                values[name] = int(limit) if whole and limit is not None else limit
        if len(self._problems) != before:
            return _REFUSED
        policy = RoutePolicy(**values)
        return policy if policy != RoutePolicy() else None

    def canary(self, node: yaml.Node, where: str, defined_backends: set[str]) -> Canary | None:
        fields = self.mapping(node, where, _CANARY_KEYS, required={"backend": "backend: NAME"})
        if fields is None or "backend" not in fields:
            return None
        backend = self.backend_reference(fields["backend"], f"{where}.backend", defined_backends)
        total: int | None = 100
        if "weight_total" in fields and (number := self.number(fields["weight_total"], f"{where}.weight_total")) is not None:
            total = self.checked(fields["weight_total"], f"{where}.weight_total", check_weight_total, number)
        weight: int | None = 0
        if "weight" in fields and (number := self.number(fields["weight"], f"{where}.weight")) is not None and total is not None:
            weight = self.checked(fields["weight"], f"{where}.weight", check_weight, number, total)
        header = header_value = cookie = None
        if "header" in fields and (text := self.text(fields["header"], f"{where}.header")) is not None:
            header = self.checked(fields["header"], f"{where}.header", check_header_edit, text, None, True)
        if "header_value" in fields:
            header_value = self.text(fields["header_value"], f"{where}.header_value")
        if "cookie" in fields and (text := self.text(fields["cookie"], f"{where}.cookie")) is not None:
            cookie = self.checked(fields["cookie"], f"{where}.cookie", check_cookie_name, text)
        if backend is None or weight is None or total is None:
            return None
        return Canary(backend, weight, total, header, header_value, cookie)

    def affinity(self, node: yaml.Node, where: str) -> Affinity | None:
        """`affinity: true` (cookie INGRESSCOOKIE, a session cookie, Path=/) or a mapping of _AFFINITY_KEYS."""
        if _tag(node) == _TAG_BOOL:
            return Affinity() if self.flag(node, where) else None
        fields = self.mapping(node, where, _AFFINITY_KEYS, expected="true/false or a mapping")
        if fields is None:
            return None
        affinity = Affinity()
        name, max_age, path = affinity.cookie_name, affinity.max_age, affinity.path
        if "cookie_name" in fields and (text := self.text(fields["cookie_name"], f"{where}.cookie_name")) is not None:
            name = self.checked(fields["cookie_name"], f"{where}.cookie_name", check_cookie_name, text) or name
        if "max_age" in fields and (number := self.number(fields["max_age"], f"{where}.max_age")) is not None:
            max_age = self.checked(fields["max_age"], f"{where}.max_age", check_max_age, number)
        if "path" in fields and (text := self.text(fields["path"], f"{where}.path")) is not None:
            path = self.checked(fields["path"], f"{where}.path", check_path_value, text, "path") or path
        return Affinity(name, max_age, path)

    def cors(self, node: yaml.Node, where: str) -> Cors | None:
        """`cors: true` (ingress-nginx's defaults) or a mapping of _CORS_KEYS."""
        if _tag(node) == _TAG_BOOL:
            return Cors() if self.flag(node, where) else None
        fields = self.mapping(node, where, _CORS_KEYS, expected="true/false or a mapping")
        if fields is None:
            return None
        values: dict[str, Any] = {}
        if "allow_origins" in fields:
            values["allow_origins"] = self.checked(
                fields["allow_origins"], f"{where}.allow_origins", check_cors_origins, self.texts(fields["allow_origins"], f"{where}.allow_origins")
            )
        for name, what in (("allow_methods", "method"), ("allow_headers", "header"), ("expose_headers", "header")):
            if name in fields:
                items = self.texts(fields[name], f"{where}.{name}")
                values[name] = self.checked(fields[name], f"{where}.{name}", check_token_list, ",".join(items), what)
        if "allow_credentials" in fields:
            values["allow_credentials"] = self.flag(fields["allow_credentials"], f"{where}.allow_credentials") is True
        if "max_age" in fields and (age := self.number(fields["max_age"], f"{where}.max_age")) is not None:
            values["max_age"] = self.checked(fields["max_age"], f"{where}.max_age", check_max_age, age)
        return Cors(**{name: value for name, value in values.items() if value is not None})

    def header_edits(self, node: yaml.Node, where: str, request: bool) -> HeaderEdits | None:
        fields = self.mapping(node, where, _HEADER_EDIT_KEYS)
        if fields is None:
            return None
        pairs: dict[str, tuple[tuple[str, str], ...]] = {"set": (), "add": ()}
        for name in ("set", "add"):
            if name in fields:
                entries = self.mapping(fields[name], f"{where}.{name}", known=None) or {}
                found = []
                for header, value_node in entries.items():
                    value = self.text(value_node, f"{where}.{name}.{header}")
                    if value is None:
                        continue
                    checked: str | None = self.checked(value_node, f"{where}.{name}", check_header_edit, header, value, request)
                    if checked is not None:
                        found.append((checked, value))
                pairs[name] = tuple(found)
        removed = []
        if "remove" in fields:
            for index, item in enumerate(self.sequence(fields["remove"], f"{where}.remove") or []):
                written = self.text(item, f"{where}.remove[{index}]")
                if written is None:
                    continue
                name_checked: str | None = self.checked(item, f"{where}.remove[{index}]", check_header_edit, written, None, request)
                if name_checked is not None:
                    removed.append(name_checked)
        return header_edits(pairs["set"], pairs["add"], tuple(removed), request)

    def networks(self, node: yaml.Node, where: str) -> tuple[IpNetwork, ...] | None:
        items = self.sequence(node, where)
        if items is None:
            return None
        if not items:
            self.report(node, f"{where}: the list is empty (name at least one CIDR, or remove the key)")
            return None
        networks: list[IpNetwork] = []
        for index, item in enumerate(items):
            text = self.text(item, f"{where}[{index}]")
            if text is not None:
                networks += self.checked(item, where, parse_networks, [text]) or ()
        return tuple(networks)

    def redirect(self, node: yaml.Node, where: str) -> Redirect | None:
        fields = self.mapping(node, where, _REDIRECT_KEYS, required={"to": "to: https://example.com/"})
        if fields is None or "to" not in fields:
            return None
        text = self.text(fields["to"], f"{where}.to")
        location = self.checked(fields["to"], f"{where}.to", check_redirect_location, text) if text is not None else None
        code: int | None = 301
        if "code" in fields:
            number = self.number(fields["code"], f"{where}.code")
            code = self.checked(fields["code"], f"{where}.code", check_redirect_code, number) if number is not None else None
        return Redirect(location, code) if location is not None and code is not None else None

    def checked(self, node: yaml.Node, where: str, check: Callable[..., _V], *arguments: Any) -> _V | None:
        """`check(*arguments)`, or None after reporting its PolicyValueError at `node`."""
        try:
            return check(*arguments)
        except PolicyValueError as error:
            self.report(node, f"{where}: {error.problem} ({error.fix})")
            return None

    def checked_text(self, fields: Mapping[str, yaml.Node], key: str, where: str, check: Callable[[str], _V]) -> _V | None:
        """`check` of the string at `fields[key]`; None when the key is absent or (reported) wrong."""
        node = fields.get(key)
        text = self.text(node, f"{where}.{key}") if node is not None else None
        return self.checked(node, f"{where}.{key}", check, text) if node is not None and text is not None else None

    def host_pattern(self, node: yaml.Node, where: str, allow_any: bool) -> str | None:
        if allow_any and _is_null(node):
            return ""
        text = self.text(node, where)
        if text is None:
            return None
        try:
            return parse_host_pattern(text, allow_any)
        except HostPatternError as error:
            self.report(node, f"{where}: {error}")
            return None

    # ---- tls ----------------------------------------------------------------------------------

    def tls(self, node: yaml.Node) -> tuple[tuple[Certificate, ...], Certificate | None, CryptoSettings, bool]:
        """(certificates, default certificate, crypto settings, session resumption on)."""
        fields = self.mapping(node, "tls", _TLS_KEYS)
        if fields is None:
            return (), None, CryptoSettings(), True
        engine = self.engine(fields["engine"]) if "engine" in fields else None
        engine_configured = "engine" in fields
        provider_crypto = self.provider_settings(fields)
        store_providers = [p.name for p in provider_crypto.providers if p.name not in _OPENSSL_OWN_PROVIDERS]
        self.store_provider_configured = bool(store_providers)
        self.provider_schemes = frozenset(f"{name.lower()}:" for name in store_providers)
        certificates: list[Certificate] = []
        if "certificates" in fields:
            for index, item in enumerate(self.sequence(fields["certificates"], "tls.certificates") or []):
                certificate = self.certificate(item, f"tls.certificates[{index}]", engine_configured, is_default=False)
                if certificate is not None:
                    certificates.append(certificate)
        default_certificate = None
        if "default_certificate" in fields:
            default_certificate = self.certificate(
                fields["default_certificate"], "tls.default_certificate", engine_configured, is_default=True
            )
        async_mode = "async" in fields and self.flag(fields["async"], "tls.async") is True
        crypto = dataclasses.replace(provider_crypto, engine=engine, async_mode=async_mode)
        resumption = True
        if "session_resumption" in fields:
            resumption = self.flag(fields["session_resumption"], "tls.session_resumption") is not False
        return tuple(certificates), default_certificate, crypto, resumption

    # ---- tls policy (versions, ciphers, suites, curves, ALPN) ----------------------------------

    def tls_policy(self, node: yaml.Node) -> TlsPolicy:
        """The policy keys of the `tls:` mapping (whose unknown and duplicate keys `tls` reported)."""
        if not isinstance(node, yaml.MappingNode):
            return TlsPolicy()
        fields: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value in _TLS_POLICY_KEYS:
                fields.setdefault(key_node.value, value_node)
        defaults = TlsPolicy()
        settings: dict[str, Any] = {}
        for name in ("min_version", "max_version"):
            if name in fields:
                version = self.policy_value(fields[name], f"tls.{name}", check_version)
                if version is not None:
                    settings[name] = version
        checks: dict[str, Callable[[str], str]] = {
            "ciphers": lambda text: check_ciphers(text, "tls.ciphersuites"),
            "ciphersuites": check_ciphersuites,
            "curves": check_curves,
        }
        for name, check in checks.items():
            if name in fields:
                value = self.policy_list(fields[name], f"tls.{name}", check)
                if value is not None:
                    settings[name] = value
        if "alpn" in fields:
            alpn = self.alpn(fields["alpn"])
            if alpn is not None:
                settings["alpn"] = alpn
        policy = dataclasses.replace(defaults, **settings)
        try:
            check_policy(policy, "tls.min_version / tls.max_version")
        except PolicyError as error:
            self.report(fields.get("min_version") or fields.get("max_version") or node, f"tls.min_version: {error}")
            return defaults
        return policy

    def alpn(self, node: yaml.Node) -> tuple[str, ...] | None:
        items = self.sequence(node, "tls.alpn")
        names = self.texts(node, "tls.alpn") if items is not None else None
        if names is None or len(names) != len(items or ()):
            return None
        try:
            return check_alpn(names)
        except PolicyError as error:
            self.report(node, f"tls.alpn: {error}")
            return None

    def policy_value(self, node: yaml.Node, where: str, check: Callable[[str], _V]) -> _V | None:
        text = self.text(node, where)
        if text is None:
            return None
        try:
            return check(text)
        except PolicyError as error:
            self.report(node, f"{where}: {error}")
            return None

    def policy_list(self, node: yaml.Node, where: str, check: Callable[[str], str]) -> str | None:
        """An OpenSSL list as "A:B" or as a YAML list of names; unknown names are reported where they are."""
        if not isinstance(node, yaml.SequenceNode):
            return self.policy_value(node, where, check)
        if not node.value:
            self.report(node, f"{where}: the list is empty (name at least one, or omit it for the default)")
            return None
        texts = [self.text(item, f"{where}[{index}]") for index, item in enumerate(node.value)]
        if any(text is None for text in texts):
            return None
        try:
            return check(":".join(text or "" for text in texts))
        except PolicyError as error:
            at_fault = [(index, item) for index, (item, text) in enumerate(zip(node.value, texts)) if text in error.unknown]
            for index, item in at_fault:  # alone, each unknown name gets its own one-name message
                self.policy_value(item, f"{where}[{index}]", check)
            if not at_fault:  # each name is fine, together they select nothing
                self.report(node, f"{where}: {error}")
            return None
    # ---- tls: providers (OpenSSL 3), their property query, keys by URI ---------------------------

    def provider_settings(self, fields: Mapping[str, yaml.Node]) -> CryptoSettings:
        providers = self.providers(fields["providers"]) if "providers" in fields else ()
        propquery = self.text(fields["propquery"], "tls.propquery") if "propquery" in fields else None
        provider_path = None
        if "provider_path" in fields:
            path = self.file_path(fields["provider_path"], "tls.provider_path")
            if path is not None and not path.is_dir():
                self.report(fields["provider_path"], f"tls.provider_path: {path} is not a directory (name the folder holding the provider modules)")
            elif path is not None:
                provider_path = str(path)
        return CryptoSettings(providers=providers, propquery=propquery or None, provider_path=provider_path)

    def providers(self, node: yaml.Node) -> tuple[ProviderSettings, ...]:
        """`providers: [default, {name: pkcs11, module: ..., parameters: {...}}]`, in activation order."""
        providers: list[ProviderSettings] = []
        seen: set[str] = set()
        for index, item in enumerate(self.sequence(node, "tls.providers") or []):
            where = f"tls.providers[{index}]"
            name_node: yaml.Node = item
            if isinstance(item, yaml.ScalarNode):
                provider = self.provider_name(item, where)
            else:
                fields = self.mapping(item, where, _PROVIDER_KEYS, required={"name": "name: pkcs11"}, expected="a name or a mapping")
                if fields is None or "name" not in fields:
                    continue
                name_node = fields["name"]
                provider = self.provider_name(name_node, f"{where}.name")
                module = self.provider_module(fields["module"], f"{where}.module") if "module" in fields else None
                parameters = self.provider_parameters(fields["parameters"], f"{where}.parameters") if "parameters" in fields else ()
                required = "required" not in fields or self.flag(fields["required"], f"{where}.required") is not False
                if provider is not None:
                    provider = ProviderSettings(provider.name, module, parameters, required)
            if provider is None:
                continue
            if provider.name in seen:
                self.report(name_node, f"{where}: provider '{provider.name}' is listed twice (keep one entry)")
                continue
            seen.add(provider.name)
            providers.append(provider)
        return tuple(providers)

    def provider_name(self, node: yaml.Node, where: str) -> ProviderSettings | None:
        name = self.text(node, where)
        if name is None:
            return None
        if not _PROVIDER_NAME.fullmatch(name):
            self.report(node, f"{where}: '{name}' is not a provider name (letters, digits, '_', '-', '.'; e.g. pkcs11)")
            return None
        return ProviderSettings(name)

    def provider_module(self, node: yaml.Node, where: str) -> str | None:
        path = self.file_path(node, where)
        if path is None:
            return None
        if not path.is_file():
            self.report(
                node,
                f"{where}: no such file {path} (name the provider's .so, e.g. "
                "/usr/lib/x86_64-linux-gnu/ossl-modules/pkcs11.so from Debian's pkcs11-provider)",
            )
            return None
        return str(path)

    def provider_parameters(self, node: yaml.Node, where: str) -> tuple[tuple[str, str], ...]:
        fields = self.mapping(node, where, known=None)
        parameters: list[tuple[str, str]] = []
        for name, value_node in (fields or {}).items():
            value = self.text(value_node, f"{where}.{name}")
            if value is None:
                continue
            if "\n" in value or "\r" in value:
                self.report(value_node, f"{where}.{name}: the value spans lines (write it on one line)")
                continue
            parameters.append((name, value))
        return tuple(parameters)

    def store_key(self, uri: str, fields: Mapping[str, yaml.Node], where: str) -> StoreKey | None:
        """`key: "pkcs11:..."`: a key kept in a token, loaded through a provider's OSSL_STORE."""
        key_node = fields["key"]
        usable = True
        if not self.store_provider_configured:
            self.report(
                key_node,
                f"{where}.key: a pkcs11: key needs a provider that opens pkcs11: URIs (add tls.providers: "
                "[{name: pkcs11, parameters: {pkcs11-module-path: /usr/lib/softhsm/libsofthsm2.so}}])",
            )
            usable = False
        uri_without_pin, uri_pin = split_pin(uri)
        pin_usable, pin = self.pin(fields, where)
        if not pin_usable:
            return None
        if uri_pin is not None and pin is not None:
            pin_field = "pin_env" if "pin_env" in fields else "pin_file"
            self.report(
                key_node,
                f"{where}.key: the key URI already carries pin-value while {pin_field} is set "
                "(remove pin-value from the URI)",
            )
            usable = False
        if not usable:
            return None
        return StoreKey(uri=uri_without_pin, pin=pin if pin is not None else uri_pin)

    def pin(self, fields: Mapping[str, yaml.Node], where: str) -> tuple[bool, str | None]:
        """(usable, the PIN from pin_env or pin_file or None when neither is given)."""
        if "pin_env" in fields and "pin_file" in fields:
            self.report(fields["pin_file"], f"{where}.pin_file: give either pin_env or pin_file, not both (remove one)")
            return False, None
        pin = None
        if "pin_env" in fields:
            pin = self.pin_from_environment(fields["pin_env"], f"{where}.pin_env")
        elif "pin_file" in fields:
            pin = self.pin_from_file(fields["pin_file"], f"{where}.pin_file")
        else:
            return True, None
        return pin is not None, pin

    # ---- tls: engine ---------------------------------------------------------------------------

    def engine(self, node: yaml.Node) -> EngineSettings | None:
        fields = self.mapping(node, "tls.engine", _ENGINE_KEYS, required={"id": "id: pkcs11"})
        if fields is None:
            return None
        engine_id = self.text(fields["id"], "tls.engine.id") if "id" in fields else None
        so_path = self.text(fields["so_path"], "tls.engine.so_path") if "so_path" in fields else None
        ctrl = self.ctrl_pairs(fields["ctrl"]) if "ctrl" in fields else ()
        algorithms: tuple[str, ...] = ("ALL",)
        if "algorithms" in fields:
            algorithms = self.algorithms(fields["algorithms"])
        required = "required" in fields and self.flag(fields["required"], "tls.engine.required") is True
        if engine_id is None:
            return None
        return EngineSettings(id=engine_id, so_path=so_path, ctrl=ctrl, algorithms=algorithms, required=required)

    def ctrl_pairs(self, node: yaml.Node) -> tuple[tuple[str, str], ...]:
        pairs: list[tuple[str, str]] = []
        for index, item in enumerate(self.sequence(node, "tls.engine.ctrl") or []):
            where = f"tls.engine.ctrl[{index}]"
            if not isinstance(item, yaml.SequenceNode) or len(item.value) != 2:
                self.report(item, f"{where}: expected a [name, value] pair (write [MODULE_PATH, /path/to/module.so])")
                continue
            name = self.text(item.value[0], f"{where}[0]")
            value = self.text(item.value[1], f"{where}[1]")
            if name is not None and value is not None:
                pairs.append((name, value))
        return tuple(pairs)

    def algorithms(self, node: yaml.Node) -> tuple[str, ...]:
        items = self.sequence(node, "tls.engine.algorithms")
        if items is None:
            return ("ALL",)
        if not items:
            self.report(node, "tls.engine.algorithms: the list is empty (name at least one, or omit it for [ALL])")
        names: list[str] = []
        for index, item in enumerate(items):
            name = self.text(item, f"tls.engine.algorithms[{index}]")
            if name is None:
                continue
            if name not in ALGORITHM_FLAGS:
                known = f"use {', '.join(ALGORITHM_FLAGS)}"
                hint = f"did you mean {name.upper()}?" if name.upper() in ALGORITHM_FLAGS else known
                self.report(item, f"tls.engine.algorithms[{index}]: unknown algorithm '{name}' ({hint})")
                continue
            names.append(name)
        return tuple(names)

    def certificate(self, node: yaml.Node, where: str, engine_configured: bool, is_default: bool) -> Certificate | None:
        known = _DEFAULT_CERTIFICATE_KEYS if is_default else _CERTIFICATE_KEYS
        required = {"cert": "cert: certs/site.pem", "key": "key: certs/site.key"}
        fields = self.mapping(node, where, known, required)
        if fields is None:
            return None
        chain = self.certificate_chain(fields["cert"], f"{where}.cert") if "cert" in fields else None
        key, private_key = self.private_key(fields, where, engine_configured) if "key" in fields else (None, None)
        if chain is not None and private_key is not None and not key_matches_certificate(private_key, chain.leaf):
            self.report(
                fields["key"],
                f"{where}.key: the key does not match the certificate's public key "
                "(use the key the certificate was issued for)",
            )
        hosts: tuple[str, ...] | None = None
        if "hosts" in fields:
            hosts = self.certificate_hosts(fields["hosts"], f"{where}.hosts")
        elif chain is not None:
            hosts = san_host_patterns(chain.leaf)
            if not hosts and not is_default:
                self.report(
                    node,
                    f"{where}: the certificate has no usable DNS name in subjectAltName "
                    '(add hosts: ["name.example.com"] to this entry)',
                )
        ocsp_response = self.ocsp_response(fields, where) if chain is not None or "ocsp" in fields else None
        if chain is None or key is None or hosts is None:
            return None
        return Certificate(chain_pem=chain.pem, key=key, hosts=hosts, origin=self.location(node), ocsp_response=ocsp_response)

    def ocsp_response(self, fields: Mapping[str, yaml.Node], where: str) -> bytes | None:
        """The `ocsp:` file, else `<cert>.ocsp` if it exists; checked against the certificate later."""
        if "ocsp" in fields:
            path = self.file_path(fields["ocsp"], f"{where}.ocsp")
            return self.read_file(fields["ocsp"], f"{where}.ocsp", path) if path else None
        cert = self.file_path(fields["cert"], f"{where}.cert") if "cert" in fields else None
        if cert is None:
            return None
        beside = cert.with_name(cert.name + OCSP_SUFFIX)
        return self.read_file(fields["cert"], f"{where}.cert ({beside.name})", beside) if beside.is_file() else None

    def certificate_chain(self, node: yaml.Node, where: str) -> CertificateChain | None:
        path = self.file_path(node, where)
        data = self.read_file(node, where, path) if path else None
        if path is None or data is None:
            return None
        try:
            return parse_certificate_chain(data)
        except NoCertificateError:
            self.report(node, f"{where}: {path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")
        except CertificateParseError as error:
            for number in error.numbers:
                self.report(node, f"{where}: certificate #{number} in {path} does not parse (re-export it as PEM)")
        return None

    def private_key(
        self, fields: Mapping[str, yaml.Node], where: str, engine_configured: bool
    ) -> tuple[KeySource | None, PrivateKey | None]:
        """The key source, plus the parsed private key for PEM keys (None for engine keys)."""
        key_node = fields["key"]
        text = self.text(key_node, f"{where}.key")
        if text is None:
            return None, None
        if text.startswith(ENGINE_KEY_PREFIX):
            return self.engine_key(text[len(ENGINE_KEY_PREFIX) :], fields, where, engine_configured), None
        scheme = text[: text.find(":") + 1].lower()
        if scheme and (scheme == PKCS11_URI_SCHEME or scheme in self.provider_schemes):
            return self.store_key(text, fields, where), None
        for pin_field in ("pin_env", "pin_file"):
            if pin_field in fields:
                self.report(
                    fields[pin_field],
                    f"{where}.{pin_field}: only engine: and pkcs11: keys take a PIN "
                    f"(remove {pin_field})",
                )
        path = self.file_path(key_node, f"{where}.key")
        if path is None:
            return None, None
        if not path.exists() and _URI_SCHEME.match(text):
            self.report(  # the text is not echoed: a URI may carry a PIN
                key_node,
                f"{where}.key: no such key file "
                '(for a key in a token write key: "pkcs11:token=...;object=..." with tls.providers, '
                f'or "engine:{text.split(":")[0]}:..." with tls.engine)',
            )
            return None, None
        data = self.read_file(key_node, f"{where}.key", path)
        if data is None:
            return None, None
        try:
            private_key = parse_private_key(data)
        except EncryptedKeyError:
            self.report(
                key_node,
                f"{where}.key: {path} is encrypted (decrypt it with `openssl pkey -in KEY -out PLAIN`, "
                "or keep it in an HSM with key: engine:...)",
            )
            return None, None
        except KeyParseError:
            self.report(
                key_node,
                f"{where}.key: {path} holds no usable PEM private key "
                "(expected BEGIN PRIVATE KEY, BEGIN RSA PRIVATE KEY or BEGIN EC PRIVATE KEY)",
            )
            return None, None
        return PemKey(pem=data), private_key

    def engine_key(
        self, uri: str, fields: Mapping[str, yaml.Node], where: str, engine_configured: bool
    ) -> EngineKey | None:
        key_node = fields["key"]
        usable = True
        if not uri:
            self.report(
                key_node,
                f'{where}.key: the engine key URI is empty '
                '(write key: "engine:pkcs11:token=...;object=...")',
            )
            usable = False
        if not engine_configured:
            self.report(
                key_node,
                f"{where}.key: an engine: key needs tls.engine (configure tls.engine, e.g. {{id: pkcs11}}, "
                "or use a PEM key file)",
            )
            usable = False
        if "pin_env" in fields and "pin_file" in fields:
            self.report(fields["pin_file"], f"{where}.pin_file: give either pin_env or pin_file, not both (remove one)")
            return None
        pin = None
        if "pin_env" in fields:
            pin = self.pin_from_environment(fields["pin_env"], f"{where}.pin_env")
            usable = usable and pin is not None
        elif "pin_file" in fields:
            pin = self.pin_from_file(fields["pin_file"], f"{where}.pin_file")
            usable = usable and pin is not None
        if pin is not None and "pin-value=" in uri.lower():
            pin_field = "pin_env" if "pin_env" in fields else "pin_file"
            self.report(
                key_node,
                f"{where}.key: the engine key URI already carries pin-value while {pin_field} is set "
                "(remove pin-value from the URI)",
            )
            usable = False
        if not usable:
            return None
        if pin is not None:
            uri += ";pin-value=" + urllib.parse.quote(pin, safe="")
        return EngineKey(uri=uri)

    def pin_from_environment(self, node: yaml.Node, where: str) -> str | None:
        variable = self.text(node, where)
        if variable is None:
            return None
        pin = os.environ.get(variable)
        if not pin:
            self.report(
                node,
                f"{where}: environment variable {variable} is unset or empty "
                "(export it before starting, or use pin_file)",
            )
            return None
        return pin

    def pin_from_file(self, node: yaml.Node, where: str) -> str | None:
        path = self.file_path(node, where)
        data = self.read_file(node, where, path) if path else None
        if path is None or data is None:
            return None
        try:
            pin = data.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            self.report(node, f"{where}: {path} is not UTF-8 text (write the PIN as one line of text)")
            return None
        if not pin:
            self.report(node, f"{where}: {path} is empty (write the PIN on its first line)")
            return None
        return pin

    def certificate_hosts(self, node: yaml.Node, where: str) -> tuple[str, ...] | None:
        items = self.sequence(node, where)
        if items is None:
            return None
        if not items:
            self.report(
                node,
                f"{where}: the list is empty "
                "(name at least one host, or omit hosts to use the certificate's SANs)",
            )
            return None
        hosts = [self.host_pattern(item, f"{where}[{index}]", allow_any=False) for index, item in enumerate(items)]
        valid = [host for host in hosts if host is not None]
        if len(valid) != len(hosts):
            return None
        return tuple(dict.fromkeys(valid))

    # ---- timeouts, hsts, access log -----------------------------------------------------------

    def timeouts(self, node: yaml.Node) -> Timeouts:
        fields = self.mapping(node, "timeouts", _TIMEOUT_KEYS)
        if fields is None:
            return Timeouts()
        seconds: dict[str, float] = {}
        for name, value_node in fields.items():
            value = self.number(value_node, f"timeouts.{name}")
            if value is None:
                continue
            if not (math.isfinite(value) and value > 0):
                self.report(
                    value_node,
                    f"timeouts.{name}: {value_node.value} is not a positive number of seconds "
                    f"(e.g. {name}: 10)",
                )
                continue
            seconds[name] = float(value)
        return Timeouts(**seconds)

    def hsts(self, node: yaml.Node, where: str = "hsts") -> Hsts | None:
        if _tag(node) == _TAG_BOOL:
            return Hsts() if self.flag(node, where) else None
        fields = self.mapping(node, where, _HSTS_KEYS, expected="a mapping or true/false")
        if fields is None:
            return None
        settings: dict[str, Any] = {}
        if "max_age" in fields:
            max_age_node = fields["max_age"]
            max_age = self.number(max_age_node, f"{where}.max_age")
            if max_age is not None and (not isinstance(max_age, int) or max_age < 0):
                self.report(
                    max_age_node,
                    f"{where}.max_age: {max_age_node.value} is not a whole number of seconds >= 0 "
                    "(e.g. 31536000)",
                )
            elif max_age is not None:
                settings["max_age"] = max_age
        for name in ("include_subdomains", "preload"):
            if name in fields:
                settings[name] = self.flag(fields[name], f"{where}.{name}") is True
        return Hsts(**settings)

    def client_auth(self, node: yaml.Node, where: str) -> ClientAuth | None | _Refused:
        """`client_auth: {ca: FILE, verify: on, depth: 1, pass_certificate: false, error_page: URL,
        match_subject: REGEX}` (None: verify off)."""
        fields = self.mapping(node, where, _CLIENT_AUTH_KEYS, required={"ca": "ca: FILE, a PEM bundle of the CAs that issue client certificates"})
        if fields is None:
            return _REFUSED
        usable = True
        ca_pem = b""
        if "ca" in fields:
            chain = self.certificate_chain(fields["ca"], f"{where}.ca")
            usable = chain is not None
            ca_pem = chain.pem if chain is not None else b""
        verify = ClientVerify.ON
        if "verify" in fields:
            text = self.text(fields["verify"], f"{where}.verify")  # `on`/`off` unquoted are YAML booleans: as written
            try:
                verify = client_auth_rules.parse_verify(text) if text is not None else verify
            except ValueError as error:
                self.report(fields["verify"], f"{where}.verify: {error}")
                usable = False
            usable = usable and text is not None
        depth = client_auth_rules.DEFAULT_DEPTH
        if "depth" in fields:
            number = self.number(fields["depth"], f"{where}.depth")
            try:
                if number is not None and not isinstance(number, int):
                    raise ValueError(f"{number} is not a whole number (write 1, 2, ...)")
                depth = client_auth_rules.check_depth(number) if number is not None else depth
            except ValueError as error:
                self.report(fields["depth"], f"{where}.depth: {error}")
                usable = False
            usable = usable and number is not None
        pass_certificate = False
        if "pass_certificate" in fields:
            flag = self.flag(fields["pass_certificate"], f"{where}.pass_certificate")
            pass_certificate = flag is True
            usable = usable and flag is not None
        error_page = self.checked_text(fields, "error_page", where, client_auth_rules.check_error_page)
        usable = usable and (error_page is not None or "error_page" not in fields)
        match_subject = self.checked_text(fields, "match_subject", where, client_auth_rules.compile_match_subject)
        usable = usable and (match_subject is not None or "match_subject" not in fields)
        if match_subject is not None:
            try:
                client_auth_rules.check_match_subject_with(verify)
            except ValueError as error:
                self.report(fields["match_subject"], f"{where}.match_subject: {error}")
                usable = False
        if not usable:
            return _REFUSED
        return client_auth_rules.client_auth(ca_pem, verify, depth, pass_certificate, error_page, match_subject)

    def access_log_json(self, node: yaml.Node) -> bool:
        fields = self.mapping(node, "access_log", _ACCESS_LOG_KEYS)
        if fields is None or "json" not in fields:
            return False
        return self.flag(fields["json"], "access_log.json") is True

    # ---- typed node readers -------------------------------------------------------------------

    def mapping(
        self,
        node: yaml.Node,
        where: str,
        known: Sequence[str] | None,
        required: Mapping[str, str] | None = None,
        expected: str = "a mapping",
    ) -> dict[str, yaml.Node] | None:
        """Key text → value node, after reporting duplicate, unknown (when `known`) and missing keys."""
        if not isinstance(node, yaml.MappingNode):
            self.report(node, f"{where}: expected {expected}, got {_describe(node)} (write it as name: value pairs)")
            return None
        fields: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.report(
                    key_node,
                    f"{where}: a key must be plain text, got {_describe(key_node)} "
                    "(write name: value)",
                )
                continue
            key = key_node.value
            if key in fields:
                self.report(key_node, f"{where}: duplicate key '{key}' (keep one; YAML would silently use the last)")
                continue
            if known is not None and key not in known:
                close = difflib.get_close_matches(key.lower(), known, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
                self.report(key_node, f"{where}: unknown key '{key}' ({hint})")
                continue
            fields[key] = value_node
        for key, example in (required or {}).items():
            if key not in fields:
                self.report(node, f"{where}: missing required key '{key}' (add {example})")
        return fields

    def sequence(self, node: yaml.Node, where: str) -> list[yaml.Node] | None:
        if not isinstance(node, yaml.SequenceNode):
            self.report(
                node,
                f"{where}: expected a list, got {_describe(node)} "
                "(write [item, ...] or one '- item' per line)",
            )
            return None
        return list(node.value)

    def text(self, node: yaml.Node, where: str) -> str | None:
        if isinstance(node, yaml.ScalarNode) and node.tag != _TAG_NULL:
            return str(node.value)
        self.report(node, f"{where}: expected a string, got {_describe(node)} (write one plain or quoted value)")
        return None

    def texts(self, node: yaml.Node, where: str) -> tuple[str, ...]:
        values = [self.text(item, f"{where}[{index}]") for index, item in enumerate(self.sequence(node, where) or [])]
        return tuple(value for value in values if value is not None)

    def flag(self, node: yaml.Node, where: str) -> bool | None:
        if _tag(node) != _TAG_BOOL or not isinstance(node, yaml.ScalarNode):
            self.report(node, f"{where}: expected true or false, got {_describe(node)} (write true or false, unquoted)")
            return None
        return bool(_SCALARS.construct_yaml_bool(node))

    def number(self, node: yaml.Node, where: str) -> int | float | None:
        if isinstance(node, yaml.ScalarNode):
            tag = _tag(node)
            if tag == _TAG_INT:
                return int(_SCALARS.construct_yaml_int(node))
            if tag == _TAG_FLOAT:
                return float(_SCALARS.construct_yaml_float(node))
        self.report(
            node,
            f"{where}: expected a number, got {_describe(node)} "
            "(write a plain number, unquoted, no unit)",
        )
        return None

    def file_path(self, node: yaml.Node, where: str) -> pathlib.Path | None:
        text = self.text(node, where)
        if text is None:
            return None
        if not text:
            self.report(node, f"{where}: the file name is empty (name a file, relative to {self.base_directory})")
            return None
        return self.base_directory / text

    def read_file(self, node: yaml.Node, where: str, path: pathlib.Path) -> bytes | None:
        try:
            return path.read_bytes()
        except OSError as error:
            self.report(
                node,
                f"{where}: cannot read {path}: {error.strerror} "
                f"(relative paths start at {self.base_directory})",
            )
            return None

    # ---- problems -----------------------------------------------------------------------------

    def location(self, node: yaml.Node) -> str:
        return self.location_of_mark(node.start_mark)

    def location_of_mark(self, mark: yaml.Mark) -> str:
        return f"{self.path}:{mark.line + 1}:{mark.column + 1}"

    def report(self, node: yaml.Node, message: str) -> None:
        mark = node.start_mark
        self._problems.append((mark.line, mark.column, Problem(self.location_of_mark(mark), message)))

    def sorted_problems(self) -> list[Problem]:
        return [problem for _, _, problem in sorted(self._problems, key=lambda entry: (entry[0], entry[1]))]


# ---- pure helpers -----------------------------------------------------------------------------


def _has_key(node: yaml.Node | None, key: str) -> bool:
    """Whether a mapping node has `key` (for checks that depend on a section read later)."""
    return isinstance(node, yaml.MappingNode) and any(
        isinstance(key_node, yaml.ScalarNode) and key_node.value == key for key_node, _ in node.value
    )



def _tag(node: yaml.Node) -> str | None:
    return node.tag if isinstance(node, yaml.ScalarNode) else None


def _host_label(host: str) -> str:
    return f"host '{host}'" if host else "the any-host entry"


def _is_null(node: yaml.Node) -> bool:
    return _tag(node) == _TAG_NULL


def _describe(node: yaml.Node) -> str:
    """What a node is, for "expected X, got Y" messages. Values are never echoed: they may be secrets."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return {_TAG_NULL: "nothing (null)", _TAG_BOOL: "a boolean", _TAG_INT: "a number", _TAG_FLOAT: "a number"}.get(
        node.tag, "a string"
    )


def _parse_address(text: str) -> Address:
    """`host:port` (IPv6 in brackets) → Address with a canonical IP host; ValueError says what is wrong."""
    example = "e.g. 127.0.0.1:8443 or [::1]:8443"
    if text.startswith("["):
        host, bracket, port_text = text[1:].partition("]:")
        if not bracket:
            raise ValueError(f"'{text}' is not [IPv6]:port ({example})")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"'{host}' in brackets is not an IPv6 address ({example})") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError(f"'{text}' has no port (write host:port, {example})")
        if ":" in host:
            raise ValueError(f"'{text}': put an IPv6 address in brackets (write [{host}]:{port_text})")
        if not host:
            raise ValueError(f"'{text}' has no host (write 0.0.0.0:{port_text} for every interface, or {example})")
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            host = host.lower()
            if _LOOKS_NUMERIC.fullmatch(host):
                raise ValueError(f"'{host}' is not a valid IPv4 address ({example})") from None
            if not is_dns_name(host):
                raise ValueError(f"'{host}' is neither an IP address nor a host name ({example})") from None
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ValueError(f"port '{port_text}' is not a number from 1 to 65535 ({example})")
    return Address(host=host, port=int(port_text))


def _listeners_clash(first: Address, second: Address) -> bool:
    same_host = first.host == second.host or first.host in _UNSPECIFIED_HOSTS or second.host in _UNSPECIFIED_HOSTS
    return first.port == second.port and same_host
