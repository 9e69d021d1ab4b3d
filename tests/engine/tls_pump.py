"""Small pyOpenSSL memory-BIO TLS servers for the engine tests (stand-ins until proxy/tls.py).

`pump_handshakes` runs many client/server handshakes in one thread with no sockets, parking a
server connection whenever its handshake returns SSL_ERROR_WANT_ASYNC and resuming it when its
async fd is readable — the loop proxy/tls.py runs, reduced to handshakes. `TlsTestServer` does
the same for real loopback clients (openssl s_client) on an asyncio loop.
"""

from __future__ import annotations

import asyncio
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from OpenSSL import SSL
from OpenSSL._util import lib

from proxy.offload import SSL_ERROR_WANT_ASYNC, async_wait_fds

_SSL_ERROR_WANT_READ = 2
_READ_SIZE = 65536


class HandshakeFailed(Exception):
    pass


def server_handshake_step(server: SSL.Connection) -> int:
    """One SSL_do_handshake on the server: 1 done, else the SSL_get_error code (2 or 9)."""
    lib.ERR_clear_error()  # a resumed job leaves old errors behind (NOTES §1)
    result = lib.SSL_do_handshake(server._ssl)
    if result == 1:
        return 1
    error = lib.SSL_get_error(server._ssl, result)
    if error in (_SSL_ERROR_WANT_READ, SSL_ERROR_WANT_ASYNC):
        return error
    raise HandshakeFailed(f"server handshake failed: SSL_get_error={error}")


def _move(source: SSL.Connection, destination: SSL.Connection) -> None:
    while True:
        try:
            data = source.bio_read(_READ_SIZE)
        except SSL.WantReadError:
            return
        if not data:
            return
        destination.bio_write(data)


@dataclass
class _Pair:
    server: SSL.Connection
    client: SSL.Connection
    server_done: bool = False
    client_done: bool = False
    wait_fds: list[int] = field(default_factory=list)


@dataclass
class PumpResult:
    servers: list[SSL.Connection]
    want_async: int  # server calls that returned SSL_ERROR_WANT_ASYNC
    peak_paused: int  # most server connections paused at once


def _new_pair(server_context: SSL.Context, client_context: SSL.Context) -> _Pair:
    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    client.set_tlsext_host_name(b"localhost")
    return _Pair(server, client)


def pump_handshakes(
    server_context: SSL.Context,
    client_context: SSL.Context,
    count: int,
    concurrency: int | None = None,
    when_stalled: Callable[[], None] | None = None,
    timeout: float = 20.0,
) -> PumpResult:
    """Complete `count` handshakes in this thread, at most `concurrency` (default: all) in flight,
    starting a new one as soon as one finishes. `when_stalled` runs once, the first time every
    handshake in flight is paused on an async job, none can start, and no wait fd is readable."""
    concurrency = concurrency or count
    started = want_async = peak_paused = 0
    active: list[_Pair] = []
    finished: list[SSL.Connection] = []
    deadline = time.monotonic() + timeout
    while started < count or active:
        if time.monotonic() > deadline:
            raise HandshakeFailed(f"{len(finished)} of {count} handshakes done after {timeout} s")
        while started < count and len(active) < concurrency:
            active.append(_new_pair(server_context, client_context))
            started += 1
        for pair in active:
            if pair.wait_fds:
                continue
            if not pair.client_done:
                try:
                    pair.client.do_handshake()
                    pair.client_done = True
                except SSL.WantReadError:
                    pass
            _move(pair.client, pair.server)
            if not pair.server_done:
                step = server_handshake_step(pair.server)
                pair.server_done = step == 1
                if step == SSL_ERROR_WANT_ASYNC:
                    want_async += 1
                    pair.wait_fds = async_wait_fds(pair.server)
                    if not pair.wait_fds:
                        raise HandshakeFailed("WANT_ASYNC without wait fds")
            _move(pair.server, pair.client)
        finished.extend(pair.server for pair in active if pair.server_done and pair.client_done)
        active = [pair for pair in active if not (pair.server_done and pair.client_done)]
        paused = [pair for pair in active if pair.wait_fds]
        peak_paused = max(peak_paused, len(paused))
        if paused:
            nothing_else_to_do = len(paused) == len(active) and (started == count or len(active) == concurrency)
            fds = [fd for pair in paused for fd in pair.wait_fds]
            readable, _, _ = select.select(fds, [], [], 0)
            if not readable and nothing_else_to_do:
                if when_stalled is not None:
                    when_stalled()
                    when_stalled = None
                readable, _, _ = select.select(fds, [], [], 1.0)
            for pair in paused:
                if set(pair.wait_fds) & set(readable):
                    pair.wait_fds = []
    return PumpResult(finished, want_async, peak_paused)


class TlsTestServer:
    """Loopback TLS server: handshake (async-job aware), answer b"hello\\n", close_notify, close."""

    def __init__(self, context: SSL.Context) -> None:
        self.context = context
        self.handshakes = 0
        self.want_async = 0
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> TlsTestServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = SSL.Connection(self.context, None)
        connection.set_accept_state()
        try:
            while (step := server_handshake_step(connection)) != 1:
                self._flush(connection, writer)
                if step == SSL_ERROR_WANT_ASYNC:
                    self.want_async += 1
                    await _readable(async_wait_fds(connection))
                    continue
                data = await reader.read(_READ_SIZE)
                if not data:
                    return
                connection.bio_write(data)
            self.handshakes += 1
            connection.send(b"hello\n")
            connection.shutdown()  # close_notify: s_client treats a bare EOF as an error
            self._flush(connection, writer)
            await writer.drain()
        except (HandshakeFailed, ConnectionError):
            return
        finally:
            writer.close()

    @staticmethod
    def _flush(connection: SSL.Connection, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                data = connection.bio_read(_READ_SIZE)
            except SSL.WantReadError:
                return
            if not data:
                return
            writer.write(data)


async def _readable(fds: list[int]) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    for fd in fds:
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await asyncio.wait_for(ready, 10)
    finally:
        for fd in fds:
            loop.remove_reader(fd)


async def s_client(port: int, ca_file: str, *options: str) -> str:
    """Run `openssl s_client -brief` against 127.0.0.1:port; returns its output, raises if it failed."""
    process = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
        "-CAfile", ca_file, "-verify_return_error", "-brief", *options,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 20)
    text = output.decode(errors="replace")
    if process.returncode != 0 or "CONNECTION ESTABLISHED" not in text:
        raise HandshakeFailed(f"s_client exited {process.returncode}: {text.strip()}")
    return text


def signature_type(s_client_output: str) -> str:
    """The server's signature algorithm as `s_client -brief` reports it ("RSA-PSS", "ECDSA", ...)."""
    for line in s_client_output.splitlines():
        if line.startswith(("Signature type:", "Peer signature type:")):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no signature type in: {s_client_output}")
