# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# distutils: libraries = ssl crypto
"""The TLS record pump in C: the compiled twin of `proxy.tls.pump.PurePump`.

Theory of operation
-------------------
`CompiledPump` holds the three pointers of one pyOpenSSL `SSL.Connection` over memory BIOs
(`_ssl`, `_into_ssl`, `_from_ssl`, handed over as integers by `proxy.tls.pump.compiled_pump`)
and calls libssl on them directly, so one Python call does what the pure pump needs several cffi
calls for: `read` feeds the ciphertext and pulls every plaintext record it completes; `write`
encrypts a whole plaintext record by record and takes each record's ciphertext out of the BIO;
`drain` returns everything waiting to go to the socket.

The semantics are the pure pump's, statement for statement (the differential tests in
tests/unit/test_compiled_pump.py compare both on the same inputs byte for byte): the same
SSL_read / SSL_get_error sequence, the same endings (READ_MORE, CLOSE_NOTIFY, FAILED), no
ERR_clear_error where the pure path has none, and the error queue left for the Python caller,
which builds the same exception from it (`proxy.tls.error_queue_reason`). The state machine, the
exceptions and the handshake stay in Python.

It links the very libssl.so.3 / libcrypto.so.3 that Debian's cryptography binding uses (the
pointers are only valid inside that one library instance): tests/unit/test_compiled_pump.py
checks it with ldd. The connection object owns the SSL*; the pump never frees anything, and
MemoryBioTls keeps the connection alive for as long as it keeps the pump.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uintptr_t


cdef extern from "openssl/ssl.h" nogil:
    ctypedef struct SSL:
        pass
    ctypedef struct BIO:
        pass
    int SSL_read(SSL *ssl, void *buf, int num)
    int SSL_write(SSL *ssl, const void *buf, int num)
    int SSL_get_error(const SSL *ssl, int ret)
    int SSL_pending(const SSL *ssl)
    int BIO_read(BIO *b, void *data, int dlen)
    int BIO_write(BIO *b, const void *data, int dlen)
    size_t BIO_ctrl_pending(BIO *b)
    int SSL_ERROR_WANT_READ
    int SSL_ERROR_ZERO_RETURN


# The endings of `read`: the values of proxy.tls.pump's READ_MORE, CLOSE_NOTIFY and FAILED.
cdef enum Ending:
    READ_MORE = 0
    CLOSE_NOTIFY = 1
    FAILED = 2

# As proxy.tls.pump.READ_CHUNK: SSL_read returns one record (≤ 16 KiB) a call, so any size above that
# only matters for the number of calls; one event-loop thread, so one static buffer.
DEF READ_CHUNK = 256 * 1024
cdef char read_buffer[READ_CHUNK]


cdef bytes take_ciphertext(BIO *bio):
    """Everything waiting in a memory BIO, read straight into the bytes object returned."""
    cdef size_t pending = BIO_ctrl_pending(bio)
    if not pending:
        return b""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>pending)
    cdef char *into = PyBytes_AS_STRING(out)
    cdef size_t taken = 0
    cdef int count
    while taken < pending:
        count = BIO_read(bio, into + taken, <int>(pending - taken))
        if count <= 0:
            return out[:taken]
        taken += count
    return out


cdef class CompiledPump:
    cdef SSL *ssl
    cdef BIO *into_ssl
    cdef BIO *from_ssl
    cdef list encrypted  # ciphertext `write` took out of the BIO, for drain(); made on first use

    def __cinit__(self, uintptr_t ssl, uintptr_t into_ssl, uintptr_t from_ssl):
        self.ssl = <SSL *>ssl
        self.into_ssl = <BIO *>into_ssl
        self.from_ssl = <BIO *>from_ssl
        self.encrypted = None  # most connections never write more than one record at a time

    def read(self, bytes ciphertext not None = b""):
        """Feed `ciphertext`, then read every plaintext record: (plaintext, ending)."""
        cdef Py_ssize_t length = len(ciphertext)
        if length:
            BIO_write(self.into_ssl, PyBytes_AS_STRING(ciphertext), <int>length)
        cdef list pieces = None
        cdef bytes single = None
        cdef int count, error
        cdef Ending ending = READ_MORE
        while True:
            count = SSL_read(self.ssl, read_buffer, READ_CHUNK)
            if count > 0:
                if single is None:
                    single = PyBytes_FromStringAndSize(read_buffer, count)
                else:
                    if pieces is None:
                        pieces = [single]
                    pieces.append(PyBytes_FromStringAndSize(read_buffer, count))
                if not BIO_ctrl_pending(self.into_ssl) and not SSL_pending(self.ssl):
                    break  # all consumed: skip the SSL_read + SSL_get_error that would say so
                continue
            error = SSL_get_error(self.ssl, count)
            if error == SSL_ERROR_WANT_READ:
                break
            if error == SSL_ERROR_ZERO_RETURN:  # the peer's close_notify
                ending = CLOSE_NOTIFY
                break
            return b"", FAILED
        if pieces is not None:
            return b"".join(pieces), ending
        return (single if single is not None else b""), ending

    def write(self, bytes plaintext not None):
        """Encrypt all of `plaintext`, record by record (partial writes are on); False = failed,
        the error queue says why. Each record's ciphertext leaves the BIO at once, as in the pure
        pump, so the BIO never grows past one record."""
        cdef Py_ssize_t total = len(plaintext)
        cdef const char *data = PyBytes_AS_STRING(plaintext)
        cdef Py_ssize_t offset = 0
        cdef int written = SSL_write(self.ssl, data, <int>total)
        if written == total:
            return True
        if self.encrypted is None:
            self.encrypted = []
        while written > 0:
            offset += written
            self.encrypted.append(take_ciphertext(self.from_ssl))
            if offset == total:
                return True
            written = SSL_write(self.ssl, data + offset, <int>(total - offset))
        return False

    def drain(self):
        """Ciphertext waiting to go to the socket."""
        if not self.encrypted:
            return take_ciphertext(self.from_ssl)
        self.encrypted.append(take_ciphertext(self.from_ssl))
        ciphertext = b"".join(self.encrypted)
        self.encrypted.clear()
        return ciphertext
