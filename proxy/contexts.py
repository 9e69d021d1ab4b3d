"""Certificates of one configuration → prebuilt pyOpenSSL contexts, chosen per connection by SNI.

Contexts are built in the control plane when a configuration is published, and never mutated
after they served a connection (shared/NOTES.md §2): a changed certificate gets a new context,
unchanged ones keep theirs (`ContextCache`). Every connection starts on the default context; the
SNI callback switches it to the context of the requested name (precise name, then `*.one-label`
wildcard, then the default certificate), always by the newest published mapping.

One context may hold several certificates for the same names (say RSA and ECDSA): OpenSSL then
serves ECDSA to clients that support it and RSA to the rest.

All contexts share the process's session-ticket keys, so tickets stay valid across reloads and,
with several workers, across processes.

Every context carries the configuration's `TlsPolicy` (versions, ciphers, TLS 1.3 suites, groups,
applied by `config.tls_policy.apply_policy`, the function the route sources checked the strings
with) and its ALPN list. ALPN is selected by our own cffi callback rather than pyOpenSSL's: on
OpenSSL 3 pyOpenSSL's NO_OVERLAPPING_PROTOCOLS answer only NOACKs, while RFC 7301 §3.2 wants the
fatal no_application_protocol alert, which OpenSSL sends when the callback returns
SSL_TLSEXT_ERR_ALERT_FATAL. A client that sends no ALPN extension never reaches the callback and
is served. A changed policy rebuilds every context (it is part of what the cache is keyed on).

A host with client certificate authentication (`VirtualHost.client_auth`) gets a context of its
own, built from the certificates that would serve its name (its own, a wildcard's, or the
default) plus its CA bundle, keyed by both; proxy/client_auth.py explains the verify settings the
SNI callback adds and the ClientHello callback that keeps sessions from crossing into such hosts.
Contexts of other hosts are built exactly as before.

OCSP responses (proxy/stapling.py) are checked when a context is built and stapled per handshake
for the certificate OpenSSL chose, so an RSA + ECDSA context staples each one's own response.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar
from dataclasses import dataclass

from OpenSSL import SSL, crypto
from OpenSSL._util import ffi, lib

from config.model import Certificate, ClientAuth, Configuration, KeySource, PemKey, Problem, TlsPolicy, VirtualHost
from config.tls_material import PEM_CERTIFICATE_BLOCK, self_signed_certificate
from config.tls_policy import apply_policy
from proxy.client_auth import (
    client_auth_of,
    client_hello_callback,
    configure_context,
    install_client_hello_callback,
    request_certificate,
)
from proxy.stapling import OcspMismatch, StapledResponse
from proxy.tls import libssl

# Installs a key into a context and returns its key-source label ("file", "engine:<id>").
KeyInstaller = Callable[[SSL.Context, KeySource], str]

_SESSION_CACHE_SECONDS = 300
_ALPN_CALLBACK = "int(*)(SSL *, unsigned char **, unsigned char *, unsigned char *, unsigned int, void *)"
_Entry = TypeVar("_Entry")
_SERVERNAME_CALLBACK = "int (*)(SSL *, int *, void *)"
_SERVERNAME_OK = 0  # SSL_TLSEXT_ERR_OK: go on with the handshake (also if a bug raised in the callback)
_STATUS_CALLBACK = "int (*)(SSL *, void *)"
_STATUS_NO_STAPLE = 3  # SSL_TLSEXT_ERR_NOACK: no status_request answer, the handshake goes on


@functools.cache
def self_signed_default() -> Certificate:
    """The certificate for unknown SNI when none is configured: generated once per process."""
    chain_pem, key_pem = self_signed_certificate("ingress-proxy default certificate", days=3650)
    return Certificate(chain_pem, PemKey(key_pem), (), "generated default")


def choose_protocol(ours: Sequence[bytes], offered: Sequence[bytes]) -> bytes | None:
    """The first of our protocols (our preference order) that the client offered; None: no overlap."""
    for protocol in ours:
        if protocol in offered:
            return protocol
    return None


def offered_protocols(wire: bytes) -> dict[bytes, int]:
    """A ClientHello ALPN list (length-prefixed names) → name → offset of its first byte."""
    offsets: dict[bytes, int] = {}
    position = 0
    while position < len(wire):
        length = wire[position]
        offsets.setdefault(wire[position + 1 : position + 1 + length], position + 1)
        position += 1 + length
    return offsets


def _alpn_selector(protocols: tuple[str, ...]) -> object:
    """A cffi ALPN callback choosing from `protocols`; the context must keep it alive."""
    ours = tuple(protocol.encode() for protocol in protocols)

    @ffi.callback(_ALPN_CALLBACK, error=lib.SSL_TLSEXT_ERR_ALERT_FATAL)  # a bug here must not look like "OK"
    def select(_ssl: object, out: object, outlen: object, wire: object, wire_length: int, _arg: object) -> int:
        offsets = offered_protocols(bytes(ffi.buffer(wire, wire_length)))
        chosen = choose_protocol(ours, list(offsets))
        if chosen is None:
            return int(lib.SSL_TLSEXT_ERR_ALERT_FATAL)  # → no_application_protocol (RFC 7301 §3.2)
        out[0] = wire + offsets[chosen]  # type: ignore[index,operator]  # points into the ClientHello
        outlen[0] = len(chosen)  # type: ignore[index]
        return int(lib.SSL_TLSEXT_ERR_OK)

    return select


def _load_chain(chain_pem: bytes) -> list[crypto.X509]:
    """Leaf first, then intermediates, as in a PEM chain file or a Secret's tls.crt."""
    chain = [crypto.load_certificate(crypto.FILETYPE_PEM, block) for block in PEM_CERTIFICATE_BLOCK.findall(chain_pem)]
    if not chain:
        raise ValueError("no PEM certificate found")
    return chain


