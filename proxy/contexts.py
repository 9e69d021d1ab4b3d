"""Certificates of one configuration → prebuilt pyOpenSSL contexts, chosen per connection by SNI.

Contexts are built once per published configuration, in the control plane, and never mutated
after they served a connection (shared/NOTES.md §2): a certificate change builds a new set. Every
connection starts on the default context; the SNI callback switches it to the context of the
requested name (precise name, then `*.one-label` wildcard, then the default certificate).

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
from proxy import libssl

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


class _Builder:
    def __init__(self, configuration: Configuration, install_key: KeyInstaller, ticket_keys: bytes) -> None:
        self._configuration = configuration
        self._install_key = install_key
        self._ticket_keys = ticket_keys
        self._failed: dict[str, str] = {}  # origin → reason, reported once per certificate
        self.key_sources: dict[int, str] = {}
        self.contexts: TlsContexts | None = None

    def _new_context(self) -> SSL.Context:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
        context.set_session_id(b"ingress-proxy")
        context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        context.set_timeout(_SESSION_CACHE_SECONDS)
        context.set_alpn_select_callback(_select_http1)
        context.set_tlsext_servername_callback(self._switch_by_sni)
        libssl.set_ticket_keys(context, self._ticket_keys)
        if self._configuration.crypto.async_mode:
            from proxy.offload import enable_async_mode

            enable_async_mode(context)
        return context

    def _switch_by_sni(self, connection: SSL.Connection) -> None:
        assert self.contexts is not None
        chosen = self.contexts.for_server_name(connection.get_servername())
        if chosen is not connection.get_context():
            connection.set_context(chosen)

    def context_for(self, certificates: list[Certificate]) -> SSL.Context | None:
        context = self._new_context()
        labels = []
        for certificate in certificates:
            if certificate.origin in self._failed:
                continue
            try:
                chain = _load_chain(certificate.chain_pem)
                context.use_certificate(chain[0])
                for intermediate in chain[1:]:
                    libssl.add_chain_certificate(context, intermediate)
                labels.append(self._install_key(context, certificate.key))
                context.check_privatekey()
            except Exception as error:  # any failure excludes just this certificate
                self._failed[certificate.origin] = str(error) or type(error).__name__
                return self.context_for([c for c in certificates if c.origin not in self._failed])
        if not labels:
            return None
        self.key_sources[id(context)] = "+".join(sorted(set(labels)))
        return context


def build_contexts(configuration: Configuration, install_key: KeyInstaller, ticket_keys: bytes) -> TlsContexts:
    """Build every context of `configuration`; certificates that fail are left out and reported."""
    builder = _Builder(configuration, install_key, ticket_keys)
    by_host: dict[str, list[Certificate]] = {}
    for certificate in configuration.certificates:
        for host in certificate.hosts:
            by_host.setdefault(host.lower(), []).append(certificate)
    by_group: dict[tuple[str, ...], SSL.Context | None] = {}
    precise: dict[str, SSL.Context] = {}
    wildcard: dict[str, SSL.Context] = {}
    for host, certificates in by_host.items():
        group = tuple(certificate.origin for certificate in certificates)
        if group not in by_group:
            by_group[group] = builder.context_for(certificates)
        context = by_group[group]
        if context is None:
            continue
        if host.startswith("*."):
            wildcard[host[2:]] = context
        else:
            precise[host] = context
    default = None
    if configuration.default_certificate is not None:
        default = builder.context_for([configuration.default_certificate])
    if default is None:
        default = builder.context_for([self_signed_default()])
    assert default is not None, "the generated default certificate always loads"
    problems = tuple(Problem(origin, f"certificate left out: {reason}") for origin, reason in sorted(builder._failed.items()))
    builder.contexts = TlsContexts(default, precise, wildcard, builder.key_sources, problems)
    return builder.contexts
