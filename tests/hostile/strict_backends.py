"""Backends that judge the proxy's output with an independent HTTP/1.1 implementation (h11).

The differential framing tests need a second opinion on the bytes the proxy forwards: our own
parser (llhttp) decided how the client's input is framed, and a backend built on h11, a strict
pure-Python HTTP/1.1 state machine, must parse exactly the same requests from what we sent.

- `StrictRecorder` parses every request it receives with h11 and records method, target, headers
  and body; anything h11 refuses is recorded as an error (the proxy sent malformed bytes); a
  request the proxy cut off (a body it stopped streaming) is not recorded. Each request is answered with a small
  response naming the request's target, so a response that reaches the wrong client is visible;
  targets under `/slow` are answered after `SLOW_SECONDS` (a backend still working when the proxy
  might already have pooled the connection).
- `ScriptedResponder` answers each request with the next raw response from its script, exactly
  as given (hostile framing included), and closes after it when told to.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

import h11

from config.model import Address
from tests.hostile.proxy_process import LOOPBACK

SLOW_SECONDS = 0.3


@dataclass
class SeenRequest:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def values(self, name: bytes) -> list[bytes]:
        return [value for header, value in self.headers if header == name]


@dataclass
class StrictRecorder:
    address: Address = Address(LOOPBACK, 0)
    requests: list[SeenRequest] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.address = Address(LOOPBACK, server.sockets[0].getsockname()[1])
        return server

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER)
        request: SeenRequest | None = None
        try:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    connection.receive_data(data)
                    if not data:
                        return
                elif isinstance(event, h11.Request):
                    request = SeenRequest(event.method, event.target, list(event.headers), b"")
                elif isinstance(event, h11.Data):
                    assert request is not None
                    request.body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    self.requests.append(request)
                    if request.target.startswith(b"/slow"):
                        await asyncio.sleep(SLOW_SECONDS)
                    body = b"answer to " + request.target
                    head = connection.send(h11.Response(status_code=200, headers=[("Content-Length", str(len(body)))]))
                    if request.method != b"HEAD":
                        head += connection.send(h11.Data(data=body))
                    writer.write(head + connection.send(h11.EndOfMessage()))
                    await writer.drain()
                    request = None
                    connection.start_next_cycle()
                else:
                    return
        except h11.RemoteProtocolError as error:
            self.errors.append(f"h11 refused what the proxy sent: {error}")
        except (ConnectionError, h11.LocalProtocolError):
            pass
        finally:
            writer.close()


@dataclass
class ScriptedResponder:
    """`script` holds (raw response bytes, close afterwards) for the requests to come, in order."""

    address: Address = Address(LOOPBACK, 0)
    script: deque[tuple[bytes, bool]] = field(default_factory=deque)
    requests: int = 0

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.address = Address(LOOPBACK, server.sockets[0].getsockname()[1])
        return server

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")  # the proxy's requests here carry no body
                self.requests += 1
                response, close = self.script.popleft() if self.script else (b"HTTP/1.1 500 x\r\n\r\n", True)
                writer.write(response)
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()  # FIN, not RST: an RST could discard the response still in flight