@dataclass(frozen=True)
class TlsContexts:
    default: SSL.Context
    precise: dict[str, SSL.Context]
    wildcard: dict[str, SSL.Context]  # keyed by the suffix after "*."
    key_sources: dict[int, str]  # id(context) → key-source label, for handshake metrics
    problems: tuple[Problem, ...]
    client_auth: bool = False  # some host asks for client certificates (proxy/client_auth.py)

    def for_server_name(self, name: bytes | None) -> SSL.Context:
        if not name:
            return self.default
        host = name.decode("ascii", "replace").lower().rstrip(".")
        found = self.precise.get(host)
        if found is None:
            dot = host.find(".")
            found = self.wildcard.get(host[dot + 1 :]) if dot > 0 else None
        return found or self.default

    def key_source(self, context: SSL.Context) -> str:
        return self.key_sources.get(id(context), "file")


# What a context is built from: each certificate's chain, key and OCSP response, in SNI-group
# order, and the client auth of the host it serves (None for most).
_ContextKey = tuple[tuple[tuple[bytes, KeySource, bytes | None], ...], ClientAuth | None]


class ContextCache:
    """Builds each publish's contexts, reusing those whose certificates did not change.

    Building a context parses its chain and key (about 1 ms per certificate, more from an HSM), so
    rebuilding thousands on every Ingress change would stall the event loop for seconds. Contexts
    are keyed by the certificates' content and OCSP responses. A new crypto runtime (engine or
    async mode changed) invalidates them all, since keys must be loaded after the engine defaults
    are set; so do a changed resumption setting or TLS policy, which every context carries. Only
    the contexts the latest publish uses are kept. The SNI callback of every context reads `current`,
    so a reused context always switches by the newest mapping.
    """

    def __init__(self, ticket_keys: bytes) -> None:
        self._ticket_keys = ticket_keys
        self._built: dict[_ContextKey, tuple[SSL.Context, str]] = {}  # → (context, key-source label)
        self._built_with: tuple[KeyInstaller, bool, TlsPolicy] | None = None  # (crypto runtime, resumption, policy)
        self.current: TlsContexts | None = None
        self._client_hello = client_hello_callback(lambda: self.current)

    def build(self, configuration: Configuration, install_key: KeyInstaller) -> TlsContexts:
        """Contexts for `configuration`; certificates that fail are left out and reported."""
        built_with = (install_key, configuration.session_resumption, configuration.tls_policy)
        if built_with != self._built_with:
            self._built, self._built_with = {}, built_with
        build = _Build(self, configuration, install_key)
        by_host: dict[str, list[Certificate]] = {}
        for certificate in configuration.certificates:
            for host in certificate.hosts:
                by_host.setdefault(host.lower(), []).append(certificate)
        precise: dict[str, SSL.Context] = {}
        wildcard: dict[str, SSL.Context] = {}
        default = None
        if configuration.default_certificate is not None:
            default_certificates = [configuration.default_certificate]
            default = build.context_for(default_certificates)
        if default is None:
            default_certificates = [self_signed_default()]
            default = build.context_for(default_certificates)
        assert default is not None, "the generated default certificate always loads"
        client_auth = _client_auth_by_host(configuration.routes.virtual_hosts)
        for host in by_host.keys() | {host for host, auth in client_auth.items() if auth is not None}:
            certificates = _own_or_wildcard(host, by_host) or default_certificates
            context = build.context_for(certificates, _own_or_wildcard(host, client_auth))
            if context is None:
                continue
            if host.startswith("*."):
                wildcard[host[2:]] = context
            else:
                precise[host] = context
        self._built = build.used
        problems = tuple(Problem(origin, f"certificate left out: {reason}") for origin, reason in sorted(build.failed.items()))
        problems += tuple(sorted(build.not_stapled, key=lambda problem: (problem.location, problem.message)))
        key_sources = {id(context): label for context, label in build.used.values()}
        asking = any(auth is not None for auth in client_auth.values())
        self.current = TlsContexts(default, precise, wildcard, key_sources, problems, asking)
        return self.current

    def _sni_switch(self, context: SSL.Context) -> object:
        """`context`'s servername callback (our own cffi one, like the ALPN selector): OpenSSL calls it
        for every ClientHello, with or without SNI. pyOpenSSL's wrapper looked up the Connection
        object and decoded the name on each call; here the common case, a connection already on
        the context its name maps to (no SNI → the default), is one libssl call and one dict
        lookup, and only a switch looks up the Connection. The callback holds its context weakly
        (the context holds the callback), and reads `current`, so it switches by the newest mapping."""
        own = weakref.ref(context)

        @ffi.callback(_SERVERNAME_CALLBACK, error=_SERVERNAME_OK)
        def switch(ssl: object, _alert: object, _arg: object) -> int:
            assert self.current is not None
            name = lib.SSL_get_servername(ssl, lib.TLSEXT_NAMETYPE_host_name)
            chosen = self.current.for_server_name(ffi.string(name) if name else None)
            if chosen is not own():  # the connection is still on the context it was made with
                connection = SSL.Connection._reverse_mapping[ssl]
                connection.set_context(chosen)
                auth = client_auth_of(chosen)
                if auth is not None:  # SSL_set_SSL_CTX does not carry the verify mode over
                    request_certificate(connection, auth)
            return _SERVERNAME_OK

        return switch

    def new_context(self, async_mode: bool, resumption: bool, policy: TlsPolicy) -> SSL.Context:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        apply_policy(context, policy)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
        context.set_session_id(b"ingress-proxy")
        if resumption:
            context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
            context.set_timeout(_SESSION_CACHE_SECONDS)
        else:  # no cache, no TLS 1.2 tickets, and no TLS 1.3 NewSessionTicket messages at all
            context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
            context.set_options(SSL.OP_NO_TICKET)
            libssl.set_ticket_count(context, 0)
        # Free OpenSSL's record buffers while a connection is idle: idle RSS 25.7 → 12.4 KiB per
        # TLS connection, keep-alive req/s unchanged (`make bench --quick --only idle-rss --only keepalive`).
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        context._ingress_alpn = _alpn_selector(policy.alpn)  # type: ignore[attr-defined]  # lives as long as the context
        lib.SSL_CTX_set_alpn_select_cb(context._context, context._ingress_alpn, ffi.NULL)  # type: ignore[attr-defined]
        context._ingress_sni = self._sni_switch(context)  # type: ignore[attr-defined]  # lives as long as the context
        lib.SSL_CTX_set_tlsext_servername_callback(context._context, context._ingress_sni)  # type: ignore[attr-defined]
        install_client_hello_callback(context, self._client_hello)
        libssl.set_ticket_keys(context, self._ticket_keys)
        if async_mode:
            from proxy.tls.offload import enable_async_mode

            enable_async_mode(context)
        return context


