"""Client-side TLS to backends over memory BIOs, and the per-backend contexts it runs on.

Theory of operation
-------------------
`ClientTls` is the client twin of `proxy.tls.ServerTls`: both are `proxy.tls.MemoryBioTls`, which
holds the state table, `send`, the plaintext reads, `outgoing` and the quiet close. It wraps one
pyOpenSSL `SSL.Connection` with no socket in the connect state: `start()` queues the ClientHello, `receive()` takes socket bytes and returns the
plaintext they unlocked, `send()` encrypts, `outgoing()` hands back ciphertext for one
`transport.write`. It never touches a socket, so its tests pump it into a `ServerTls` in memory.

States and the only transitions allowed (`proxy.tls._ALLOWED`; a client never pauses for async):

    HANDSHAKING ──► OPEN ──► CLOSED
         │           │
         └─────┬─────┘
               ▼
            BROKEN      (why: `failure`, a FailureKind, for the 502's metric label and the log)

A failed handshake is classified by `decisions.tls_failure_kind` from OpenSSL's verify result:
untrusted chain, name mismatch, expired certificate, or anything else ("tls handshake failed").
There is no plaintext fallback anywhere: a TLS backend that cannot be reached over TLS is a 502.

Contexts are built in the control plane, at publish (`UpstreamContextCache.build`), one per
distinct `UpstreamTls` value, and reused across publishes while the value and the crypto runtime
stay the same; a client key goes through the same `CryptoRuntime.use_private_key` as listener keys
(so it may live in an HSM). A context whose set-up fails (bad CA, key that does not load) is
reported as a Problem and its backend answers 502 "tls not configured" — again never plaintext.

Per connection only the name is set: SNI (`server_name`, or the endpoint's host when it is a DNS
name; IP addresses are never sent as SNI, RFC 6066 §3) and, when verifying, the name the
certificate must carry (X509_VERIFY_PARAM_set1_host, or set1_ip_asc for an IP address).

Session reuse: each `UpstreamTransport` keeps the newest session per endpoint and offers it in the
next ClientHello, so a pool growing to N connections pays one full handshake, not N. A TLS 1.3
session becomes resumable only when the server's NewSessionTicket arrives after the handshake,
which is why the session is taken again once a connection goes idle in its pool (`remember`).
"""

from __future__ import annotations

import ctypes

from OpenSSL import SSL, crypto
from OpenSSL._util import lib

from config.model import Address, Backend, BackendProtocol, Problem, UpstreamTls
from config.tls_material import PEM_CERTIFICATE_BLOCK, is_ip_address
from proxy.tls import MemoryBioTls, TlsState, error_queue_reason, libssl
from proxy.contexts import KeyInstaller
from proxy.decisions import FailureKind, tls_failure_kind

_NO_PARTIAL_WILDCARDS = 0x4  # X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS: "*.example.com" only, as browsers
# The client offers what our listeners accept (config.model TLS policy defaults): TLS 1.2+ only.
_CLIENT_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"
# Not bound by pyOpenSSL 23: a TLS 1.3 session without a ticket yet is not resumable, and must not
# replace a resumable one.
_SSL_SESSION_is_resumable = libssl.LIBSSL.SSL_SESSION_is_resumable
_SSL_SESSION_is_resumable.argtypes = (ctypes.c_void_p,)
_SSL_SESSION_is_resumable.restype = ctypes.c_int


class UpstreamTlsFailure(Exception):
    """TLS with a backend failed; `kind` is the metric label and status, `reason` OpenSSL's words."""

    def __init__(self, kind: FailureKind, reason: str) -> None:
        super().__init__(f"{kind.label}: {reason}")
        self.kind = kind
        self.reason = reason



class ClientTls(MemoryBioTls):
    """Our side of a backend's TLS: `proxy.tls.MemoryBioTls` (state table, send, receive plaintext,
    quiet close) with the client's handshake, name verification and failure kinds."""

    __slots__ = ("failure",)

    def __init__(self, context: SSL.Context, name: str, send_sni: bool, verify: bool, session: SSL.Session | None) -> None:
        super().__init__(context, server_side=False)
        self.failure: UpstreamTlsFailure | None = None
        is_ip = is_ip_address(name)
        if send_sni and not is_ip:
            self.connection.set_tlsext_host_name(name.encode("idna"))
        if verify:
            param = lib.SSL_get0_param(self._ssl)
            lib.X509_VERIFY_PARAM_set_hostflags(param, _NO_PARTIAL_WILDCARDS)
            encoded = name.encode("idna") if not is_ip else name.encode("ascii")
            ok = (
                lib.X509_VERIFY_PARAM_set1_ip_asc(param, encoded)
                if is_ip
                else lib.X509_VERIFY_PARAM_set1_host(param, encoded, len(encoded))
            )
            if not ok:
                raise ValueError(f"cannot verify the name {name!r}")
        if session is not None:
            self.connection.set_session(session)

    def _break(self, during_handshake: bool = False) -> UpstreamTlsFailure:
        reason = error_queue_reason()
        if during_handshake:
            kind = tls_failure_kind(lib.SSL_get_verify_result(self._ssl))
        else:
            kind = FailureKind.TLS_FAILED
        self._move(TlsState.BROKEN)
        self.failure = UpstreamTlsFailure(kind, reason)
        return self.failure

    def start(self) -> None:
        """Queue the ClientHello in outgoing()."""
        self._advance_handshake()

    def receive(self, ciphertext: bytes) -> bytes:
        """Take bytes from the socket; return the plaintext they complete (maybe b"")."""
        if self.state is TlsState.OPEN:
            return self._read_plaintext(ciphertext)  # the hot path: one pump call
        if self.input_ended:
            return b""
        lib.BIO_write(self._into_ssl, ciphertext, len(ciphertext))
        if self.state is TlsState.HANDSHAKING:
            self._advance_handshake()
            if self.state is not TlsState.OPEN:
                return b""
        return self._read_plaintext()

    def _advance_handshake(self) -> None:
        lib.ERR_clear_error()
        result = lib.SSL_do_handshake(self._ssl)
        if result == 1:
            self._move(TlsState.OPEN)
            return
        if lib.SSL_get_error(self._ssl, result) == lib.SSL_ERROR_WANT_READ:
            return
        raise self._break(during_handshake=True)

    def _refuse_send(self) -> Exception:
        return UpstreamTlsFailure(FailureKind.TLS_FAILED, f"cannot send in state {self.state.value}")


