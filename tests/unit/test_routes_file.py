"""The routes-file loader: valid files → the exact model; every user mistake → FILE:LINE:COL + fix.

Problem cases are YAML texts with a `»` before each token a problem must point at; the i-th
marker pairs with the i-th message fragment, and the loader must report exactly those problems.
Certificates and keys are generated per session (never checked in) and written per test.
"""

from __future__ import annotations

import datetime
import ipaddress
import pathlib
import shutil
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from config.model import (
    Address,
    Backend,
    Canary,
    Certificate,
    Configuration,
    CryptoSettings,
    EngineKey,
    EngineSettings,
    Hsts,
    Listeners,
    PathRule,
    PathType,
    RealIp,
    PemKey,
    ProviderSettings,
    StoreKey,
    RouteTable,
    Timeouts,
    VirtualHost,
)
from config.routes_file import LoadedRoutes, RoutesFileError, load_routes_file

MARKER = "»"
SECRET_PIN = "s3cr3t-PIN-9876"
LISTEN = "listen: {https: 127.0.0.1:8443}\n"
B = "backends: {b: {endpoints: ['127.0.0.1:1']}}\n"
B2 = "backends: {b: {endpoints: ['127.0.0.1:1']}, c: {endpoints: ['127.0.0.1:2']}}\n"
EXAMPLE_ROUTES = pathlib.Path(__file__).parents[2] / "examples" / "routes.yaml"


# ---- key material -------------------------------------------------------------------------------


def _self_signed(key: Any, dns_names: list[str] | None) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "routes-file test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )
    if dns_names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Any, key_format: serialization.PrivateFormat, password: bytes | None = None) -> bytes:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, key_format, encryption)


@pytest.fixture(scope="session")
def key_material() -> dict[str, bytes]:
    """File name under certs/ → content."""
    site_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_key = ec.generate_private_key(ec.SECP256R1())
    site_pem = _self_signed(site_key, ["foo.example.com", "*.Example.com", "*", "under_score.example"])
    nosan_pem = _self_signed(other_key, None)
    return {
        "site.pem": site_pem,  # SANs: 2 usable, a bare "*" and an invalid name (both skipped)
        "site.key": _key_pem(site_key, serialization.PrivateFormat.PKCS8),
        "rsa.pem": _self_signed(rsa_key, ["rsa.example.com"]),
        "rsa.key": _key_pem(rsa_key, serialization.PrivateFormat.TraditionalOpenSSL),  # PKCS#1
        "chain.pem": site_pem + nosan_pem,
        "nosan.pem": nosan_pem,
        "nosan.key": _key_pem(other_key, serialization.PrivateFormat.PKCS8),
        "encrypted.key": _key_pem(site_key, serialization.PrivateFormat.PKCS8, password=b"pw"),
        "garbage.pem": b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
        "text.pem": b"just some text\n",
        "hsm.pem": _self_signed(other_key, ["hsm.example.com"]),
    }


@pytest.fixture
def routes_dir(tmp_path: pathlib.Path, key_material: dict[str, bytes]) -> pathlib.Path:
    (tmp_path / "certs").mkdir()
    for name, content in key_material.items():
        (tmp_path / "certs" / name).write_bytes(content)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "hsm.pin").write_text(f"{SECRET_PIN}\n")
    (tmp_path / "secrets" / "empty.pin").write_text("")
    return tmp_path


def write_routes(directory: pathlib.Path, text: str) -> pathlib.Path:
    path = directory / "routes.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# ---- tiny builders for expected models ----------------------------------------------------------


