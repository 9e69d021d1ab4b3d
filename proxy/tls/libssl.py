"""ctypes access to the few libssl/libcrypto functions pyOpenSSL 23 does not bind (the async-job
ones are in proxy/tls/offload.py, through the same `LIBSSL` handle).

pyOpenSSL's cffi module and ctypes open the same shared libssl.so.3 (Debian's build), so an
`SSL_CTX*` taken from `context._context` is valid here too (shared/NOTES.md §1).
"""

from __future__ import annotations

import ctypes
import ctypes.util

from OpenSSL import SSL, crypto
from OpenSSL._util import ffi, lib

LIBSSL = ctypes.CDLL(ctypes.util.find_library("ssl") or "libssl.so.3")
LIBCRYPTO = ctypes.CDLL(ctypes.util.find_library("crypto") or "libcrypto.so.3")
LIBCRYPTO.BIO_s_mem.restype = ctypes.c_void_p
LIBCRYPTO.BIO_new.argtypes = (ctypes.c_void_p,)
LIBCRYPTO.BIO_new.restype = ctypes.c_void_p
LIBCRYPTO.BIO_read.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
LIBCRYPTO.BIO_read.restype = ctypes.c_int
LIBCRYPTO.BIO_free.argtypes = (ctypes.c_void_p,)
LIBCRYPTO.BIO_free.restype = ctypes.c_int
LIBCRYPTO.X509_NAME_print_ex.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_ulong)
LIBCRYPTO.X509_NAME_print_ex.restype = ctypes.c_int
LIBSSL.SSL_CTX_ctrl.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p)
LIBSSL.SSL_CTX_ctrl.restype = ctypes.c_long
LIBSSL.SSL_CTX_set_num_tickets.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
LIBSSL.SSL_CTX_set_num_tickets.restype = ctypes.c_int

# XN_FLAG_RFC2253 (openssl/x509.h): ASN1_STRFLGS_RFC2253 (0x317: RFC 2253 escapes, control and
# non-ASCII bytes escaped after UTF-8 conversion, unknown types dumped as DER) | SEP_COMMA_PLUS
# (1 << 16) | DN_REV (1 << 20) | FN_SN (0) | DUMP_UNKNOWN_FIELDS (1 << 24). nginx prints
# $ssl_client_s_dn / $ssl_client_i_dn with exactly these flags (since 1.11.6).
_XN_FLAG_RFC2253 = 0x1110317
_MAX_NAME_TEXT = 65536  # a printed DN longer than this is not a real certificate's: refused, not truncated


def name_rfc2253(certificate: crypto.X509, issuer: bool = False) -> bytes:
    """The certificate's subject (or issuer) DN printed as nginx's `$ssl_client_s_dn`
    (`$ssl_client_i_dn`): OpenSSL's RFC 2253 form, most specific RDN first, short names
    (`emailAddress=`, where RFC 4514 printers write the OID)."""
    x509 = certificate._x509  # type: ignore[attr-defined]
    name = lib.X509_get_issuer_name(x509) if issuer else lib.X509_get_subject_name(x509)
    bio = LIBCRYPTO.BIO_new(LIBCRYPTO.BIO_s_mem())
    if not bio:
        raise MemoryError("BIO_new failed")
    try:
        length = LIBCRYPTO.X509_NAME_print_ex(bio, address(name), 0, _XN_FLAG_RFC2253)
        if not 0 <= length <= _MAX_NAME_TEXT:
            raise ValueError("the certificate's name cannot be printed")
        buffer = ctypes.create_string_buffer(length or 1)
        read = LIBCRYPTO.BIO_read(bio, buffer, length) if length else 0
        return buffer.raw[: max(read, 0)]
    finally:
        LIBCRYPTO.BIO_free(bio)


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