class _Build:
    """One publish's pass over the certificates."""

    def __init__(self, cache: ContextCache, configuration: Configuration, install_key: KeyInstaller) -> None:
        self._cache = cache
        self._async_mode = configuration.crypto.async_mode
        self._resumption = configuration.session_resumption
        self._policy = configuration.tls_policy
        self._install_key = install_key
        self.failed: dict[str, str] = {}  # origin → reason, reported once per certificate
        self.not_stapled: set[Problem] = set()  # OCSP responses refused while building new contexts
        self.used: dict[_ContextKey, tuple[SSL.Context, str]] = {}

    def context_for(self, certificates: list[Certificate], client_auth: ClientAuth | None = None) -> SSL.Context | None:
        certificates = [certificate for certificate in certificates if certificate.origin not in self.failed]
        if not certificates:
            return None
        served = tuple((certificate.chain_pem, certificate.key, certificate.ocsp_response) for certificate in certificates)
        key = (served, client_auth)
        entry = self.used.get(key) or self._cache._built.get(key)
        if entry is None:
            entry = self._build(certificates, client_auth)
            if entry is None:  # one of them failed: try again without it
                return self.context_for(certificates, client_auth)
        self.used[key] = entry
        return entry[0]

    def _build(self, certificates: list[Certificate], client_auth: ClientAuth | None) -> tuple[SSL.Context, str] | None:
        context = self._cache.new_context(self._async_mode, self._resumption, self._policy)
        if client_auth is not None:
            configure_context(context, client_auth)  # the producers checked the bundle parses
        labels = []
        stapled: dict[int, StapledResponse] = {}  # the leaf's X509 address → its response
        for certificate in certificates:
            try:
                chain = _load_chain(certificate.chain_pem)
                context.use_certificate(chain[0])
                for intermediate in chain[1:]:
                    libssl.add_chain_certificate(context, intermediate)
                labels.append(self._install_key(context, certificate.key))
                context.check_privatekey()
            except Exception as error:  # any failure excludes just this certificate
                self.failed[certificate.origin] = str(error) or type(error).__name__
                return None
            if certificate.ocsp_response is not None:
                try:
                    response = StapledResponse.prepare(
                        certificate.ocsp_response, [item.to_cryptography() for item in chain], certificate.origin
                    )
                except OcspMismatch as mismatch:
                    self.not_stapled.add(Problem(certificate.origin, f"OCSP response not stapled: {mismatch}"))
                else:
                    stapled[libssl.address(chain[0]._x509)] = response
        if stapled:
            context._ingress_staple = _stapler(stapled)  # type: ignore[attr-defined]  # lives as long as the context
            lib.SSL_CTX_set_tlsext_status_cb(context._context, context._ingress_staple)  # type: ignore[attr-defined]
        return context, "+".join(sorted(set(labels)))