def addr(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return Address(host.strip("[]"), int(port))


def vhost(host: str, *rules: tuple[str, PathType, str], redirect: bool = False) -> VirtualHost:
    return VirtualHost(host, tuple(PathRule(path, kind, backend) for path, kind, backend in rules), redirect)


def backend(name: str, *endpoints: str) -> Backend:
    return Backend(name, tuple(addr(endpoint) for endpoint in endpoints))


E, P, I = PathType.EXACT, PathType.PREFIX, PathType.IMPLEMENTATION_SPECIFIC


# ---- a full valid file --------------------------------------------------------------------------

FULL_FILE = """\
listen:
  https: 127.0.0.1:8443
  http: "[::1]:8080"
  admin: localhost:9100
tls:
  certificates:
    - {cert: certs/site.pem, key: certs/site.key}
    - cert: certs/rsa.pem
      key: certs/rsa.key
      hosts: [RSA.example.com, "*.rsa.example.com"]
    - {cert: certs/chain.pem, key: certs/site.key, hosts: [chain.example.com]}
    - {cert: certs/hsm.pem, key: "engine:pkcs11:token=proxy;object=tlskey;type=private", pin_env: HSM_PIN}
    - {cert: certs/hsm.pem, key: "engine:pkcs11:object=second", pin_file: secrets/hsm.pin}
    - {cert: certs/hsm.pem, key: "pkcs11:token=proxy;object=provided?pin-value=4321"}
  default_certificate: {cert: certs/nosan.pem, key: certs/nosan.key}
  engine:
    id: pkcs11
    so_path: /usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so
    ctrl: [[MODULE_PATH, /usr/lib/softhsm/libsofthsm2.so], [VERBOSE, 1]]
    algorithms: [RSA, EC]
    required: true
  async: true
  providers:
    - legacy
    - name: pkcs11
      parameters: {pkcs11-module-path: /usr/lib/softhsm/libsofthsm2.so, pkcs11-module-cache-keys: "true"}
  propquery: "?provider=pkcs11"
timeouts: {connect: 0.5, idle: 120}
hsts: {max_age: 60, include_subdomains: yes}
access_log: {json: true}
routes:
  - host: Foo.Example.com
    redirect_to_https: true
    paths:
      - {path: /, backend: web}
      - {path: /api, type: Prefix, backend: api}
  - host: "*.example.com"
    paths: [{path: /exact, type: Exact, backend: api}, {path: /app, type: ImplementationSpecific, backend: web}]
  - paths: [{path: /, backend: web}]
  - host: foo.example.com
    redirect_to_https: true
    paths: [{path: /api, type: Exact, backend: api}]
default_backend: web
backends:
  web: {endpoints: ["127.0.0.1:9001"]}
  api: {endpoints: ["127.0.0.1:9002", "[::0001]:9003", "Backend.Local:80"]}
"""


def test_full_file_gives_the_expected_configuration(routes_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HSM_PIN", "12;34")
    path = write_routes(routes_dir, FULL_FILE)
    material = {name: (routes_dir / "certs" / name).read_bytes() for name in ("site.pem", "rsa.pem", "nosan.pem", "hsm.pem")}
    chain = (routes_dir / "certs" / "chain.pem").read_bytes()

    loaded = load_routes_file(path)

    assert loaded.listeners == Listeners(https=addr("127.0.0.1:8443"), http=addr("[::1]:8080"), admin=addr("localhost:9100"))
    expected = Configuration(
        routes=RouteTable(
            virtual_hosts=(  # canonical order (config.route_rules): hosts sorted, rules by (path, type)
                vhost("", ("/", P, "web")),
                vhost("*.example.com", ("/app", I, "web"), ("/exact", E, "api")),
                vhost("foo.example.com", ("/", P, "web"), ("/api", E, "api"), ("/api", P, "api"), redirect=True),
            ),
            backends=(backend("web", "127.0.0.1:9001"), backend("api", "127.0.0.1:9002", "[::1]:9003", "backend.local:80")),
            default_backend="web",
        ),
        certificates=(
            Certificate(material["site.pem"], PemKey((routes_dir / "certs/site.key").read_bytes()),
                        ("foo.example.com", "*.example.com"), f"{path}:7:7"),
            Certificate(material["rsa.pem"], PemKey((routes_dir / "certs/rsa.key").read_bytes()),
                        ("rsa.example.com", "*.rsa.example.com"), f"{path}:8:7"),
            Certificate(chain, PemKey((routes_dir / "certs/site.key").read_bytes()), ("chain.example.com",), f"{path}:11:7"),
            Certificate(material["hsm.pem"], EngineKey("pkcs11:token=proxy;object=tlskey;type=private;pin-value=12%3B34"),
                        ("hsm.example.com",), f"{path}:12:7"),
            Certificate(material["hsm.pem"], EngineKey(f"pkcs11:object=second;pin-value={SECRET_PIN}"),
                        ("hsm.example.com",), f"{path}:13:7"),
            Certificate(material["hsm.pem"], StoreKey("pkcs11:token=proxy;object=provided", "4321"),
                        ("hsm.example.com",), f"{path}:14:7"),
        ),
        default_certificate=Certificate(
            material["nosan.pem"], PemKey((routes_dir / "certs/nosan.key").read_bytes()), (), f"{path}:15:24"
        ),
        crypto=CryptoSettings(
            engine=EngineSettings(
                id="pkcs11",
                so_path="/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so",
                ctrl=(("MODULE_PATH", "/usr/lib/softhsm/libsofthsm2.so"), ("VERBOSE", "1")),
                algorithms=("RSA", "EC"),
                required=True,
            ),
            async_mode=True,
            providers=(
                ProviderSettings("legacy"),
                ProviderSettings(
                    "pkcs11",
                    parameters=(("pkcs11-module-path", "/usr/lib/softhsm/libsofthsm2.so"), ("pkcs11-module-cache-keys", "true")),
                ),
            ),
            propquery="?provider=pkcs11",
        ),
        timeouts=Timeouts(connect=0.5, idle=120.0),
        hsts=Hsts(max_age=60, include_subdomains=True),
        access_log_json=True,
    )
    assert loaded.configuration.routes == expected.routes
    assert loaded.configuration.certificates == expected.certificates
    assert loaded.configuration == expected
    # chain_pem, PemKey.pem and EngineKey.uri are excluded from equality's repr, not from equality:
    assert loaded.configuration.certificates[3].key.uri.endswith(";pin-value=12%3B34")  # type: ignore[union-attr]
    assert "4321" not in repr(loaded.configuration)  # a StoreKey's PIN stays out of repr


# ---- small valid variants: one field, its expected value ------------------------------------------

Getter = Callable[[LoadedRoutes], object]
VALID_CASES: dict[str, tuple[str, Getter, object]] = {
    "defaults": (LISTEN, lambda r: r.configuration, Configuration(routes=RouteTable((), ()))),
    "listen-only-https": (LISTEN, lambda r: r.listeners, Listeners(https=addr("127.0.0.1:8443"))),
    "listen-all-interfaces-ipv6": ('listen: {https: "[::]:443", http: "0.0.0.0:80"}', lambda r: r.listeners,
                                   Listeners(https=addr("[::]:443"), http=addr("0.0.0.0:80"))),
    "hsts-true-is-defaults": (LISTEN + "hsts: true", lambda r: r.configuration.hsts, Hsts()),
    "hsts-false-is-off": (LISTEN + "hsts: false", lambda r: r.configuration.hsts, None),
    "hsts-max-age-zero": (LISTEN + "hsts: {max_age: 0}", lambda r: r.configuration.hsts, Hsts(max_age=0)),
    "host-omitted-is-any": (LISTEN + "routes: [{paths: [{path: /, backend: b}]}]\nbackends: {b: {endpoints: ['127.0.0.1:1']}}",
                            lambda r: r.configuration.routes.virtual_hosts, (vhost("", ("/", P, "b")),)),
    "host-empty-is-any": (LISTEN + "routes: [{host: '', paths: [{path: /, backend: b}]}]\nbackends: {b: {endpoints: ['127.0.0.1:1']}}",
                          lambda r: r.configuration.routes.virtual_hosts, (vhost("", ("/", P, "b")),)),
    "same-host-merged-in-file-order": (
        LISTEN + "routes:\n- {host: a.com, paths: [{path: /x, backend: b}]}\n- {host: c.com, paths: [{path: /, backend: b}]}\n"
        "- {host: A.com, paths: [{path: /y, backend: b}]}\nbackends: {b: {endpoints: ['127.0.0.1:1']}}",
        lambda r: r.configuration.routes.virtual_hosts,
        (vhost("a.com", ("/x", P, "b"), ("/y", P, "b")), vhost("c.com", ("/", P, "b"))),
    ),
    "same-path-different-type-is-no-duplicate": (
        LISTEN + "routes: [{paths: [{path: /x, backend: b}, {path: /x, type: Exact, backend: b}]}]\n"
        "backends: {b: {endpoints: ['127.0.0.1:1']}}",
        lambda r: r.configuration.routes.virtual_hosts, (vhost("", ("/x", E, "b"), ("/x", P, "b")),),
    ),
    "trusted-proxies": (
        LISTEN + B + "trusted_proxies: [10.0.0.0/8, '::1']\nroutes: [{paths: [{path: /, backend: b}]}]\n",
        lambda r: r.configuration.real_ip,
        RealIp((ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))),
    ),
    "trusted-proxies-full-chain": (
        LISTEN + B + "trusted_proxies: [10.0.0.0/8]\ncompute_full_forwarded_for: true\nroutes: [{paths: [{path: /, backend: b}]}]\n",
        lambda r: r.configuration.real_ip,
        RealIp((ipaddress.ip_network("10.0.0.0/8"),), compute_full_forwarded_for=True),
    ),
    "proxy-protocol-listeners": (
        "listen:\n  https: {address: '127.0.0.1:8443', proxy_protocol: true}\n  http: {address: '127.0.0.1:8080'}\n"
        "  admin: 127.0.0.1:9100\n",
        lambda r: (r.listeners, r.configuration.proxy_protocol),
        (Listeners(https=Address("127.0.0.1", 8443), http=Address("127.0.0.1", 8080), admin=Address("127.0.0.1", 9100)), ("https",)),
    ),
    "proxy-protocol-both": (
        "listen: {https: {address: '[::1]:8443', proxy_protocol: true}, http: {address: '[::1]:8080', proxy_protocol: true}}\n",
        lambda r: r.configuration.proxy_protocol, ("https", "http"),
    ),
    "proxy-protocol-default-off": (LISTEN, lambda r: r.configuration.proxy_protocol, ()),
    "hsts-per-host": (
        LISTEN + B + "hsts: true\nroutes:\n- {host: a.com, hsts: false, paths: [{path: /, backend: b}]}\n"
        "- {host: b.com, hsts: {max_age: 60}, paths: [{path: /, backend: b}]}\n- {host: c.com, paths: [{path: /, backend: b}]}\n",
        lambda r: [(v.host, v.hsts) for v in r.configuration.routes.virtual_hosts],
        [("a.com", False), ("b.com", Hsts(max_age=60)), ("c.com", None)],
    ),
    # config.route_rules: one rule for both producers (the translator's cases conflict-* agree)
    "same-rule-twice-same-backend-is-kept-once": (
        LISTEN + B + "routes: [{paths: [{path: /a, backend: b}, {path: /a/, backend: b}, {path: /a, backend: b}]}]\n",
        lambda r: r.configuration.routes.virtual_hosts, (vhost("", ("/a", P, "b")),),
    ),
    "canary-weight-total": (
        LISTEN + "backends: {b: {endpoints: ['127.0.0.1:1']}, c: {endpoints: ['127.0.0.1:2']}}\n"
        "routes: [{policy: {canary: {backend: c, weight: 5, weight_total: 1000}}, paths: [{path: /, backend: b}]}]\n",
        lambda r: r.configuration.routes.virtual_hosts[0].paths[0].policy.canary,  # type: ignore[union-attr]
        Canary("c", weight=5, weight_total=1000),
    ),
    "canary-weight-total-default": (
        LISTEN + "backends: {b: {endpoints: ['127.0.0.1:1']}, c: {endpoints: ['127.0.0.1:2']}}\n"
        "routes: [{policy: {canary: {backend: c, weight: 5}}, paths: [{path: /, backend: b}]}]\n",
        lambda r: r.configuration.routes.virtual_hosts[0].paths[0].policy.canary,  # type: ignore[union-attr]
        Canary("c", weight=5, weight_total=100),
    ),
    "engine-defaults": (LISTEN + "tls: {engine: {id: qatengine}}", lambda r: r.configuration.crypto,
                        CryptoSettings(engine=EngineSettings(id="qatengine", algorithms=("ALL",), required=False))),
    "session-resumption-off": (LISTEN + "tls: {session_resumption: false}", lambda r: r.configuration.session_resumption, False),
    "session-resumption-default-on": (LISTEN + "tls: {async: false}", lambda r: r.configuration.session_resumption, True),
    "timeouts-integer-seconds": (LISTEN + "timeouts: {drain: 3}", lambda r: r.configuration.timeouts, Timeouts(drain=3.0)),
    "string-field-takes-number-as-written": (
        LISTEN + "tls: {engine: {id: 0123}}", lambda r: r.configuration.crypto.engine.id, "0123"  # type: ignore[union-attr]
    ),
    "yaml-anchor-reused": (
        LISTEN + B + "routes: [{paths: &p [{path: /, backend: b}]}, {host: x.com, paths: *p}]",
        lambda r: r.configuration.routes.virtual_hosts, (vhost("", ("/", P, "b")), vhost("x.com", ("/", P, "b"))),
    ),
}


@pytest.mark.parametrize("text, getter, expected", VALID_CASES.values(), ids=VALID_CASES.keys())
def test_valid_variant(routes_dir: pathlib.Path, text: str, getter: Getter, expected: object) -> None:
    assert getter(load_routes_file(write_routes(routes_dir, text))) == expected


# ---- problems: location and message -------------------------------------------------------------


@dataclass(frozen=True)
class ProblemCase:
    text: str  # `»` before each token a problem points at
    fragments: tuple[str, ...]  # one message fragment per marker, in file order
    env: dict[str, str] = field(default_factory=dict)


def case(text: str, *fragments: str, env: dict[str, str] | None = None) -> ProblemCase:
    return ProblemCase(textwrap.dedent(text), fragments, env or {})


ENGINE = "  engine: {id: pkcs11}\n"
ROUTES = LISTEN + B + "routes: "
HSM_ENTRY = LISTEN + "tls:\n" + ENGINE + "  certificates: [{cert: certs/hsm.pem, key: 'engine:pkcs11:object=k', "
ENGINE_WITH = LISTEN + "tls: {engine: {id: e, "
PROBLEM_CASES: dict[str, ProblemCase] = {
    # listeners with options (PROXY protocol)
    "listener-proxy-protocol-not-a-flag": case(
        "listen: {https: {address: '127.0.0.1:8443', proxy_protocol: »yes please}}\n", "listen.https.proxy_protocol: expected true or false"
    ),
    "listener-options-without-address": case("listen: {https: »{proxy_protocol: true}}\n", "listen.https: missing required key 'address'"),
    "listener-options-unknown-key": case(
        "listen: {https: {address: '127.0.0.1:8443', »proxy_protocl: true}}\n", "did you mean 'proxy_protocol'?"
    ),
    "listener-proxy-protocol-on-admin": case(
        LISTEN.replace("}", ", admin: {address: '127.0.0.1:9100', proxy_protocol: »true}}"),
        "only the https and http listeners read a PROXY protocol header",
    ),
    "listener-options-bad-address": case("listen: {https: {address: »'127.0.0.1', proxy_protocol: true}}\n", "listen.https"),
    "compute-full-without-trusted-proxies": case(LISTEN + "compute_full_forwarded_for: »true\n", "needs trusted_proxies"),
    # the document
    "yaml-syntax-error": case("listen: {https: 127.0.0.1:8443\nroutes»: []\n", "YAML syntax error"),
    "yaml-two-documents": case(LISTEN + "»---\n" + LISTEN, "YAML syntax error"),
    "empty-file": case("»", "the file is empty"),
    "top-level-not-a-mapping": case("»- listen\n", "expected a mapping, got a list"),
    "unknown-key-suggests-closest": case(LISTEN + "»rouets: []\n", "unknown key 'rouets' (did you mean 'routes'?)"),
    "unknown-key-lists-known-keys": case(LISTEN + "»zzz: 1\n", "known keys: listen, tls"),
    "duplicate-key": case(LISTEN + "routes: []\n»routes: []\n", "duplicate key 'routes'"),
    "non-scalar-key": case(LISTEN + "»[a]: 1\n", "a key must be plain text"),
    "missing-listen": case("»routes: []\n", "missing required key 'listen'"),
    # listen
    "listen-not-a-mapping": case("listen: »127.0.0.1:8443\n", "listen: expected a mapping, got a string"),
    "missing-https": case("listen: »{http: 127.0.0.1:8080}\n", "missing required key 'https' (add https: 127.0.0.1:8443)"),
    "unknown-listen-key": case("listen: {https: 127.0.0.1:8443, »htps: 1}\n", "did you mean 'https'?"),
    "address-number": case("listen: {https: »8443}\n", "'8443' has no port"),
    "address-no-port": case("listen: {https: »localhost}\n", "has no port"),
    "address-empty-host": case("listen: {https: »':8443'}\n", "write 0.0.0.0:8443 for every interface"),
    "address-ipv6-without-brackets": case("listen: {https: »'::1:8443'}\n", "write [::1]:8443"),
    "address-brackets-not-ipv6": case("listen: {https: »'[1.2.3.4]:80'}\n", "is not an IPv6 address"),
    "address-ipv6-unquoted-is-a-list": case("listen:\n  https: »[fe80::1]\n", 'quote IPv6 addresses: "[::1]:8443"'),
    "address-ipv6-unquoted-syntax-error": case("listen:\n  https: [»::1]:8443\n",
                                               '(quote IPv6 addresses: "[::1]:8443")'),
    "address-brackets-no-port": case("listen: {https: »'[::1]'}\n", "is not [IPv6]:port"),
    "address-port-zero": case("listen: {https: »127.0.0.1:0}\n", "port '0' is not a number from 1 to 65535"),
    "address-port-too-big": case("listen: {https: »127.0.0.1:65536}\n", "port '65536'"),
    "address-port-not-digits": case("listen: {https: »127.0.0.1:https}\n", "port 'https'"),
    "address-bad-ipv4": case("listen: {https: »127.0.0.01:80}\n", "'127.0.0.01' is not a valid IPv4 address"),
    "address-bad-host-name": case("listen: {https: »bad_host:80}\n", "neither an IP address nor a host name"),
    "listener-duplicate": case("listen: {https: 127.0.0.1:8443, admin: »127.0.0.1:8443}\n",
                               "listen.admin: 127.0.0.1:8443 clashes with listen.https"),
    "listener-wildcard-clash": case("listen: {https: 127.0.0.1:8443, http: »0.0.0.0:8443}\n", "clashes with listen.https"),
    "listener-ipv6-canonical-clash": case("listen: {https: '[::1]:80', http: »'[0:0::1]:80'}\n", "clashes"),
    # routes and paths
    "routes-not-a-list": case(LISTEN + "routes: »{host: a}\n", "routes: expected a list, got a mapping"),
    "route-missing-paths": case(LISTEN + "routes: [»{host: a.com}]\n", "missing required key 'paths'"),
    "route-empty-paths": case(LISTEN + "routes: [{host: a.com, paths: »[]}]\n", "the list is empty"),
    "path-unknown-key-and-missing-backend": case(
        ROUTES + "[{paths: [»{path: /, »bakend: b}]}]\n",
        "missing required key 'backend'", "unknown key 'bakend' (did you mean 'backend'?)",
    ),
    "path-bad-type": case(ROUTES + "[{paths: [{path: /, type: »prefix, backend: b}]}]\n",
                          "'prefix' is not a path type (use Exact, Prefix or ImplementationSpecific)"),
    "path-exact-without-slash": case(ROUTES + "[{paths: [{path: »api, type: Exact, backend: b}]}]\n",
                                     "Exact paths start with '/' (write '/api')"),
    "path-prefix-without-slash": case(ROUTES + "[{paths: [{path: »api, backend: b}]}]\n", "Prefix paths start with '/'"),
    "path-implementation-specific-without-slash": case(
        ROUTES + "[{paths: [{path: »app, type: ImplementationSpecific, backend: b}]}]\n",
        "ImplementationSpecific paths start with '/' (write '/app')",
    ),
    "path-empty": case(ROUTES + "[{paths: [{path: »'', backend: b}]}]\n", "Prefix paths start with '/' (write '/')"),
    "path-not-a-string": case(ROUTES + "[{paths: [{path: »[/], backend: b}]}]\n", "expected a string, got a list"),
    "redirect-not-a-boolean": case(ROUTES + "[{redirect_to_https: »'yes', paths: [{path: /, backend: b}]}]\n",
                                   "expected true or false, got a string"),
    "undefined-backend-suggests": case(LISTEN + "backends: {web: {endpoints: ['127.0.0.1:1']}}\n"
                                       "routes: [{paths: [{path: /, backend: »webb}]}]\n",
                                       "backend 'webb' is not defined (did you mean 'web'?)"),
    "undefined-backend-no-backends": case(LISTEN + "routes: [{paths: [{path: /, backend: »web}]}]\n",
                                          "define it under backends:"),
    "undefined-default-backend": case(LISTEN + B + "default_backend: »c\n", "default_backend: backend 'c' is not defined"),
    "conflicting-rule-in-one-entry": case(
        LISTEN + B2 + "routes:\n- paths:\n  - {path: /a, backend: b}\n  - »{path: /a, backend: c}\n",
        "routes[0].paths[1]: path '/a' (Prefix) on host '*' is already routed to b by the rule at",
    ),
    "conflicting-rule-across-merged-entries": case(
        LISTEN + B2 + "routes:\n- {host: a.com, paths: [{path: /, backend: b}]}\n- {host: A.COM, paths: [»{path: /, backend: c}]}\n",
        "path '/' (Prefix) on host 'a.com' is already routed to b",
    ),
    # per-route policy (issue 13): each refused value at its own position
    "hsts-per-host-disagree": case(
        LISTEN + B + "routes:\n- {host: a.com, hsts: false, paths: [{path: /, backend: b}]}\n"
        "- {host: a.com, hsts: »true, paths: [{path: /x, backend: b}]}\n",
        "routes[1].hsts: host 'a.com' already has another hsts at",
    ),
    "policy-bad-cidr": case(ROUTES + "[{policy: {allow_sources: [10.0.0.0/8, »10.0.0.0/33]}, paths: [{path: /, backend: b}]}]\n",
                            "routes[0].policy.allow_sources: '10.0.0.0/33' is not an IP address or CIDR"),
    "policy-unknown-key": case(ROUTES + "[{policy: {»allow_source: [10.0.0.0/8]}, paths: [{path: /, backend: b}]}]\n",
                               "routes[0].policy: unknown key 'allow_source' (did you mean 'allow_sources'?)"),
    "policy-bad-size": case(ROUTES + "[{policy: {max_body_size: »lots}, paths: [{path: /, backend: b}]}]\n",
                            "routes[0].policy.max_body_size: 'lots' is not a size"),
    "policy-bad-redirect-code": case(ROUTES + "[{policy: {redirect: {to: /x, code: »200}}, paths: [{path: /, backend: b}]}]\n",
                                     "routes[0].policy.redirect.code: redirect code 200 does not redirect (use one of 301, 302, 303, 307, 308)"),
    "policy-redirect-injection": case(
        ROUTES + '[{policy: {redirect: {to: »"/x\\r\\nSet-Cookie: a=b"}}, paths: [{path: /, backend: b}]}]\n',
        "routes[0].policy.redirect.to: redirect location contains a control character",
    ),
    "policy-unsafe-regex": case(ROUTES + "[{policy: {regex: true}, paths: [{path: »'/(a+)+', backend: b}]}]\n",
                                "routes[0].paths[0].path: '/(a+)+' nests a repeat inside a repeat"),
    "policy-rewrite-group-missing": case(
        ROUTES + "[{policy: {regex: true, rewrite_target: /$2}, paths: [{path: »'/api(.*)', backend: b}]}]\n",
        "rewrite target '/$2' uses $2 but the path has 1 capture group(s)",
    ),
    "policy-cors-bad-origin": case(ROUTES + "[{policy: {cors: {allow_origins: »[app.example.com]}}, paths: [{path: /, backend: b}]}]\n",
                                   "routes[0].policy.cors.allow_origins: 'app.example.com' is not an origin"),
    "policy-header-edit-framing": case(
        ROUTES + "[{policy: {request_headers: {set: {Content-Length: »'5'}}}, paths: [{path: /, backend: b}]}]\n",
        "routes[0].policy.request_headers.set: header Content-Length cannot be edited",
    ),
    "policy-canary-undefined-backend": case(
        ROUTES + "[{policy: {canary: {backend: »bb, weight: 10}}, paths: [{path: /, backend: b}]}]\n",
        "routes[0].policy.canary.backend: backend 'bb' is not defined (did you mean 'b'?)",
    ),
    "policy-canary-weight": case(
        ROUTES + "[{policy: {canary: {backend: b, weight: »101}}, paths: [{path: /, backend: b}]}]\n",
        "routes[0].policy.canary.weight: 101 is not from 0 to 100",
    ),
    "policy-canary-weight-over-its-total": case(
        ROUTES + "[{policy: {canary: {backend: b, weight: »1001, weight_total: 1000}}, paths: [{path: /, backend: b}]}]\n",
        "routes[0].policy.canary.weight: 1001 is not from 0 to 1000 (write a whole number from 0 to 1000)",
    ),
    "policy-canary-weight-not-whole": case(
        ROUTES + "[{policy: {canary: {backend: b, weight: »2.5}}, paths: [{path: /, backend: b}]}]\n",
        "routes[0].policy.canary.weight: 2.5 is not from 0 to 100",
    ),
    "policy-canary-weight-total-zero": case(
        ROUTES + "[{policy: {canary: {backend: b, weight: 0, weight_total: »0}}, paths: [{path: /, backend: b}]}]\n",
        "routes[0].policy.canary.weight_total: 0 is not a whole number above 0",
    ),
    "policy-conflict-same-backend-other-policy": case(
        ROUTES + "\n- {host: a.com, paths: [{path: /admin, backend: b}]}\n"
        "- {host: a.com, policy: {allow_sources: [10.0.0.0/8]}, paths: [»{path: /admin/, backend: b}]}\n",
        "is already routed to b with a different policy by the rule at",
    ),
    "trailing-slash-is-the-same-prefix-rule": case(  # the issue-13 case: /foo → one, /foo/ → two
        LISTEN + B2 + "routes:\n- {host: a.com, paths: [{path: /foo, backend: b}, »{path: /foo/, backend: c}]}\n",
        "path '/foo/' (Prefix) on host 'a.com' is already routed to b by the rule at",
    ),
    "merged-entries-disagree-on-redirect": case(
        LISTEN + B + "routes:\n- {host: a.com, paths: [{path: /, backend: b}]}\n"
        "- {host: a.com, redirect_to_https: »true, paths: [{path: /x, backend: b}]}\n",
        "host 'a.com' already has redirect_to_https: false",
    ),
    # host patterns
    "host-with-port": case(ROUTES + "[{host: »'a.com:8443', paths: [{path: /, backend: b}]}]\n", "remove ':8443'"),
    "host-trailing-dot": case(ROUTES + "[{host: »a.com., paths: [{path: /, backend: b}]}]\n", "ends with a dot (write a.com)"),
    "host-wildcard-not-leftmost": case(ROUTES + "[{host: »'a.*.com', paths: [{path: /, backend: b}]}]\n",
                                       "must be the whole leftmost label (like *.example.com)"),
    "host-wildcard-partial-label": case(ROUTES + "[{host: »'a*.b.com', paths: [{path: /, backend: b}]}]\n",
                                        "whole leftmost label (write *.b.com)"),
    "host-wildcard-nothing-after": case(ROUTES + "[{host: »'*.', paths: [{path: /, backend: b}]}]\n", "is not a valid wildcard"),
    "host-two-wildcards": case(ROUTES + "[{host: »'*.*.com', paths: [{path: /, backend: b}]}]\n", "is not a valid wildcard"),
    "host-bare-star": case(ROUTES + "[{host: »'*', paths: [{path: /, backend: b}]}]\n", "omit host to match every host"),
    "host-invalid-characters": case(ROUTES + "[{host: »a_b.com, paths: [{path: /, backend: b}]}]\n",
                                    "is not a valid host name"),
    "host-unicode": case(ROUTES + "[{host: »bücher.de, paths: [{path: /, backend: b}]}]\n", "punycode"),
    # backends
    "backend-duplicate-endpoint": case(LISTEN + "backends: {b: {endpoints: ['127.0.0.1:1', »'127.0.0.1:1']}}\n",
                                       "backends.b.endpoints[1]: 127.0.0.1:1 is listed twice"),
    "backend-duplicate-endpoint-canonical-ipv6": case(LISTEN + "backends: {b: {endpoints: ['[::1]:80', »'[0::0001]:80']}}\n",
                                                      "[::1]:80 is listed twice"),
    "backend-empty-endpoints": case(LISTEN + "backends: {b: {endpoints: »[]}}\n", "the list is empty"),
    "backend-missing-endpoints": case(LISTEN + "backends: {b: »{»endpoint: []}}\n",
                                      "missing required key 'endpoints'", "unknown key 'endpoint' (did you mean 'endpoints'?)"),
    "backend-bad-endpoint-still-defined": case(LISTEN + "backends: {b: {endpoints: [»'127.0.0.1']}}\n"
                                               "routes: [{paths: [{path: /, backend: b}]}]\n", "has no port"),
    # certificates
    "cert-unreadable": case(LISTEN + "tls: {certificates: [{cert: »certs/missing.pem, key: certs/site.key}]}\n",
                            "tls.certificates[0].cert: cannot read"),
    "key-unreadable": case(LISTEN + "tls: {certificates: [{cert: certs/site.pem, key: »certs/missing.key}]}\n",
                           "tls.certificates[0].key: cannot read"),
    "cert-does-not-parse": case(LISTEN + "tls: {certificates: [{cert: »certs/garbage.pem, key: certs/site.key}]}\n",
                                "does not parse (re-export it as PEM)"),
    "cert-no-pem-block": case(LISTEN + "tls: {certificates: [{cert: »certs/text.pem, key: certs/site.key}]}\n",
                              "holds no PEM certificate"),
    "key-does-not-parse": case(LISTEN + "tls: {certificates: [{cert: certs/site.pem, key: »certs/site.pem}]}\n",
                               "holds no usable PEM private key"),
    "key-encrypted": case(LISTEN + "tls: {certificates: [{cert: certs/site.pem, key: »certs/encrypted.key}]}\n", "is encrypted"),
    "key-does-not-match": case(LISTEN + "tls: {certificates: [{cert: certs/site.pem, key: »certs/rsa.key}]}\n",
                               "the key does not match the certificate's public key"),
    "cert-without-san-needs-hosts": case(LISTEN + "tls: {certificates: [»{cert: certs/nosan.pem, key: certs/nosan.key}]}\n",
                                         "no usable DNS name in subjectAltName (add hosts:"),
    "cert-hosts-empty": case(LISTEN + "tls: {certificates: [{cert: certs/site.pem, key: certs/site.key, hosts: »[]}]}\n",
                             "the list is empty"),
    "cert-hosts-bad-pattern": case(
        LISTEN + "tls: {certificates: [{cert: certs/site.pem, key: certs/site.key, hosts: [a.com, »'a.com:1']}]}\n",
                                   "tls.certificates[0].hosts[1]: 'a.com:1' carries a port"),
    "cert-missing-key": case(LISTEN + "tls: {certificates: [»{cert: certs/site.pem}]}\n", "missing required key 'key'"),
    "default-cert-takes-no-hosts": case(
        LISTEN + "tls: {default_certificate: {cert: certs/site.pem, key: certs/site.key, »hosts: [a.com]}}\n",
        "tls.default_certificate: unknown key 'hosts'",
    ),
    "uri-of-an-unknown-scheme": case(LISTEN + "tls: {certificates: [{cert: certs/site.pem, key: »'tpm2:handle=1'}]}\n",
                                     'write key: "pkcs11:token=...;object=..." with tls.providers'),
    "pkcs11-key-without-provider": case(
        LISTEN + "tls: {providers: [legacy], certificates: [{cert: certs/hsm.pem, key: »'pkcs11:token=x;object=k'}]}\n",
        "a pkcs11: key needs a provider that opens pkcs11: URIs (add tls.providers"),
    "pkcs11-key-pin-twice": case(
        LISTEN + "tls: {providers: [pkcs11], certificates: [{cert: certs/hsm.pem, key: »'pkcs11:object=k?pin-value=1', "
        "pin_env: HSM_PIN}]}\n",
        "the key URI already carries pin-value while pin_env is set", env={"HSM_PIN": SECRET_PIN}),
    # engine keys and PINs
    "engine-key-without-engine": case(LISTEN + "tls: {certificates: [{cert: certs/hsm.pem, key: »'engine:pkcs11:object=k'}]}\n",
                                      "an engine: key needs tls.engine"),
    "engine-key-empty-uri": case(LISTEN + "tls:\n" + ENGINE + "  certificates: [{cert: certs/hsm.pem, key: »'engine:'}]\n",
                                 "the engine key URI is empty"),
    "pin-env-unset": case(HSM_ENTRY + "pin_env: »NO_SUCH_PIN}]\n",
                          "environment variable NO_SUCH_PIN is unset or empty"),
    "pin-env-empty": case(HSM_ENTRY + "pin_env: »EMPTY_PIN}]\n",
                          "EMPTY_PIN is unset or empty", env={"EMPTY_PIN": ""}),
    "pin-file-unreadable": case(HSM_ENTRY + "pin_file: »secrets/nope}]\n",
                                "pin_file: cannot read"),
    "pin-file-empty": case(HSM_ENTRY + "pin_file: »secrets/empty.pin}]\n",
                           "is empty (write the PIN on its first line)"),
    "pin-env-and-pin-file": case(HSM_ENTRY + "pin_env: HSM_PIN, pin_file: »secrets/hsm.pin}]\n",
                                 "give either pin_env or pin_file", env={"HSM_PIN": "1"}),
    "pin-with-pem-key": case(LISTEN + "tls: {certificates: [{cert: certs/site.pem, key: certs/site.key, pin_env: »HSM_PIN}]}\n",
                             "only engine: and pkcs11: keys take a PIN"),
    "pin-twice": case(
        LISTEN + "tls:\n" + ENGINE + "  certificates: [{cert: certs/hsm.pem, key: »'engine:pkcs11:object=k;pin-value=1', "
        "pin_env: HSM_PIN}]\n",
                      "already carries pin-value", env={"HSM_PIN": "1"}),
    # engine settings
    "engine-missing-id": case(LISTEN + "tls: {engine: »{so_path: /x.so}}\n", "tls.engine: missing required key 'id'"),
    "engine-unknown-algorithm-case": case(ENGINE_WITH + "algorithms: [»rsa]}}\n", "unknown algorithm 'rsa' (did you mean RSA?)"),
    "engine-unknown-algorithm": case(ENGINE_WITH + "algorithms: [RSA, »AES]}}\n", "unknown algorithm 'AES' (use RSA, DSA"),
    "engine-empty-algorithms": case(ENGINE_WITH + "algorithms: »[]}}\n", "omit it for [ALL]"),
    "engine-ctrl-not-pairs": case(ENGINE_WITH + "ctrl: [[A, 1], »[B]]}}\n", "tls.engine.ctrl[1]: expected a [name, value] pair"),
    "engine-ctrl-mapping": case(ENGINE_WITH + "ctrl: »{A: 1}}}\n", "tls.engine.ctrl: expected a list"),
    "engine-required-not-boolean": case(ENGINE_WITH + "required: »1}}\n", "expected true or false, got a number"),
    "async-not-boolean": case(LISTEN + "tls: {async: »'on'}\n", "tls.async: expected true or false"),
    "path-without-slash-reported-even-with-bad-type": case(
        LISTEN + B + "routes: [{paths: [{path: »api, type: »Fuzzy, backend: b}]}]\n",
        "paths start with '/'", "'Fuzzy' is not a path type",
    ),
    "session-resumption-not-boolean": case(
        LISTEN + "tls: {session_resumption: »maybe}\n", "tls.session_resumption: expected true or false"
    ),
    "providers-entry-a-list": case(LISTEN + "tls: {providers: [»[1]]}\n", "tls.providers[0]: expected a name or a mapping"),
    "provider-key-typo": case(LISTEN + "tls: {providers: [{name: pkcs11, »modul: /x.so}]}\n",
                              "tls.providers[0]: unknown key 'modul' (did you mean 'module'?)"),
    "provider-without-name": case(LISTEN + "tls: {providers: [»{module: /x.so}]}\n",
                                  "tls.providers[0]: missing required key 'name'"),
    "provider-twice": case(LISTEN + "tls: {providers: [pkcs11, {name: »pkcs11}]}\n", "provider 'pkcs11' is listed twice"),
    "provider-bad-name": case(LISTEN + "tls: {providers: [»'pk cs11']}\n", "'pk cs11' is not a provider name"),
    "provider-module-missing": case(LISTEN + "tls: {providers: [{name: qat, module: »/nonexistent/qatprovider.so}]}\n",
                                    "tls.providers[0].module: no such file /nonexistent/qatprovider.so"),
    "provider-parameter-not-text": case(LISTEN + "tls: {providers: [{name: p, parameters: {a: »[1]}}]}\n",
                                        "tls.providers[0].parameters.a: expected a string"),
    "provider-path-missing": case(LISTEN + "tls: {provider_path: »/nonexistent/modules}\n",
                                  "tls.provider_path: /nonexistent/modules is not a directory"),
    # timeouts, hsts, access log
    "timeout-zero": case(LISTEN + "timeouts: {connect: »0}\n", "timeouts.connect: 0 is not a positive number of seconds"),
    "timeout-negative": case(LISTEN + "timeouts: {idle: »-1.5}\n", "-1.5 is not a positive number"),
    "timeout-infinite": case(LISTEN + "timeouts: {idle: ».inf}\n", "is not a positive number"),
    "timeout-with-unit": case(LISTEN + "timeouts: {idle: »10s}\n", "timeouts.idle: expected a number, got a string"),
    "timeout-unknown-key": case(LISTEN + "timeouts: {»read: 1}\n", "unknown key 'read'"),
    "hsts-not-mapping-or-boolean": case(LISTEN + "hsts: »'yes please'\n", "expected a mapping or true/false"),
    "hsts-negative-max-age": case(LISTEN + "hsts: {max_age: »-1}\n", "not a whole number of seconds >= 0"),
    "hsts-fractional-max-age": case(LISTEN + "hsts: {max_age: »1.5}\n", "not a whole number"),
    "access-log-json-not-boolean": case(LISTEN + "access_log: {json: »'true'}\n", "access_log.json: expected true or false"),
    # many at once, in file order
    "several-problems-at-once": case(
        """\
        listen: {https: »127.0.0.1:99999}
        tls:
          engine: {id: e, algorithms: [»FOO]}
        timeouts: {connect: »-1}
        routes:
          - host: »'*.*.x'
            paths: [{path: /, type: »Regex, backend: »nope}]
        »bogus: 1
        """,
        "port '99999'", "unknown algorithm 'FOO'", "timeouts.connect", "is not a valid wildcard",
        "'Regex' is not a path type", "backend 'nope' is not defined", "unknown key 'bogus'",
    ),
}


def strip_markers(text: str) -> tuple[str, list[tuple[int, int]]]:
    """The text without markers, and the 1-based (line, column) of each marker in order."""
    lines, positions = [], []
    for line_number, line in enumerate(text.split("\n"), start=1):
        while MARKER in line:
            column = line.index(MARKER)
            positions.append((line_number, column + 1))
            line = line[:column] + line[column + 1 :]
        lines.append(line)
    return "\n".join(lines), positions


@pytest.mark.parametrize("problem_case", PROBLEM_CASES.values(), ids=PROBLEM_CASES.keys())
def test_problem_is_reported_at_its_location(
    routes_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch, problem_case: ProblemCase
) -> None:
    for name, value in problem_case.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("NO_SUCH_PIN", raising=False)
    text, positions = strip_markers(problem_case.text)
    assert len(positions) == len(problem_case.fragments), "the case needs one marker per fragment"
    path = routes_dir / "routes.yaml"
    path.write_text(text)

    with pytest.raises(RoutesFileError) as raised:
        load_routes_file(path)

    problems = raised.value.problems
    assert [problem.location for problem in problems] == [f"{path}:{line}:{column}" for line, column in positions], str(raised.value)
    for problem, fragment in zip(problems, problem_case.fragments):
        assert fragment in problem.message, str(raised.value)
    assert str(raised.value).splitlines() == [str(problem) for problem in problems]
    assert all("(" in problem.message and problem.message.endswith(")") for problem in problems), "every problem carries a fix"


def test_missing_file_is_reported_with_its_path(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(RoutesFileError) as raised:
        load_routes_file(path)
    assert str(raised.value) == f"{path}: cannot read the routes file: No such file or directory (check the path and permissions)"


# ---- secrets ------------------------------------------------------------------------------------


def test_secrets_never_appear_in_messages(routes_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HSM_PIN", SECRET_PIN)
    wrong_key_pem = (routes_dir / "certs" / "rsa.key").read_text()
    path = write_routes(routes_dir, f"""\
        listen: {{https: 127.0.0.1:8443}}
        tls:
          certificates:
            - {{cert: certs/site.pem, key: certs/rsa.key}}
            - {{cert: certs/hsm.pem, key: "engine:pkcs11:object=k", pin_env: HSM_PIN}}
            - {{cert: certs/hsm.pem, key: "engine:pkcs11:object=k;pin-value={SECRET_PIN}", pin_file: secrets/hsm.pin}}
            - {{cert: certs/site.pem, key: certs/site.key, pin_file: secrets/hsm.pin}}
            - {{cert: certs/site.pem, key: "pkcs11:object=k;pin-value={SECRET_PIN}"}}
          engine: {{id: e, ctrl: [[PIN, {SECRET_PIN}], [{{x: 1}}, {SECRET_PIN}], [PIN, [{SECRET_PIN}]]]}}
        timeouts: {{connect: [{SECRET_PIN}]}}
        """)

    with pytest.raises(RoutesFileError) as raised:
        load_routes_file(path)

    message = str(raised.value)
    assert len(raised.value.problems) == 7, message  # mismatch, URI pin twice, PIN on PEM key, no engine: prefix, 2 ctrl, timeout
    assert "does not match" in message and "already carries pin-value" in message
    assert SECRET_PIN not in message
    key_body_lines = [line for line in wrong_key_pem.splitlines() if not line.startswith("-----")]
    assert not any(line in message for line in key_body_lines)


def test_loaded_model_repr_hides_pin_and_key(routes_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HSM_PIN", SECRET_PIN)
    path = write_routes(routes_dir, """\
        listen: {https: 127.0.0.1:8443}
        tls:
          engine: {id: pkcs11}
          certificates:
            - {cert: certs/hsm.pem, key: "engine:pkcs11:object=k", pin_env: HSM_PIN}
            - {cert: certs/site.pem, key: certs/site.key}
        """)
    loaded = load_routes_file(path)
    assert loaded.configuration.certificates[0].key == EngineKey(f"pkcs11:object=k;pin-value={SECRET_PIN}")
    key_body = (routes_dir / "certs" / "site.key").read_text().splitlines()[1]
    assert SECRET_PIN not in repr(loaded) and key_body not in repr(loaded)


# ---- the shipped example ------------------------------------------------------------------------


def test_shipped_example_loads(tmp_path: pathlib.Path) -> None:
    """examples/routes.yaml with the certificate examples/run_demo.py generates (same SANs)."""
    shutil.copy(EXAMPLE_ROUTES, tmp_path / "routes.yaml")
    (tmp_path / "certs").mkdir()
    leaf = trustme.CA().issue_cert("localhost", "demo.localhost", "*.demo.localhost")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "certs" / "demo.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "certs" / "demo.key"))

    loaded = load_routes_file(tmp_path / "routes.yaml")

    assert loaded.listeners == Listeners(https=addr("127.0.0.1:8443"), http=addr("127.0.0.1:8080"), admin=addr("127.0.0.1:9100"))
    configuration = loaded.configuration
    assert [certificate.hosts for certificate in configuration.certificates] == [("localhost", "demo.localhost", "*.demo.localhost")]
    endpoints = {endpoint for b in configuration.routes.backends for endpoint in b.endpoints}
    assert endpoints == {addr("127.0.0.1:9001"), addr("127.0.0.1:9002")}
    assert configuration.routes.default_backend is not None
    hosts = {virtual_host.host: virtual_host for virtual_host in configuration.routes.virtual_hosts}
    assert {"localhost", "demo.localhost", "*.demo.localhost"} <= set(hosts)
    assert any(virtual_host.redirect_to_https for virtual_host in hosts.values())
    assert not all(virtual_host.redirect_to_https for virtual_host in hosts.values())


def test_a_key_under_a_providers_own_scheme_goes_to_its_store(routes_dir: pathlib.Path) -> None:
    """`key: "<provider>:..."` names a key that provider holds (its OSSL_STORE scheme), not a file."""
    path = write_routes(
        routes_dir,
        LISTEN + "tls:\n  providers: [{name: testoffload}]\n"
        "  certificates: [{cert: certs/hsm.pem, key: 'testoffload:/keys/site.pem'}]\n",
    )
    certificate = load_routes_file(path).configuration.certificates[0]
    assert certificate.key == StoreKey("testoffload:/keys/site.pem")


def test_a_provider_may_be_optional(routes_dir: pathlib.Path) -> None:
    path = write_routes(routes_dir, LISTEN + "tls: {providers: [{name: qatprovider, required: false}, pkcs11]}\n")
    assert load_routes_file(path).configuration.crypto.providers == (
        ProviderSettings("qatprovider", required=False), ProviderSettings("pkcs11"),
    )
