"""Server-side TLS over memory BIOs: an explicit state machine, no sockets.

This package is the one room for OpenSSL glue in the data plane: the state machine here,
`proxy.tls.libssl` (ctypes on libssl for what pyOpenSSL 23 does not bind: chain certificates,
ticket keys) and `proxy.tls.offload` (async jobs: SSL_MODE_ASYNC, WANT_ASYNC, wait fds).

Theory of operation
-------------------
A `ServerTls` wraps one pyOpenSSL `SSL.Connection` created with no socket, so OpenSSL reads
ciphertext from one memory BIO and writes ciphertext to another. The connection shell feeds
socket bytes to `receive()`, which returns whatever plaintext they unlocked; it hands response
bytes to `send()`; after either it collects `outgoing()` ciphertext and writes it to the socket in
one call. This module never touches a socket or the event loop, so it is tested by pumping two
in-memory peers into each other.

States and the only transitions allowed (see `_ALLOWED`):

    ASYNC_PAUSED
      ▲     │
      │     ▼
    HANDSHAKING ──► OPEN ──► PEER_CLOSED ──► CLOSED
         │           │            │
         └───────────┴─────┬──────┘
                           ▼
                        BROKEN      (a TLS error: an alert may still be waiting in outgoing())

PEER_CLOSED is the peer's close_notify: nothing more comes in, but we may still send (TLS 1.3
half-close; OpenSSL refuses SSL_write only after our own close_notify), so the answers to
requests that came before it still go out; CLOSED is ours (`close()`). HANDSHAKING and OPEN
may also go straight to CLOSED (`close()`).

ASYNC_PAUSED is a handshake whose private-key operation is running in an async job (below): the
only way out is `resume_handshake()`, back to HANDSHAKING and on from there. It cannot be closed
or broken from outside, because OpenSSL owns the paused job's stack until the job finishes.

The per-record work (plaintext in and out, ciphertext out) goes through a pump
(`proxy.tls.pump`): the pure one calls OpenSSL through pyOpenSSL's cffi `lib` directly into one
reused buffer (pyOpenSSL's `recv`/`bio_read` allocate per call and raise for the ordinary "want
more bytes" case, several microseconds per record); its Cython twin (`proxy/tls/_pump.pyx`, used
when built, unless INGRESS_PROXY_PURE=1) does the same in one C call per direction. The pump only
reports how a read or write ended; the state moves and the exceptions are made here, once.

Async offload (`SSL_MODE_ASYNC`, HAProxy's `ssl-mode-async`): an engine or provider may pause the
private-key operation of a handshake; `SSL_do_handshake` then fails with SSL_ERROR_WANT_ASYNC (9),
which pyOpenSSL 23 does not know. The machine moves to ASYNC_PAUSED (`waiting_for_async`), the
shell watches `async_wait_fds()`, and calls `resume_handshake()` when one fires, which repeats
exactly the paused call. Bytes that arrive meanwhile are buffered in the input BIO, untouched.
Once the handshake is done the connection leaves async mode (SSL_clear_mode): only handshakes use
the private key (renegotiation is off, TLS 1.3 key updates need none), and in async mode libssl
runs every SSL_read and SSL_write in a job of its own, ~0.7 µs per request round trip for nothing
(measured with a software key: 10.4 → 9.5 µs per 100-byte exchange, client and server in one thread).
Rules learnt the hard way (shared/NOTES.md §1): clear the error queue before every retry (a
stale error turns WANT_ASYNC into SSL_ERROR_SSL), never call SSL_read while a handshake job is
paused, and never free a connection whose job is paused — the shell keeps it alive until the job
finishes, even after the client went away.

Closing: a connection dropped without both shutdown flags makes OpenSSL evict its session from
the cache, so every close (clean or not) sets SENT|RECEIVED ("quiet shutdown") after sending our
close_notify when the session is healthy; sessions stay resumable.
"""

from __future__ import annotations

import enum

from OpenSSL import SSL
from OpenSSL._util import ffi, lib

from proxy.tls.offload import SSL_ERROR_WANT_ASYNC, SSL_MODE_ASYNC, async_wait_fds
from proxy.tls.pump import CLOSE_NOTIFY, FAILED, SHARED_BUFFER, Pump, new_pump


