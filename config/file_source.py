"""Standalone mode's route source: the routes file at start, then again on change or SIGHUP.

The file is polled (mtime, size, inode: editors that save by rename change the inode) rather
than watched with inotify, which keeps it portable and dependency-free; SIGHUP reloads at once,
which is also how to pick up rotated certificate files. A file that fails to load is reported
problem by problem with FILE:LINE:COL and the last good configuration keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from prometheus_client import Counter, Gauge

from config.routes_file import LoadedRoutes, RoutesFileError, load_routes_file
from config.source import ConfigurationSink

LOG = logging.getLogger("ingress_proxy.routes_file")
RELOADS = Counter("ingress_proxy_config_reloads", "Routes file loads after start", ["result"])
LAST_RELOAD_SUCCESS = Gauge("ingress_proxy_config_last_reload_success", "1 if the last routes file load succeeded")
POLL_SECONDS = 1.0


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_size, status.st_ino)


class RoutesFileSource:
    def __init__(self, path: Path, initial: LoadedRoutes, poll_seconds: float = POLL_SECONDS) -> None:
        self.path = path
        self._current = initial
        self._poll_seconds = poll_seconds

    async def run(self, sink: ConfigurationSink) -> None:
        sink.publish(self._current.configuration)
        LAST_RELOAD_SUCCESS.set(1)
        hangup = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, hangup.set)
        seen = _fingerprint(self.path)
        try:
            while True:
                try:
                    await asyncio.wait_for(hangup.wait(), self._poll_seconds)
                except TimeoutError:
                    pass
                forced = hangup.is_set()
                hangup.clear()
                fingerprint = _fingerprint(self.path)
                if forced or fingerprint != seen:
                    seen = fingerprint
                    self._reload(sink, forced)
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    def _reload(self, sink: ConfigurationSink, forced: bool) -> None:
        try:
            loaded = load_routes_file(self.path)
        except RoutesFileError as error:
            RELOADS.labels("failed").inc()
            LAST_RELOAD_SUCCESS.set(0)
            LOG.error("reload rejected, still serving the previous configuration:\n%s", error)
            return
        if loaded.listeners != self._current.listeners:
            LOG.warning("%s: listener changes take effect after a restart; routes and certificates reloaded", self.path)
        if loaded.configuration == self._current.configuration and not forced:
            return
        self._current = loaded
        problems = sink.publish(loaded.configuration)
        RELOADS.labels("partial" if problems else "ok").inc()
        LAST_RELOAD_SUCCESS.set(0 if problems else 1)
        LOG.info("reloaded %s%s", self.path, f" with {len(problems)} problems" if problems else "")
