"""The one routing model both route sources produce and the data plane consumes.

Everything here is a frozen dataclass holding plain values: the routes-file loader
(`config.routes_file`) and the Kubernetes translator (`ingress_watch.translate`) build a
`Configuration`; the proxy compiles it into lookup structures and TLS contexts and swaps it in
with one assignment. Nothing in this module performs I/O.

Secrets (private key PEM, engine URIs that may carry a PIN) are excluded from `repr` so that
logging a model object can never leak them.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from typing import Literal


class PathType(enum.Enum):
    """Ingress v1 path types. ImplementationSpecific is matched like Prefix (documented)."""

    EXACT = "Exact"
    PREFIX = "Prefix"
    IMPLEMENTATION_SPECIFIC = "ImplementationSpecific"


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# ---- backend protocols and upstream TLS (issue 12) ---------------------------------------------


class BackendProtocol(enum.Enum):
    """How the proxy talks to a backend's endpoints."""

    HTTP = "http"  # HTTP/1.1 over TCP
    HTTPS = "https"  # HTTP/1.1 over TLS
    H2C = "h2c"  # HTTP/2 over TCP (prior knowledge): gRPC
    H2 = "h2"  # HTTP/2 over TLS (ALPN h2): gRPC over TLS

    @property
    def uses_tls(self) -> bool:
        return self in (BackendProtocol.HTTPS, BackendProtocol.H2)

    @property
    def multiplexed(self) -> bool:
        """HTTP/2: many requests share one pooled connection, as streams."""
        return self in (BackendProtocol.H2C, BackendProtocol.H2)


@dataclass(frozen=True)
class ClientCertificate:
    """The certificate (and key) the proxy presents to a backend that asks for one (mTLS upstream)."""

    chain_pem: bytes = field(repr=False)
    key: KeySource
    origin: str  # "routes.yaml:12:7" or "Secret ns/name", for messages


@dataclass(frozen=True)
class UpstreamTls:
    """TLS towards a backend. Never a plaintext fallback: a failed handshake is a 502.

    `verify` checks the chain against `ca_pem` (the system trust store when None) and the
    certificate's name against `server_name`, or the endpoint's host when `server_name` is None.
    `server_name` is also sent as SNI when `send_sni` (an IP address never is).
    """

    ca_pem: bytes | None = field(default=None, repr=False)
    verify: bool = False
    server_name: str | None = None
    send_sni: bool = True
    client_certificate: ClientCertificate | None = None


@dataclass(frozen=True)
class Backend:
    """A named pool of endpoints; the balancer spreads requests over `endpoints`.

    `tls` is set exactly when `protocol.uses_tls` (both producers build it that way)."""

    name: str
    endpoints: tuple[Address, ...]
    protocol: BackendProtocol = BackendProtocol.HTTP
    tls: UpstreamTls | None = None


# ---- end of backend protocols ------------------------------------------------------------------


# ---- per-route policy (issue 13): what a route does besides choosing a backend ---------------
#
# Both producers fill these from their own spelling (routes-file `policy:` keys, ingress-nginx
# annotations) through the same checks in `config.route_policy`; `proxy.policy` enforces them.
# Every default is today's behaviour, and a route without any policy carries `policy=None`, so the
# data plane's no-policy path does no extra work (one `is None` test per request).

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Redirect:
    """Answer every request of the route with `status` and `Location: location` (nginx `return`)."""

    location: str
    status: int  # 301 (permanent-redirect), 302 (temporal-redirect), or the -code annotations' 3xx


@dataclass(frozen=True)
class HeaderEdits:
    """Header changes on a message, applied remove → set → add. Names as written, matched without
    case; names that frame the message or that the proxy derives (Host, X-Forwarded-*) are refused
    by `config.route_policy.check_header_edit`."""

    set: tuple[tuple[str, str], ...] = ()  # replaces every value the message had under that name
    add: tuple[tuple[str, str], ...] = ()  # appended beside what the message had
    remove: tuple[str, ...] = ()


CORS_DEFAULT_METHODS = "GET, PUT, POST, DELETE, PATCH, OPTIONS"  # ingress-nginx's defaults, kept verbatim
CORS_DEFAULT_HEADERS = (
    "DNT,Keep-Alive,User-Agent,X-Requested-With,If-Modified-Since,Cache-Control,Content-Type,Range,Authorization"
)