_VERSION_NAMES = {lib.TLS1_3_VERSION: "TLSv1.3", lib.TLS1_2_VERSION: "TLSv1.2"}  # what we allow: config/tls_policy.py
_ALPN_DATA = ffi.new("unsigned char **")  # SSL_get0_alpn_selected's out-parameters, reused (one thread)
_ALPN_LENGTH = ffi.new("unsigned int *")


class TlsState(enum.Enum):
    HANDSHAKING = "handshaking"
    ASYNC_PAUSED = "async_paused"
    OPEN = "open"
    PEER_CLOSED = "peer_closed"
    CLOSED = "closed"
    BROKEN = "broken"


_SENDABLE = frozenset((TlsState.OPEN, TlsState.PEER_CLOSED))
_INPUT_ENDED = frozenset((TlsState.PEER_CLOSED, TlsState.CLOSED, TlsState.BROKEN))
_ALLOWED = {
    TlsState.HANDSHAKING: {TlsState.ASYNC_PAUSED, TlsState.OPEN, TlsState.CLOSED, TlsState.BROKEN},
    TlsState.ASYNC_PAUSED: {TlsState.HANDSHAKING},
    TlsState.OPEN: {TlsState.PEER_CLOSED, TlsState.CLOSED, TlsState.BROKEN},
    TlsState.PEER_CLOSED: {TlsState.CLOSED, TlsState.BROKEN},
    TlsState.CLOSED: set(),
    TlsState.BROKEN: set(),
}


