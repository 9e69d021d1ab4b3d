"""Loopback ports for servers the tests start by number (a routes file needs real numbers, not 0)."""

from __future__ import annotations

import socket

_HANDED_OUT: set[tuple[str, int]] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` nobody listens on now, and one this process has not handed out before: the
    kernel may give a port it just gave again once the probe is closed, and two listeners of one
    routes file asked for one after the other then clash (seen: listen.http = listen.https)."""
    while True:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = int(probe.getsockname()[1])
        if (host, port) not in _HANDED_OUT:
            _HANDED_OUT.add((host, port))
            return port
