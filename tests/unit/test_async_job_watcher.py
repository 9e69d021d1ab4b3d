"""AsyncJobWatcher (proxy/tls/offload.py): one epoll set on the event loop wakes paused handshakes,
with real eventfds — once per pause, never again for a job that already resumed."""

from __future__ import annotations

import asyncio
import os

from proxy.tls.offload import AsyncJobWatcher


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.01)


async def test_a_pause_is_woken_once_and_a_sibling_fd_after_resuming_is_ignored() -> None:
    watcher = AsyncJobWatcher(asyncio.get_running_loop())
    first, second = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    woken: list[str] = []

    def ready() -> None:
        woken.append("job")
        watcher.forget([first, second])

    try:
        watcher.watch([first, second], ready)
        await _settle()
        assert woken == []
        os.eventfd_write(first, 1)
        await _settle()
        os.eventfd_write(second, 1)
        await _settle()
        assert woken == ["job"]
    finally:
        os.close(first)
        os.close(second)


async def test_a_connection_pauses_again_on_the_same_fd_and_a_reused_fd_number_works() -> None:
    watcher = AsyncJobWatcher(asyncio.get_running_loop())
    woken: list[int] = []
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    watcher.watch([fd], lambda: woken.append(1))
    os.eventfd_write(fd, 1)
    await _settle()
    os.eventfd_read(fd)  # the resumed job drains its fd
    watcher.watch([fd], lambda: woken.append(2))  # the next pause re-arms the one-shot entry
    await _settle()
    assert woken == [1]
    os.eventfd_write(fd, 1)
    await _settle()
    assert woken == [1, 2]
    os.close(fd)
    reused = os.eventfd(0, os.EFD_NONBLOCK)  # very likely the same number: epoll dropped the old file
    try:
        watcher.watch([reused], lambda: woken.append(3))
        os.eventfd_write(reused, 1)
        await _settle()
        assert woken == [1, 2, 3]
    finally:
        os.close(reused)