class TlsFailure(Exception):
    """The TLS session cannot continue; `reason` is OpenSSL's, short, for logs and metrics."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def error_queue_reason() -> str:
    reasons = []
    while code := lib.ERR_get_error():
        lib.ERR_error_string_n(code, SHARED_BUFFER, 256)
        text = ffi.string(SHARED_BUFFER).decode("latin-1")
        reasons.append(text.rsplit(":", 1)[-1] or text)
    return "; ".join(reasons) or "protocol error"


class MemoryBioTls:
    """What both directions share (`ServerTls` here, `upstream_tls.ClientTls` towards backends):
    the state table, plaintext out of and into OpenSSL, ciphertext out, the quiet close. A subclass
    says what a failure is (`_break`) and how its handshake goes."""

    __slots__ = ("connection", "state", "_ssl", "_into_ssl", "_from_ssl", "_pump")

    def __init__(self, context: SSL.Context, server_side: bool) -> None:
        self.connection = SSL.Connection(context, None)
        if server_side:
            self.connection.set_accept_state()
        else:
            self.connection.set_connect_state()
        self.state = TlsState.HANDSHAKING
        self._ssl = self.connection._ssl
        self._into_ssl = self.connection._into_ssl
        self._from_ssl = self.connection._from_ssl
        self._pump: Pump = new_pump(self.connection)  # module global: tests swap pure/compiled

    def _move(self, new_state: TlsState) -> None:
        if new_state not in _ALLOWED[self.state]:
            raise AssertionError(f"TLS state {self.state.name} cannot become {new_state.name}")
        self.state = new_state

    def _break(self, during_handshake: bool = False) -> Exception:
        """Move to BROKEN and return the exception to raise (the OpenSSL error queue says why)."""
        raise NotImplementedError

    def _read_plaintext(self, ciphertext: bytes = b"") -> bytes:
        """Feed `ciphertext` (an OPEN connection's socket bytes) and return all plaintext it completes."""
        plaintext, ending = self._pump.read(ciphertext)
        if ending == FAILED:
            raise self._break()
        if ending == CLOSE_NOTIFY:  # the peer's close_notify: we may still send
            self._move(TlsState.PEER_CLOSED)
        return plaintext

    def _refuse_send(self) -> Exception:
        return TlsFailure(f"cannot send in state {self.state.value}")

    def send(self, plaintext: bytes) -> None:
        """Encrypt `plaintext` into records for `outgoing()` (one 16 KiB record per SSL_write, in
        `proxy.tls.pump`, whose BIO stays at one record however long the plaintext)."""
        if self.state not in _SENDABLE:
            raise self._refuse_send()
        if not self._pump.write(plaintext):
            raise self._break()

    def outgoing(self) -> bytes:
        """Ciphertext waiting to go to the socket (handshake records, alerts, application data)."""
        return self._pump.drain()

    def close(self) -> None:
        """Queue our close_notify (if the session is healthy) and keep the session resumable."""
        if self.state in _SENDABLE:
            lib.ERR_clear_error()
            lib.SSL_shutdown(self._ssl)
        self.connection.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        if self.state in (TlsState.HANDSHAKING, TlsState.OPEN, TlsState.PEER_CLOSED):
            self._move(TlsState.CLOSED)

    @property
    def sendable(self) -> bool:
        """`send` may be called: open, or only the peer has closed."""
        return self.state in _SENDABLE

    @property
    def input_ended(self) -> bool:
        """No more plaintext will come: the peer's close_notify, our close, or a failure."""
        return self.state in _INPUT_ENDED

    @property
    def version(self) -> str:
        """"TLSv1.3", "TLSv1.2": from the version number (pyOpenSSL decodes libssl's string each time)."""
        name = _VERSION_NAMES.get(lib.SSL_version(self._ssl))
        return name if name is not None else self.connection.get_protocol_version_name()

    @property
    def alpn_selected(self) -> bytes:
        """The protocol ALPN chose (b"" if none), read into reused out-parameters."""
        lib.SSL_get0_alpn_selected(self._ssl, _ALPN_DATA, _ALPN_LENGTH)
        length = _ALPN_LENGTH[0]
        return ffi.buffer(_ALPN_DATA[0], length)[:] if length else b""

    @property
    def resumed(self) -> bool:
        return bool(lib.SSL_session_reused(self._ssl))


class ServerTls(MemoryBioTls):
    __slots__ = ()

    def __init__(self, context: SSL.Context) -> None:
        super().__init__(context, server_side=True)

    @property
    def waiting_for_async(self) -> bool:
        """The handshake is paused in an async job: wait on `async_wait_fds()`, then resume."""
        return self.state is TlsState.ASYNC_PAUSED

    def async_wait_fds(self) -> list[int]:
        """The fds that become readable when the paused job can go on."""
        return async_wait_fds(self.connection)

    def _break(self, during_handshake: bool = False) -> TlsFailure:
        self._move(TlsState.BROKEN)
        return TlsFailure(error_queue_reason())

    # -- ciphertext in ------------------------------------------------------------------------

    def receive(self, ciphertext: bytes) -> bytes:
        """Take bytes from the socket; return the plaintext they complete (maybe b"")."""
        if self.state is TlsState.OPEN:
            return self._read_plaintext(ciphertext)  # the hot path: one pump call
        if self.state in _INPUT_ENDED:
            return b""
        lib.BIO_write(self._into_ssl, ciphertext, len(ciphertext))
        if self.state is TlsState.ASYNC_PAUSED:
            return b""  # the paused job resumes when its fd fires, not on new input
        if self.state is TlsState.HANDSHAKING:
            self._advance_handshake()
            if self.state is not TlsState.OPEN:
                return b""
        return self._read_plaintext()

    def resume_handshake(self) -> bytes:
        """An async job's wait fd fired: repeat the paused SSL_do_handshake (it may pause again)."""
        self._move(TlsState.HANDSHAKING)
        self._advance_handshake()
        if self.state is TlsState.OPEN:
            return self._read_plaintext()
        return b""

    def _advance_handshake(self) -> None:
        lib.ERR_clear_error()
        result = lib.SSL_do_handshake(self._ssl)
        if result == 1:
            self._move(TlsState.OPEN)
            if lib.SSL_get_mode(self._ssl) & SSL_MODE_ASYNC:
                lib.SSL_clear_mode(self._ssl, SSL_MODE_ASYNC)  # nothing left to pause: see above
            return
        error = lib.SSL_get_error(self._ssl, result)
        if error == lib.SSL_ERROR_WANT_READ:
            return
        if error == SSL_ERROR_WANT_ASYNC:
            self._move(TlsState.ASYNC_PAUSED)
            return
        raise self._break()

    # -- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        if self.state is TlsState.ASYNC_PAUSED:
            raise AssertionError("a connection with a paused async job must not be closed")
        super().close()

    # -- facts for logs and metrics -----------------------------------------------------------

    @property
    def server_name(self) -> str | None:
        name = self.connection.get_servername()
        return name.decode("ascii", "replace") if name else None

