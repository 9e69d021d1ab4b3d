"""The TLS record pump: plaintext in and out of one memory-BIO connection, ciphertext out.

Theory of operation
-------------------
`MemoryBioTls` (proxy/tls/__init__.py) keeps the state machine and the exceptions; everything it
does per record goes through a pump with three calls:

- `read(ciphertext)`: feed socket bytes (maybe none) into the input BIO and read every plaintext
  record they complete; returns (plaintext, ending) with ending READ_MORE (OpenSSL wants more
  bytes, or all input was consumed), CLOSE_NOTIFY (the peer closed: the plaintext before it is
  returned) or FAILED (nothing returned; the OpenSSL error queue says why, for the caller).
- `write(plaintext)`: encrypt all of it (pyOpenSSL turns on partial writes, so one SSL_write takes
  one 16 KiB record at most: loop); False when libssl refuses, the error queue again says why.
  After each record of a longer plaintext its ciphertext leaves the BIO: OpenSSL's memory BIO
  never shrinks, so it stays at one record (16 KiB + 22) instead of a whole flush.
- `drain()`: all ciphertext waiting for the socket (records, handshake messages, alerts).

`PurePump` below is the reference, on pyOpenSSL's cffi `lib` into one shared buffer (pyOpenSSL's
own `recv`/`bio_read` allocate per call and raise for the ordinary "want more" case).
`CompiledPump` (proxy/tls/_pump.pyx) is its Cython twin, calling libssl on the same pointers
with no cffi in between; `new_pump` picks it when it was built and INGRESS_PROXY_PURE is unset
(proxy.compiled). Neither touches the error queue beyond what SSL_read/SSL_write do, so the
caller's `error_queue_reason()` reads the same reasons from both.
"""

from __future__ import annotations

from typing import Callable, Protocol

from OpenSSL import SSL
from OpenSSL._util import ffi, lib

from proxy.compiled import load_twin

READ_MORE = 0
CLOSE_NOTIFY = 1
FAILED = 2

READ_CHUNK = 256 * 1024
SHARED_BUFFER = ffi.new("char[]", READ_CHUNK)  # one event-loop thread: safe to reuse


class Pump(Protocol):
    def read(self, ciphertext: bytes = b"") -> tuple[bytes, int]: ...
    def write(self, plaintext: bytes) -> bool: ...
    def drain(self) -> bytes: ...


def take_ciphertext(bio: object) -> bytes:
    """Everything waiting in a memory BIO, read through the shared buffer."""
    pending = lib.BIO_ctrl_pending(bio)
    if not pending:
        return b""
    pieces = []
    while pending > 0:
        count = lib.BIO_read(bio, SHARED_BUFFER, min(pending, READ_CHUNK))
        if count <= 0:
            break
        pieces.append(ffi.buffer(SHARED_BUFFER, count)[:])
        pending -= count
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class PurePump:
    __slots__ = ("_ssl", "_into_ssl", "_from_ssl", "_encrypted")

    def __init__(self, connection: SSL.Connection) -> None:
        self._ssl = connection._ssl
        self._into_ssl = connection._into_ssl
        self._from_ssl = connection._from_ssl
        self._encrypted: list[bytes] = []  # ciphertext `write` took out of the BIO, for drain()

    def read(self, ciphertext: bytes = b"") -> tuple[bytes, int]:
        if ciphertext:
            lib.BIO_write(self._into_ssl, ciphertext, len(ciphertext))
        pieces = []
        ending = READ_MORE
        while True:
            count = lib.SSL_read(self._ssl, SHARED_BUFFER, READ_CHUNK)
            if count > 0:
                pieces.append(ffi.buffer(SHARED_BUFFER, count)[:])
                if not lib.BIO_ctrl_pending(self._into_ssl) and not lib.SSL_pending(self._ssl):
                    break  # all consumed: skip the SSL_read + SSL_get_error that would say so
                continue
            error = lib.SSL_get_error(self._ssl, count)
            if error == lib.SSL_ERROR_WANT_READ:
                break
            if error == lib.SSL_ERROR_ZERO_RETURN:  # the peer's close_notify
                ending = CLOSE_NOTIFY
                break
            return b"", FAILED
        return (pieces[0] if len(pieces) == 1 else b"".join(pieces)), ending

    def write(self, plaintext: bytes) -> bool:
        total = len(plaintext)
        written = lib.SSL_write(self._ssl, plaintext, total)
        if written == total:
            return True
        buffer = ffi.from_buffer(plaintext)
        offset = 0
        while written > 0:
            offset += written
            self._encrypted.append(take_ciphertext(self._from_ssl))
            if offset == total:
                return True
            written = lib.SSL_write(self._ssl, buffer + offset, total - offset)
        return False

    def drain(self) -> bytes:
        if not self._encrypted:
            return take_ciphertext(self._from_ssl)
        self._encrypted.append(take_ciphertext(self._from_ssl))
        ciphertext = b"".join(self._encrypted)
        self._encrypted.clear()
        return ciphertext


def address(pointer: object) -> int:
    return int(ffi.cast("uintptr_t", pointer))


def pure_pump(connection: SSL.Connection) -> Pump:
    return PurePump(connection)


_compiled = load_twin("proxy.tls._pump")
_CompiledPump = None if _compiled is None else _compiled.CompiledPump


def compiled_pump(connection: SSL.Connection) -> Pump:
    """The Cython pump on `connection`'s pointers (only when the extension is loaded)."""
    assert _CompiledPump is not None, "proxy.tls._pump is not built"
    pump: Pump = _CompiledPump(address(connection._ssl), address(connection._into_ssl), address(connection._from_ssl))
    return pump


new_pump: Callable[[SSL.Connection], Pump] = pure_pump if _CompiledPump is None else compiled_pump
COMPILED = _CompiledPump is not None