def _client_auth_by_host(virtual_hosts: tuple[VirtualHost, ...]) -> dict[str, ClientAuth | None]:
    """Every named host pattern → its client auth (None: none), lower-cased like SNI lookups."""
    return {host.host.lower(): host.client_auth for host in virtual_hosts if host.host}


def _own_or_wildcard(host: str, table: Mapping[str, _Entry]) -> _Entry | None:
    """`table`'s entry for the host pattern `host`, else (a precise name) the entry of the wildcard
    one label up: how SNI picks a certificate and `proxy.router` a virtual host. A host listed
    with its own entry never inherits the wildcard's, even when its entry is None."""
    if host in table:
        return table[host]
    dot = host.find(".")
    return table.get("*." + host[dot + 1 :]) if dot > 0 and not host.startswith("*.") else None


def _stapler(stapled: dict[int, StapledResponse]) -> object:
    """A context's OCSP status callback, in cffi like the ALPN selector. OpenSSL calls it only when
    the client sent status_request, after it chose the certificate. A context and every connection
    made from it (or switched to it by SNI) hold the very X509 objects the context was given
    (SSL_CTX_use_certificate and SSL_new take references, not copies), so `SSL_get_certificate`'s
    address says which certificate was chosen: no X509 wrapper, serial number or issuer DER per
    handshake, as pyOpenSSL's callback and the earlier serial+issuer key needed."""

    @ffi.callback(_STATUS_CALLBACK, error=_STATUS_NO_STAPLE)  # a bug here staples nothing
    def staple(ssl: object, _arg: object) -> int:
        response = stapled.get(libssl.address(lib.SSL_get_certificate(ssl)))
        der = response.for_handshake() if response is not None else b""
        if not der:
            return _STATUS_NO_STAPLE
        copy = lib.OPENSSL_malloc(len(der))  # OpenSSL frees the response with the connection
        ffi.memmove(copy, der, len(der))
        lib.SSL_set_tlsext_status_ocsp_resp(ssl, copy, len(der))
        return int(lib.SSL_TLSEXT_ERR_OK)

    return staple