@dataclass(frozen=True)
class Cors:
    """ingress-nginx `enable-cors` and its `cors-*` keys. The proxy answers preflights itself.

    `allow_origins`: "*" (any), exact origins ("https://app.example.com") or one-level-or-deeper
    wildcards ("https://*.example.com"). A matching request Origin is echoed (with `*` and no
    credentials, "*" is sent instead); a non-matching one gets no CORS headers at all.
    """

    allow_origins: tuple[str, ...] = ("*",)
    allow_methods: str = CORS_DEFAULT_METHODS
    allow_headers: str = CORS_DEFAULT_HEADERS
    expose_headers: str = ""
    allow_credentials: bool = True
    max_age: int = 1728000  # seconds a browser may cache a preflight answer (20 days, ingress-nginx's)


@dataclass(frozen=True)
class Canary:
    """A weighted alternative backend for a rule (ingress-nginx canary Ingresses), decided per
    request in this order: the header (`always`/`never`, or equal to `header_value`), the cookie
    (`always`/`never`), then `weight` out of `weight_total` of the remaining requests."""

    backend: str  # key into Configuration.backends
    weight: int = 0  # 0..weight_total
    weight_total: int = 100  # ingress-nginx canary-weight-total: the denominator of weight
    header: str | None = None
    header_value: str | None = None
    cookie: str | None = None


@dataclass(frozen=True)
class Affinity:
    """Sticky endpoint by cookie (ingress-nginx `affinity: cookie`, `session-cookie-*`). The cookie
    names the endpoint by a digest of backend and address; when that endpoint is gone (endpoint
    churn) the request is balanced as usual and the cookie is re-issued for the new endpoint."""

    cookie_name: str = "INGRESSCOOKIE"  # ingress-nginx's default name
    max_age: int | None = None  # seconds; None: a session cookie
    path: str = "/"


@dataclass(frozen=True)
class RoutePolicy:
    """Per-route (host + path) behaviour; field order is the order `proxy.policy` applies them.

    `regex`: the rule's path is a regular expression matched case-insensitively from the start of
    the request path (ingress-nginx `use-regex`: `location ~* "^<path>"`), checked for safety by
    `config.route_policy.check_regex`. `rewrite_target`: the path sent upstream becomes this text
    with `$1`..`$9` replaced by the path's capture groups (the query is kept), as nginx `rewrite`.
    """

    allow_sources: tuple[IpNetwork, ...] = ()  # non-empty: only these client addresses (else 403)
    deny_sources: tuple[IpNetwork, ...] = ()  # these client addresses get 403 (checked first)
    redirect: Redirect | None = None
    app_root: str | None = None  # a request for "/" is redirected (302) here
    max_body_size: int | None = None  # bytes; a larger request body gets 413 (None: no limit)
    regex: bool = False
    rewrite_target: str | None = None
    forwarded_prefix: str | None = None  # sent upstream as X-Forwarded-Prefix (the client's is dropped)
    connect_timeout: float | None = None  # seconds; None: Timeouts.connect
    read_timeout: float | None = None  # each wait for the backend's response; None: Timeouts.backend_response
    send_timeout: float | None = None  # each wait for the backend to take request body bytes; None: as read
    request_headers: HeaderEdits | None = None  # on the request as it goes upstream
    response_headers: HeaderEdits | None = None  # on the backend's response as it goes to the client
    upstream_host: str | None = None  # the Host sent upstream (nginx upstream-vhost); X-Forwarded-Host keeps the client's
    cors: Cors | None = None
    limit_rps: float | None = None  # requests per second per client address (per replica and worker) → 429
    limit_burst: float | None = None  # requests a client may send at once above the rate; None: 5 × limit_rps
    limit_connections: int | None = None  # requests in flight per client address → 503
    canary: Canary | None = None
    affinity: Affinity | None = None


# ---- end of per-route policy ------------------------------------------------------------------


# ---- client certificates per host (issue 13, ingress-nginx auth-tls-*) --------------------------


class ClientVerify(enum.Enum):
    """ingress-nginx `auth-tls-verify-client` (nginx `ssl_verify_client`)."""

    ON = "on"  # a certificate from `ca_pem` is required: none or a bad one → 400
    OPTIONAL = "optional"  # asked for; none passes (ssl-client-verify: NONE), a bad one → 400
    OPTIONAL_NO_CA = "optional_no_ca"  # asked for; an unverifiable issuer passes (FAILED:reason), other errors → 400
    OFF = "off"  # not asked for at all