class UpstreamTransport:
    """One `UpstreamTls` value made ready: its context (None if set-up failed) and its sessions.

    Pools are keyed by (endpoint, transport), so a plaintext connection can never serve a TLS
    backend at the same address, nor one TLS set-up another's."""

    __slots__ = ("settings", "context", "problem", "_sessions")

    def __init__(self, settings: UpstreamTls, context: SSL.Context | None, problem: str | None) -> None:
        self.settings = settings
        self.context = context
        self.problem = problem
        self._sessions: dict[Address, SSL.Session] = {}

    def client(self, address: Address) -> ClientTls:
        """A new TLS client for one connection to `address`; raises UpstreamTlsFailure if unusable."""
        if self.context is None:
            raise UpstreamTlsFailure(FailureKind.TLS_NOT_CONFIGURED, self.problem or "no context")
        settings = self.settings
        name = settings.server_name or address.host
        return ClientTls(self.context, name, settings.send_sni, settings.verify, self._sessions.get(address))

    def remember(self, address: Address, tls: ClientTls) -> None:
        """Keep `tls`'s session for the next connection to `address` (called when it goes idle)."""
        session = tls.connection.get_session()
        if session is not None and _SSL_SESSION_is_resumable(libssl.address(session._session)):
            self._sessions[address] = session


def alpn_for(protocol: BackendProtocol) -> bytes:
    """What a backend context offers in ALPN: HTTP/2 backends must agree to h2 (checked after the
    handshake), HTTP/1.1 ones are told so, which lets a backend serving both pick the right one."""
    return b"h2" if protocol.multiplexed else b"http/1.1"


def new_client_context(settings: UpstreamTls, install_key: KeyInstaller, alpn: bytes = b"http/1.1") -> SSL.Context:
    """A client context for `settings`; raises ValueError / SSL.Error / CryptoSetupError on bad input."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_alpn_protos([alpn])
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_cipher_list(_CLIENT_CIPHERS)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    context.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)  # sessions are kept per endpoint by UpstreamTransport
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    if settings.verify:
        context.set_verify(SSL.VERIFY_PEER)
        if settings.ca_pem is None:
            context.set_default_verify_paths()
        else:
            store = context.get_cert_store()
            assert store is not None
            blocks = PEM_CERTIFICATE_BLOCK.findall(settings.ca_pem)
            if not blocks:
                raise ValueError("the CA bundle holds no PEM certificate")
            for block in blocks:
                store.add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, block))
    else:
        context.set_verify(SSL.VERIFY_NONE)
    client = settings.client_certificate
    if client is not None:
        chain = [crypto.load_certificate(crypto.FILETYPE_PEM, block) for block in PEM_CERTIFICATE_BLOCK.findall(client.chain_pem)]
        if not chain:
            raise ValueError("the client certificate file holds no PEM certificate")
        context.use_certificate(chain[0])
        for intermediate in chain[1:]:
            libssl.add_chain_certificate(context, intermediate)
        install_key(context, client.key)
        context.check_privatekey()
    return context


class UpstreamContextCache:
    """Builds each publish's backend transports, reusing those whose settings did not change.

    A new crypto runtime invalidates them all (keys load after the engine defaults are set), as
    in `proxy.contexts.ContextCache`. Only the transports the latest publish uses are kept, with
    their sessions."""

    def __init__(self) -> None:
        self._built: dict[tuple[UpstreamTls, bytes], UpstreamTransport] = {}  # by (settings, ALPN)
        self._built_with: KeyInstaller | None = None

    def build(self, backends: tuple[Backend, ...], install_key: KeyInstaller) -> tuple[dict[str, UpstreamTransport], tuple[Problem, ...]]:
        """Backend name → transport for every TLS backend, and a Problem for each that failed."""
        if install_key != self._built_with:
            self._built, self._built_with = {}, install_key
        used: dict[tuple[UpstreamTls, bytes], UpstreamTransport] = {}
        transports: dict[str, UpstreamTransport] = {}
        problems: list[Problem] = []
        for backend in backends:
            settings = backend.tls
            if settings is None or not backend.protocol.uses_tls:
                continue
            key = (settings, alpn_for(backend.protocol))
            transport = used.get(key) or self._built.get(key)
            if transport is None:
                try:
                    transport = UpstreamTransport(settings, new_client_context(settings, install_key, key[1]), None)
                except Exception as error:  # any failure: this backend answers 502, others go on
                    transport = UpstreamTransport(settings, None, str(error) or type(error).__name__)
            if transport.problem is not None:
                problems.append(Problem(f"backend {backend.name}", f"TLS to the backend not set up: {transport.problem}"))
            used[key] = transport
            transports[backend.name] = transport
        self._built = used
        return transports, tuple(problems)
