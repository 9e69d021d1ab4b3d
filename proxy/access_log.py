"""The access log: one line per request on stdout, formatted lazily and written in batches.

Theory of operation
-------------------
Through the `logging` module a line cost a LogRecord, a handler lock, a format and a write
syscall per request: about a fifth of a keep-alive request. Here `record()` only appends one
tuple of values the exchange already holds; the batch is formatted and written with one `write`
when it reaches `FLUSH_AT` lines or `FLUSH_SECONDS` after its first line (one timer per batch, not
per request), and at drain and exit (`flush()`). A process killed hard loses at most that last
tenth of a second of lines, which is the price nginx's `access_log ... buffer= flush=` pays too.

Lines are text (`client listener protocol "METHOD hostTARGET" status backend durationms`) or JSON
objects with the same fields, chosen per request by the configuration that served it. `client` is
the decided client address, the one the policies judged (`exchange.exchange`): a trusted
X-Forwarded-For's hop, else a PROXY header's source, else the TCP peer — ingress-nginx's
`$remote_addr` after its real-ip module.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import sys
from typing import TextIO

FLUSH_AT = 512  # lines per write at most (≈ 50 KiB): one syscall per burst
FLUSH_SECONDS = 0.1  # a quiet proxy's line appears within this

# client, listener, protocol, host, method, target, status, backend, seconds, as JSON
Entry = tuple[bytes, str, str, bytes, bytes, bytes, int, str, float, bool]


def format_entry(entry: Entry) -> str:
    client, listener, protocol, host, method, target, status, backend, seconds, as_json = entry
    milliseconds = round(seconds * 1000, 3)
    if as_json:
        return json.dumps(
            {
                "client": client.decode(),
                "listener": listener,
                "protocol": protocol,
                "host": host.decode("latin-1"),
                "method": method.decode("latin-1"),
                "target": target.decode("latin-1"),
                "status": status,
                "backend": backend,
                "duration_ms": milliseconds,
            }
        )
    request = f"{method.decode('latin-1')} {host.decode('latin-1')}{target.decode('latin-1')}"
    return f'{client.decode()} {listener} {protocol} "{request}" {status} {backend} {milliseconds}ms'


class AccessLog:
    def __init__(self) -> None:
        self.enabled = False
        self._stream: TextIO = sys.stdout
        self._pending: list[Entry] = []
        self._timer: asyncio.TimerHandle | None = None

    def enable(self, stream: TextIO) -> None:
        self.enabled = True
        self._stream = stream
        atexit.register(self.flush)

    def record(self, entry: Entry) -> None:
        pending = self._pending
        pending.append(entry)
        if len(pending) >= FLUSH_AT:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        self._stream.write("".join(format_entry(entry) + "\n" for entry in batch))
        self._stream.flush()


ACCESS_LOG = AccessLog()