@dataclass(frozen=True)
class ClientAuth:
    """Client certificate authentication of one host: a TLS property of its SNI-selected context.

    `depth`: OpenSSL's verify depth, passed through as nginx passes `ssl_verify_depth`: how many
    intermediate CA certificates may stand between the client's certificate and a CA of the bundle
    (OpenSSL 3 does not count the trust anchor): 0 = issued directly by a bundle CA; 1, ingress-nginx's
    default, allows one intermediate. The backend always gets ssl-client-verify,
    ssl-client-subject-dn and ssl-client-issuer-dn, and with `pass_certificate` also
    ssl-client-cert (URL-escaped PEM), as ingress-nginx sends them; clients' own copies of those
    headers are always dropped, on every host. `error_page` (ingress-nginx `auth-tls-error-page`):
    a request refused for its certificate is redirected there (302) instead of answered 400. A
    host with `verify` OFF carries no ClientAuth at all (both producers leave it None).
    """

    ca_pem: bytes = field(repr=False)
    verify: ClientVerify = ClientVerify.ON
    depth: int = 1
    pass_certificate: bool = False
    error_page: str | None = None  # an http(s) URL or a path, checked like a redirect location


# ---- end of client certificates ---------------------------------------------------------------


@dataclass(frozen=True)
class PathRule:
    path: str
    path_type: PathType
    backend: str  # key into Configuration.backends
    policy: RoutePolicy | None = None  # None: no policy, today's path


@dataclass(frozen=True)
class VirtualHost:
    """Rules for one host pattern: "" = any host, "*.example.com" = exactly one extra label."""

    host: str
    paths: tuple[PathRule, ...]
    redirect_to_https: bool = False
    hsts: Hsts | Literal[False] | None = None  # None: Configuration.hsts; False: none for this host; Hsts: its own
    client_auth: ClientAuth | None = None  # None: no client certificates asked for (today's contexts)


@dataclass(frozen=True)
class PemKey:
    """A private key held in memory as PEM (PKCS#1 or PKCS#8)."""

    pem: bytes = field(repr=False)


@dataclass(frozen=True)
class EngineKey:
    """A private key that stays inside an OpenSSL engine, named by an engine URI."""

    uri: str = field(repr=False)


@dataclass(frozen=True)
class StoreKey:
    """A private key that stays inside an OpenSSL provider (an HSM through pkcs11-provider), named
    by a URI that `OSSL_STORE` opens (RFC 7512 `pkcs11:token=...;object=...`). The PIN, when there is
    one, travels beside the URI, never inside it: URIs end up in messages, PINs must not."""

    uri: str = field(repr=False)
    pin: str | None = field(default=None, repr=False)


KeySource = PemKey | EngineKey | StoreKey


@dataclass(frozen=True)
class Certificate:
    """A certificate chain, its key, and the SNI names it serves (patterns like VirtualHost.host)."""

    chain_pem: bytes = field(repr=False)
    key: KeySource
    hosts: tuple[str, ...]
    origin: str  # where it came from, for messages: "routes.yaml:12:7" or "Secret ns/name"
    ocsp_response: bytes | None = field(default=None, repr=False)  # DER, stapled while valid (proxy/stapling.py)


@dataclass(frozen=True)
class EngineSettings:
    """An OpenSSL ENGINE to load, like HAProxy's `ssl-engine <id> [algo ...]`."""

    id: str
    so_path: str | None = None
    ctrl: tuple[tuple[str, str], ...] = ()
    algorithms: tuple[str, ...] = ("ALL",)
    required: bool = False


@dataclass(frozen=True)
class ProviderSettings:
    """An OpenSSL 3 provider to activate, like an `openssl.cnf` provider section: its name, the
    module file (default: `<name>.so` in the modules directory) and its parameters in order
    (`pkcs11-module-path`, ...). Parameters are kept out of `repr`: one may name a PIN."""

    name: str
    module: str | None = None
    parameters: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # True (the default): start-up stops when it does not load, since the keys it holds cannot be
    # served without it; False: one warning and software crypto (an accelerator like qatprovider).
    required: bool = True


@dataclass(frozen=True)
class CryptoSettings:
    """Process-wide crypto set-up: loaded once in the control plane, before contexts are built.

    `providers` are activated in order, with `default` first (see config.crypto); `propquery` is
    the default property query (HAProxy's `ssl-propquery`, e.g. "?provider=pkcs11"); and
    `provider_path` is where provider modules named without `module` are looked for (HAProxy's
    `ssl-provider-path`)."""

    engine: EngineSettings | None = None
    async_mode: bool = False
    providers: tuple[ProviderSettings, ...] = ()
    propquery: str | None = None
    provider_path: str | None = None

    @property
    def reaches_key_stores(self) -> bool:
        """Whether keys may come from outside files (an engine's or a provider's store: an HSM)."""
        return self.engine is not None or bool(self.providers)


# ---- TLS policy (issue 10): what every context offers; checked by config/tls_policy.py -------


