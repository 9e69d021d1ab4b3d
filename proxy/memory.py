"""Give freed heap memory back to the kernel after connections that held large buffers close.

glibc's malloc returns memory to the kernel only from the top of the heap and for chunks it
mmap'd; the 16-32 KiB buffers of busy connections (reads, TLS records, pending response pieces)
come from the heap, and once a burst of such connections has gone their free chunks sit between
live ones: RSS stays at the burst's peak. `malloc_trim(0)` hands the free pages inside the heap
back as well (madvise DONTNEED, every arena). It walks the heap, so it runs once per burst:
TRIM_DELAY_SECONDS after the first such connection closed, not per connection, preceded by a
full garbage collection (see TRIM_INTERVAL_SECONDS).

A connection counts as having held large buffers once its transport paused writing (its write
buffer passed proxy.flow.WRITE_HIGH_WATER). Without glibc (musl, another libc) this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import weakref

TRIM_DELAY_SECONDS = 1.0  # let a burst of closing connections finish first; one trim for all
# A full garbage collection first frees the reference cycles (parsers) that hold memory of closed
# connections; it pauses the loop ~50 ms per 100k objects (measured on the 2-core test machine),
# so trims are at least this far apart.
TRIM_INTERVAL_SECONDS = 5.0

_libc = ctypes.CDLL(None)
_malloc_trim = getattr(_libc, "malloc_trim", None)
if _malloc_trim is not None:
    _malloc_trim.argtypes = (ctypes.c_size_t,)
    _malloc_trim.restype = ctypes.c_int

_pending: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()  # loops with a trim armed


_last_trim: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, float] = weakref.WeakKeyDictionary()


def release_freed_memory_soon(loop: asyncio.AbstractEventLoop) -> None:
    if _malloc_trim is None or loop in _pending:
        return
    _pending.add(loop)
    earliest = _last_trim.get(loop, float("-inf")) + TRIM_INTERVAL_SECONDS
    loop.call_at(max(loop.time() + TRIM_DELAY_SECONDS, earliest), _trim, loop)


def _trim(loop: asyncio.AbstractEventLoop) -> None:
    _pending.discard(loop)
    _last_trim[loop] = loop.time()
    assert _malloc_trim is not None
    gc.collect()
    _malloc_trim(0)
