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
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from OpenSSL import SSL, crypto

from config.model import Certificate, Configuration, KeySource, PemKey, Problem
from config.tls_material import PEM_CERTIFICATE_BLOCK, self_signed_certificate
from proxy.tls import libssl

# Installs a key into a context and returns its key-source label ("file", "engine:<id>").
KeyInstaller = Callable[[SSL.Context, KeySource], str]

_ALPN_HTTP1 = b"http/1.1"
_SESSION_CACHE_SECONDS = 300


@functools.cache
def self_signed_default() -> Certificate:
    """The certificate for unknown SNI when none is configured: generated once per process."""
    chain_pem, key_pem = self_signed_certificate("ingress-proxy default certificate", days=3650)
    return Certificate(chain_pem, PemKey(key_pem), (), "generated default")


def _select_http1(connection: SSL.Connection, offered: list[bytes]) -> bytes:
    return _ALPN_HTTP1 if _ALPN_HTTP1 in offered else SSL.NO_OVERLAPPING_PROTOCOLS


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


# What a context is built from: each certificate's chain and key, in SNI-group order.
_ContextKey = tuple[tuple[bytes, KeySource], ...]


class ContextCache:
    """Builds each publish's contexts, reusing those whose certificates did not change.

    Building a context parses its chain and key (about 1 ms per certificate, more from an HSM), so
    rebuilding thousands on every Ingress change would stall the event loop for seconds. Contexts
    are keyed by the certificates' content; a new crypto runtime (engine or async mode changed)
    invalidates them all, since keys must be loaded after the engine defaults are set. Only the
    contexts the latest publish uses are kept. The SNI callback of every context reads `current`,
    so a reused context always switches by the newest mapping.
    """

    def __init__(self, ticket_keys: bytes) -> None:
        self._ticket_keys = ticket_keys
        self._built: dict[_ContextKey, tuple[SSL.Context, str]] = {}  # → (context, key-source label)
        self._built_with: tuple[KeyInstaller, bool] | None = None  # (crypto runtime, resumption on)
        self.current: TlsContexts | None = None

    def build(self, configuration: Configuration, install_key: KeyInstaller) -> TlsContexts:
        """Contexts for `configuration`; certificates that fail are left out and reported."""
        built_with = (install_key, configuration.session_resumption)
        if built_with != self._built_with:
            self._built, self._built_with = {}, built_with
        build = _Build(self, configuration, install_key)
        by_host: dict[str, list[Certificate]] = {}
        for certificate in configuration.certificates:
            for host in certificate.hosts:
                by_host.setdefault(host.lower(), []).append(certificate)
        precise: dict[str, SSL.Context] = {}
        wildcard: dict[str, SSL.Context] = {}
        for host, certificates in by_host.items():
            context = build.context_for(certificates)
            if context is None:
                continue
            if host.startswith("*."):
                wildcard[host[2:]] = context
            else:
                precise[host] = context
        default = None
        if configuration.default_certificate is not None:
            default = build.context_for([configuration.default_certificate])
        if default is None:
            default = build.context_for([self_signed_default()])
        assert default is not None, "the generated default certificate always loads"
        self._built = build.used
        problems = tuple(Problem(origin, f"certificate left out: {reason}") for origin, reason in sorted(build.failed.items()))
        key_sources = {id(context): label for context, label in build.used.values()}
        self.current = TlsContexts(default, precise, wildcard, key_sources, problems)
        return self.current

    def _switch_by_sni(self, connection: SSL.Connection) -> None:
        assert self.current is not None
        chosen = self.current.for_server_name(connection.get_servername())
        if chosen is not connection.get_context():
            connection.set_context(chosen)

    def new_context(self, async_mode: bool, resumption: bool) -> SSL.Context:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
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
        context.set_alpn_select_callback(_select_http1)
        context.set_tlsext_servername_callback(self._switch_by_sni)
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
        self._install_key = install_key
        self.failed: dict[str, str] = {}  # origin → reason, reported once per certificate
        self.used: dict[_ContextKey, tuple[SSL.Context, str]] = {}

    def context_for(self, certificates: list[Certificate]) -> SSL.Context | None:
        certificates = [certificate for certificate in certificates if certificate.origin not in self.failed]
        if not certificates:
            return None
        key = tuple((certificate.chain_pem, certificate.key) for certificate in certificates)
        entry = self.used.get(key) or self._cache._built.get(key)
        if entry is None:
            entry = self._build(certificates)
            if entry is None:  # one of them failed: try again without it
                return self.context_for(certificates)
        self.used[key] = entry
        return entry[0]

    def _build(self, certificates: list[Certificate]) -> tuple[SSL.Context, str] | None:
        context = self._cache.new_context(self._async_mode, self._resumption)
        labels = []
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
        return context, "+".join(sorted(set(labels)))