class TlsVersion(enum.Enum):
    """The protocol versions a policy may name; older ones are refused (RFC 8996)."""

    TLS1_2 = "TLSv1.2"
    TLS1_3 = "TLSv1.3"


# Mozilla "intermediate" (v5.7) without its DHE suites: ECDHE key exchange with AEAD ciphers only,
# no CBC (LUCKY13), no static RSA key exchange (no forward secrecy). HAProxy's Debian default too.
INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
TLS13_CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
INTERMEDIATE_CURVES = "X25519:P-256:P-384"


@dataclass(frozen=True)
class TlsPolicy:
    """Versions, TLS 1.2 ciphers, TLS 1.3 suites, groups and ALPN protocols of every context.

    The strings use OpenSSL's syntax and hold only names OpenSSL accepted when they were checked.
    `alpn` is in our order of preference; a client offering none of them gets the fatal
    no_application_protocol alert (RFC 7301 §3.2), a client offering no ALPN at all is served.
    """

    min_version: TlsVersion = TlsVersion.TLS1_2
    max_version: TlsVersion = TlsVersion.TLS1_3
    ciphers: str = INTERMEDIATE_CIPHERS
    ciphersuites: str = TLS13_CIPHERSUITES
    curves: str = INTERMEDIATE_CURVES
    alpn: tuple[str, ...] = ("h2", "http/1.1")  # HTTP/2 preferred, as HAProxy, nginx and Traefik offer


# ---- end of TLS policy ------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeouts:
    """Seconds. Defaults follow common edge-proxy practice (HAProxy/nginx ballpark)."""

    connect: float = 5.0  # TCP connect to a backend endpoint
    handshake: float = 10.0  # TLS handshake with a client
    header_read: float = 10.0  # first byte to end of a request head (slowloris guard)
    idle: float = 60.0  # keep-alive connection with no request in progress
    backend_response: float = 60.0  # request sent to response head received, and between body reads
    backend_handshake: float = 10.0  # TLS handshake with a backend, after its TCP connect
    drain: float = 30.0  # SIGTERM: time for requests in flight to finish


@dataclass(frozen=True)
class Listeners:
    https: Address
    http: Address | None = None
    admin: Address | None = None


@dataclass(frozen=True)
class Hsts:
    max_age: int = 31536000
    include_subdomains: bool = False
    preload: bool = False

    def header_value(self) -> str:
        value = f"max-age={self.max_age}"
        if self.include_subdomains:
            value += "; includeSubDomains"
        if self.preload:
            value += "; preload"
        return value


@dataclass(frozen=True)
class RealIp:
    """Trust X-Forwarded-For from these peers (ingress-nginx use-forwarded-headers + proxy-real-ip-cidr).

    The client address (for source ranges, limits and X-Real-IP) is the rightmost address of
    X-Forwarded-For + peer that is not trusted. A peer outside `trusted` is the client, and its own
    X-Forwarded-For is dropped instead of passed on: it could say anything. On a PROXY protocol
    listener the peer is the header's source address: trust is judged on it, as if it had connected.
    """

    trusted: tuple[IpNetwork, ...]
    # ingress-nginx compute-full-forwarded-for: a trusted peer's X-Forwarded-For goes on with the
    # peer appended ("client, lb1, lb2"); off, X-Forwarded-For is replaced by the client address.
    compute_full_forwarded_for: bool = False


@dataclass(frozen=True)
class RouteTable:
    """Hosts → paths → backend names, plus the backends themselves."""

    virtual_hosts: tuple[VirtualHost, ...]
    backends: tuple[Backend, ...]
    default_backend: str | None = None


@dataclass(frozen=True)
class Configuration:
    """Everything one published generation of the proxy serves."""

    routes: RouteTable
    certificates: tuple[Certificate, ...] = ()
    default_certificate: Certificate | None = None
    crypto: CryptoSettings = CryptoSettings()
    timeouts: Timeouts = Timeouts()
    hsts: Hsts | None = None
    access_log_json: bool = False
    session_resumption: bool = True  # session cache + tickets; off = HAProxy's no-tls-tickets + cachesize 0
    tls_policy: TlsPolicy = TlsPolicy()
    real_ip: RealIp | None = None  # None: the TCP peer is the client; a client's X-Forwarded-For is replaced
    # Listener names ("https", "http") whose connections must start with a PROXY protocol header
    # (proxy.proxy_protocol), whose source address is then the client's: ingress-nginx use-proxy-protocol.
    proxy_protocol: tuple[str, ...] = ()


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, reported with where it is and how to fix it."""

    location: str  # "routes.yaml:12:7" or "Ingress default/web"
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"
