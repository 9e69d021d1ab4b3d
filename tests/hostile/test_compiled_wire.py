"""The same real exchanges through a compiled proxy and a pure one (INGRESS_PROXY_PURE=1): both wires
must carry the same bytes.

Two proxy subprocesses, identical but for the environment, each in front of its own pair of raw
backends (one plaintext, one over TLS, so both TLS directions run through the pump under test).
A real TLS client (Python's ssl) sends the same pipelined requests to each; the last one asks to
close, so each exchange ends when the proxy closes. Compared byte for byte: what each backend
received (with the proxies' listening ports, which differ, written as PORT) and what the client
decrypted (with Date values written as DATE: the proxy stamps its own when a backend sends none).

Responses have a Content-Length (or no body): a chunked or read-until-close body is re-chunked
piece by piece as it arrives, so its bytes depend on TCP timing, not on the path under test.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.hostile.backends import BackendZoo
from tests.hostile.clients import SERVER_NAME
from tests.hostile.conftest import TIMEOUTS
from tests.hostile.proxy_process import LOOPBACK, Ports, ProxyProcess, routes_document, write_certificate

ROOT = Path(__file__).resolve().parents[2]
BUILT = sorted(ROOT.glob("proxy/tls/_pump*.so")) and sorted(ROOT.glob("proxy/_http1_heads*.so"))
pytestmark = pytest.mark.skipif(not BUILT, reason="the compiled hot path was not built in this checkout: make install")

RIG_TIMEOUTS = {**TIMEOUTS, "header_read": 30.0, "idle": 30.0, "backend_response": 30.0}
BIG = 100_000  # more than six 16 KiB TLS records, both directions
RESPONSES = [  # chosen by the request target's last number; (response, the backend closes after it)
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    (b"HTTP/1.1 200 OK\r\nServer: s\r\nDate: D\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\nContent-Length: 5\r\n\r\nhello", False),
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % BIG + b"b" * BIG, False),
    (b"HTTP/1.1 204 No Content\r\nX-Empty: 1\r\n\r\n", False),
    (b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 4\r\n\r\ngone", True),
    (b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n", False),
]
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


@dataclass
class RawBackend:
    """Records every byte the proxy sent it, per connection, and answers from RESPONSES."""

    tls: ssl.SSLContext | None = None
    port: int = 0
    streams: list[bytearray] = field(default_factory=list)

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._serve, LOOPBACK, 0, ssl=self.tls)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = bytearray()
        self.streams.append(stream)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                found = _LENGTH.search(head)
                body = await reader.readexactly(int(found.group(1))) if found else b""
                stream += head + body
                response, close = RESPONSES[int(head.split(b" ", 2)[1].rsplit(b"/", 1)[1]) % len(RESPONSES)]
                if head.startswith(b"HEAD "):
                    response = response[: response.index(b"\r\n\r\n") + 4]
                writer.write(response)
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def take(self, port: int) -> bytes:
        seen = b"|".join(bytes(stream) for stream in self.streams)
        self.streams.clear()
        return seen.replace(b"%d" % port, b"PORT")


@dataclass
class Side:
    proxy: ProxyProcess
    plain: RawBackend
    tls: RawBackend

    def exchange(self, client: ssl.SSLContext, data: bytes) -> tuple[bytes, bytes, bytes]:
        port = self.proxy.ports.https
        received = bytearray()
        with socket.create_connection((LOOPBACK, port), timeout=30) as raw:
            with client.wrap_socket(raw, server_hostname=SERVER_NAME) as connection:
                connection.sendall(data)
                try:
                    while chunk := connection.recv(1 << 16):
                        received += chunk
                except (ssl.SSLEOFError, ConnectionResetError):
                    pass
        decrypted = re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: DATE", bytes(received))
        return decrypted, self.plain.take(port), self.tls.take(port)


def _mapped_extensions(pid: int) -> set[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {name for name in ("_pump", "_http1_heads") if f"/{name}.cpython" in maps}


@pytest.fixture(scope="module")
def wire_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def sides(zoo: BackendZoo, wire_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Side]]:
    ca = wire_ca
    backend_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("backend.test").configure_cert(backend_tls)
    made: dict[str, Side] = {}
    servers = []
    for name, env in (("compiled", {"INGRESS_PROXY_PURE": "0"}), ("pure", {"INGRESS_PROXY_PURE": "1"})):
        directory = tmp_path_factory.mktemp(f"{name}-proxy")
        plain, tls = RawBackend(), RawBackend(backend_tls)
        servers += [zoo.run(plain.start()), zoo.run(tls.start())]
        ca_file = directory / "backend-ca.pem"
        ca_file.write_bytes(ca.cert_pem.bytes())
        certificate = write_certificate(ca, directory, "front", SERVER_NAME)
        ports = Ports()
        backends = {"plain": [f"{LOOPBACK}:{plain.port}"], "tls": [f"{LOOPBACK}:{tls.port}"]}
        document = routes_document(ports, backends, [("/r", "plain"), ("/t", "tls")], [certificate.entry()], RIG_TIMEOUTS)
        document["backends"]["tls"].update({"protocol": "https", "tls": {"ca": str(ca_file), "server_name": "backend.test"}})
        made[name] = Side(ProxyProcess(directory, ports, document, env=env), plain, tls)
    yield made
    for name in ("compiled", "pure"):
        proxy = made[name].proxy
        assert proxy.stop() == 0, proxy.stderr()[-3000:]
        assert proxy.tracebacks() == [], proxy.stderr()[-5000:]
    for server in servers:
        zoo.loop.call_soon_threadsafe(server.close)


@pytest.fixture(scope="module")
def client(wire_ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    wire_ca.configure_trust(context)
    return context


def test_each_proxy_runs_the_path_it_was_asked_for(sides: dict[str, Side]) -> None:
    assert _mapped_extensions(sides["compiled"].proxy.process.pid) == {"_pump", "_http1_heads"}
    assert _mapped_extensions(sides["pure"].proxy.process.pid) == set()


_EXTRA_HEADERS = st.lists(
    st.sampled_from([
        b"Connection: keep-alive, X-Secret\r\nX-Secret: s\r\n",
        b"X-Forwarded-For: 192.0.2.7\r\n",
        b"x-forwarded-proto: spoofed\r\n",
        b"Accept: */*\r\n",
        b"User-Agent: differential\r\n",
        b"Upgrade: h2c\r\n",
        b"TE: trailers\r\n",
        b"Expect: 100-continue\r\n",
    ]),
    max_size=3,
).map(b"".join)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"HEAD", b"POST"]))
    prefix = draw(st.sampled_from([b"/r", b"/t"]))
    target = prefix + b"/%d" % draw(st.integers(0, len(RESPONSES) - 1))
    body = b""
    if method == b"POST":
        body = draw(st.sampled_from([b"", b"p", b"q" * BIG]))
    head = method + b" " + target + b" HTTP/1.1\r\nHost: " + SERVER_NAME.encode() + b"\r\n" + draw(_EXTRA_HEADERS)
    if method == b"POST":
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


_CLOSING = b"GET /r/0 HTTP/1.1\r\nHost: " + SERVER_NAME.encode() + b"\r\nConnection: close\r\n\r\n"


def _compare(sides: dict[str, Side], client: ssl.SSLContext, data: bytes) -> None:
    compiled_wires = sides["compiled"].exchange(client, data)
    pure_wires = sides["pure"].exchange(client, data)
    assert compiled_wires[0].startswith(b"HTTP/1.1 "), compiled_wires[0][:200]
    assert compiled_wires[0] == pure_wires[0], "the client side differs"
    assert compiled_wires[1:] == pure_wires[1:], "the backend side differs"


def test_one_of_everything(sides: dict[str, Side], client: ssl.SSLContext) -> None:
    host = SERVER_NAME.encode()
    data = b"".join(
        b"%s %s HTTP/1.1\r\nHost: %s\r\n%s\r\n%s" % (method, target, host, extra, body)
        for method, target, extra, body in [
            (b"GET", b"/r/1", b"Connection: X-Secret\r\nX-Secret: 1\r\n", b""),
            (b"POST", b"/t/2", b"Content-Length: %d\r\n" % BIG, b"q" * BIG),
            (b"HEAD", b"/t/2", b"", b""),
            (b"GET", b"/r/3", b"", b""),
            (b"GET", b"/t/4", b"", b""),
            (b"GET", b"/t/5", b"", b""),
        ]
    ) + _CLOSING
    _compare(sides, client, data)


@settings(max_examples=40, deadline=None)
@given(exchange=st.lists(requests(), min_size=1, max_size=4))
def test_compiled_and_pure_proxies_put_the_same_bytes_on_both_wires(sides: dict[str, Side], client: ssl.SSLContext, exchange: list[bytes]) -> None:
    _compare(sides, client, b"".join(exchange) + _CLOSING)
