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
nor the fd API: SSL_get_all_async_fds is found with ctypes on `libssl.so.3` and called through a
cffi function pointer (it is on the per-pause path). `check_engine_support`
(config.crypto) makes sure that this is the very library instance pyOpenSSL uses, so
`conn._ssl` pointers are valid here.
"""

from __future__ import annotations

import asyncio
import ctypes
import select
import weakref
from collections.abc import Callable

from OpenSSL import SSL
from OpenSSL._util import ffi, lib

from proxy.tls.libssl import LIBSSL

SSL_ERROR_WANT_ASYNC = 9
SSL_MODE_ASYNC = 0x100


# SSL_get_all_async_fds called through a cffi function pointer on pyOpenSSL's own `ffi`, with
# reused buffers (one event-loop thread): 16 µs per pause through ctypes (argument conversion and
# a fresh array per call, measured with cProfile on the proxy) against ~1 µs.
_get_all_async_fds = ffi.cast(
    "int (*)(SSL *, int *, size_t *)", ctypes.cast(LIBSSL.SSL_get_all_async_fds, ctypes.c_void_p).value
)
_fd_count = ffi.new("size_t *")
_FD_BUFFER_LENGTH = 8
_fd_buffer = ffi.new("int[]", _FD_BUFFER_LENGTH)


def enable_async_mode(context: SSL.Context) -> None:
    """Let engines pause handshakes on `context` (`SSL_CTX_set_mode(ctx, SSL_MODE_ASYNC)`)."""
    if not lib.SSL_CTX_set_mode(context._context, SSL_MODE_ASYNC) & SSL_MODE_ASYNC:
        raise RuntimeError("SSL_CTX_set_mode(SSL_MODE_ASYNC) did not take effect")


def async_wait_fds(connection: SSL.Connection) -> list[int]:
    """The fds to wait on (readable) before repeating the SSL call that returned WANT_ASYNC."""
    ssl = connection._ssl
    if not _get_all_async_fds(ssl, ffi.NULL, _fd_count):
        return []
    count = _fd_count[0]
    # OpenSSL writes every fd without a bound: the buffer must hold the count it just reported.
    buffer = _fd_buffer if count <= _FD_BUFFER_LENGTH else ffi.new("int[]", count)
    if not _get_all_async_fds(ssl, buffer, _fd_count):
        return []
    return ffi.unpack(buffer, count)


def async_jobs_supported() -> bool:
    """Whether this libcrypto can run async jobs on this platform (`ASYNC_is_capable`)."""
    is_capable = ctypes.CDLL("libcrypto.so.3").ASYNC_is_capable
    is_capable.restype = ctypes.c_int
    return bool(is_capable())


class AsyncJobWatcher:
    """Wakes paused handshakes when their job's wait fd becomes readable: one epoll set for all of
    them, registered with the event loop once.

    Watching each pause with `loop.add_reader`/`remove_reader` cost 12.8 µs per pause in uvloop (a
    libuv poll handle created, checked with two epoll_ctl calls, started, stopped and closed); here
    a pause costs one epoll_ctl. Each fd is armed EPOLLONESHOT: it reports once, then stays quiet
    until re-armed by the connection's next pause. A closed fd leaves the set by itself (epoll
    drops a file when its last descriptor closes), so a reused fd number is simply registered anew.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._epoll = select.epoll()
        self._waiting: dict[int, Callable[[], None]] = {}  # fd → the paused connection's callback
        loop.add_reader(self._epoll.fileno(), self._ready)

    def watch(self, fds: list[int], ready: Callable[[], None]) -> None:
        for fd in fds:
            self._waiting[fd] = ready
            try:  # register first: most pauses are a connection's first, on a wait fd new to the set
                self._epoll.register(fd, _ONE_READ)
            except FileExistsError:  # paused before: its fd is still in the set, disarmed
                self._epoll.modify(fd, _ONE_READ)

    def forget(self, fds: list[int]) -> None:
        """The job resumed: a sibling fd that fires later must not call it again."""
        for fd in fds:
            self._waiting.pop(fd, None)

    def _ready(self) -> None:
        for fd, _ in self._epoll.poll(0):
            ready = self._waiting.pop(fd, None)
            if ready is not None:
                ready()


_ONE_READ = select.EPOLLIN | select.EPOLLONESHOT
_watchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncJobWatcher] = weakref.WeakKeyDictionary()


def async_job_watcher(loop: asyncio.AbstractEventLoop) -> AsyncJobWatcher:
    """The watcher of `loop` (one per event loop, made on first use)."""
    watcher = _watchers.get(loop)
    if watcher is None:
        watcher = _watchers[loop] = AsyncJobWatcher(loop)
    return watcher
