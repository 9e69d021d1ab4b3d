"""Drive the real TLS state machine (`proxy.tls.ServerTls`) for the engine and provider tests.

`pump_handshakes` runs many client/server handshakes in one thread with no sockets: pyOpenSSL
clients on memory BIOs against `ServerTls` servers, a server that enters ASYNC_PAUSED parked until
one of its wait fds is readable, then `resume_handshake()` — the loop proxy/downstream.py runs,
reduced to handshakes. `TlsTestServer` does the same for real loopback clients (openssl s_client)
on an asyncio loop.
"""

from __future__ import annotations

import asyncio
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from OpenSSL import SSL

from proxy.tls import ServerTls, TlsFailure, TlsState

_READ_SIZE = 65536


class HandshakeFailed(Exception):
    pass


def _client_output(client: SSL.Connection) -> bytes:
    pieces = []
    while True:
        try:
            data = client.bio_read(_READ_SIZE)
        except SSL.WantReadError:
            break
        if not data:
            break
        pieces.append(data)
    return b"".join(pieces)


@dataclass
class _Pair:
    server: ServerTls
    client: SSL.Connection
    client_done: bool = False
    wait_fds: list[int] = field(default_factory=list)

    @property
    def server_done(self) -> bool:
        return self.server.state is TlsState.OPEN


@dataclass
class PumpResult:
    servers: list[ServerTls]
    want_async: int  # times a server entered ASYNC_PAUSED
    peak_paused: int  # most server connections paused at once


def _new_pair(server_context: SSL.Context, client_context: SSL.Context) -> _Pair:
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    client.set_tlsext_host_name(b"localhost")
    return _Pair(ServerTls(server_context), client)


def _step(pair: _Pair) -> bool:
    """Client handshake step, its bytes into the server, the server's back: True if it paused."""
    if not pair.client_done:
        try:
            pair.client.do_handshake()
            pair.client_done = True
        except SSL.WantReadError:
            pass
    try:
        if pair.server.state is TlsState.ASYNC_PAUSED:
            pair.server.resume_handshake()
        elif not pair.server_done:
            pair.server.receive(_client_output(pair.client))
    except TlsFailure as failure:
        raise HandshakeFailed(f"server handshake failed: {failure.reason}") from None
    outgoing = pair.server.outgoing()
    if outgoing:
        pair.client.bio_write(outgoing)
    return pair.server.state is TlsState.ASYNC_PAUSED


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
    finished: list[ServerTls] = []
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
            if _step(pair):
                want_async += 1
                pair.wait_fds = pair.server.async_wait_fds()
                if not pair.wait_fds:
                    raise HandshakeFailed("ASYNC_PAUSED without wait fds")
            elif pair.server_done and not pair.client_done:
                _step(pair)  # the client reads the server's last flight
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
                    pair.wait_fds = []  # the next _step resumes it
    return PumpResult(finished, want_async, peak_paused)


class TlsTestServer:
    """Loopback TLS server on `ServerTls`: handshake (async-job aware), answer b"hello\\n",
    close_notify, close."""

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
        tls = ServerTls(self.context)
        try:
            while tls.state in (TlsState.HANDSHAKING, TlsState.ASYNC_PAUSED):
                if tls.state is TlsState.ASYNC_PAUSED:
                    self.want_async += 1
                    await _readable(tls.async_wait_fds())  # never drop a paused connection
                    tls.resume_handshake()
                else:
                    data = await reader.read(_READ_SIZE)
                    if not data:
                        return
                    tls.receive(data)
                writer.write(tls.outgoing())
            self.handshakes += 1  # OPEN, or CLOSED by a close_notify that came with the Finished
            if tls.state is TlsState.OPEN:
                tls.send(b"hello\n")
            tls.close()  # close_notify: s_client treats a bare EOF as an error
            writer.write(tls.outgoing())
            await writer.drain()
        except (TlsFailure, ConnectionError):
            return
        finally:
            writer.close()


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
