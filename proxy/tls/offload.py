"""OpenSSL async-job offload (`SSL_MODE_ASYNC`) for pyOpenSSL 23, through ctypes.

Theory of operation. With `SSL_MODE_ASYNC` set on a context, libssl runs each handshake step inside
an ASYNC_JOB. An engine that offloads a private-key operation (QAT, or the test fixture engine)
submits the work, registers a wait fd on the job's ASYNC_WAIT_CTX and pauses the job with
`ASYNC_pause_job`; the SSL call then returns -1 and `SSL_get_error` says `SSL_ERROR_WANT_ASYNC` (9).
The caller must not touch the connection in any other way: it waits until one of the fds from
`SSL_get_all_async_fds` is readable and repeats exactly the same SSL call (after `ERR_clear_error`),
which resumes the job where it paused. A paused connection owns a coroutine stack inside OpenSSL, so
it must never be freed before the job finishes. A software key never pauses, so the mode costs
nothing when no engine offloads.

pyOpenSSL 23 has `SSL_CTX_set_mode` in its cffi `lib` but neither the mode constant, nor error 9,
nor the fd API: those are reached with ctypes on `libssl.so.3`. `check_engine_support`
(config.crypto) makes sure that this is the very library instance pyOpenSSL uses, so
`conn._ssl` pointers are valid here.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

from OpenSSL import SSL
from OpenSSL._util import lib

from proxy.tls.libssl import LIBSSL, address

SSL_ERROR_WANT_ASYNC = 9
SSL_MODE_ASYNC = 0x100


@functools.cache
def _get_all_async_fds() -> Any:
    function = LIBSSL.SSL_get_all_async_fds
    function.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_size_t)]
    function.restype = ctypes.c_int
    return function


def enable_async_mode(context: SSL.Context) -> None:
    """Let engines pause handshakes on `context` (`SSL_CTX_set_mode(ctx, SSL_MODE_ASYNC)`)."""
    if not lib.SSL_CTX_set_mode(context._context, SSL_MODE_ASYNC) & SSL_MODE_ASYNC:
        raise RuntimeError("SSL_CTX_set_mode(SSL_MODE_ASYNC) did not take effect")


def async_wait_fds(connection: SSL.Connection) -> list[int]:
    """The fds to wait on (readable) before repeating the SSL call that returned WANT_ASYNC."""
    get_all_async_fds = _get_all_async_fds()
    ssl = address(connection._ssl)
    count = ctypes.c_size_t(0)
    if not get_all_async_fds(ssl, None, ctypes.byref(count)):
        return []
    fds = (ctypes.c_int * count.value)()
    if not get_all_async_fds(ssl, fds, ctypes.byref(count)):
        return []
    return list(fds[: count.value])


def async_jobs_supported() -> bool:
    """Whether this libcrypto can run async jobs on this platform (`ASYNC_is_capable`)."""
    is_capable = ctypes.CDLL("libcrypto.so.3").ASYNC_is_capable
    is_capable.restype = ctypes.c_int
    return bool(is_capable())
