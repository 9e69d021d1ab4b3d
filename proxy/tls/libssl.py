"""ctypes access to the few libssl functions pyOpenSSL 23 does not bind (the async-job ones are in
proxy/tls/offload.py, through the same `LIBSSL` handle).

pyOpenSSL's cffi module and ctypes open the same shared libssl.so.3 (Debian's build), so an
`SSL_CTX*` taken from `context._context` is valid here too (shared/NOTES.md §1).
"""

from __future__ import annotations

import ctypes
import ctypes.util

from OpenSSL import SSL, crypto
from OpenSSL._util import ffi

LIBSSL = ctypes.CDLL(ctypes.util.find_library("ssl") or "libssl.so.3")
LIBSSL.SSL_CTX_ctrl.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p)
LIBSSL.SSL_CTX_ctrl.restype = ctypes.c_long
LIBSSL.SSL_CTX_set_num_tickets.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
LIBSSL.SSL_CTX_set_num_tickets.restype = ctypes.c_int

_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
_SSL_CTRL_CHAIN_CERT = 89
TICKET_KEYS_LENGTH = 80  # OpenSSL 3: 16 bytes name + 32 HMAC secret + 32 AES secret


def address(pointer: object) -> int:
    """A cffi pointer (`context._context`, `connection._ssl`) as the integer ctypes takes."""
    return int(ffi.cast("uintptr_t", pointer))


def add_chain_certificate(context: SSL.Context, certificate: crypto.X509) -> None:
    """Append an intermediate to the chain of the certificate last set on `context` (add1)."""
    if not LIBSSL.SSL_CTX_ctrl(address(context._context), _SSL_CTRL_CHAIN_CERT, 1, address(certificate._x509)):
        raise SSL.Error("could not add the chain certificate")


def set_ticket_keys(context: SSL.Context, keys: bytes) -> None:
    """Use `keys` for session tickets, so tickets survive reloads and are valid in every worker."""
    if len(keys) != TICKET_KEYS_LENGTH:
        raise ValueError(f"ticket keys must be {TICKET_KEYS_LENGTH} bytes")
    buffer = ctypes.create_string_buffer(keys, len(keys))
    if not LIBSSL.SSL_CTX_ctrl(address(context._context), _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, len(keys), buffer):
        raise SSL.Error("could not set the session ticket keys")


def set_ticket_count(context: SSL.Context, count: int) -> None:
    """How many TLS 1.3 session tickets a full handshake sends (OpenSSL's default is 2)."""
    if not LIBSSL.SSL_CTX_set_num_tickets(address(context._context), count):
        raise SSL.Error("could not set the number of session tickets")


_SSL_CTRL_SET_GROUPS_LIST = 92  # SSL_CTX_set1_groups_list is a macro over SSL_CTX_ctrl


def set_groups(context: SSL.Context, groups: str) -> None:
    """Key-exchange groups ("X25519:P-256"); OpenSSL refuses the whole list if one name is unknown."""
    if not LIBSSL.SSL_CTX_ctrl(address(context._context), _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode("ascii")):
        raise SSL.Error(f"unknown group in {groups!r}")
