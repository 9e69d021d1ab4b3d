"""HTTP/2 end to end: curl --http2, nghttp, h2load and the h2 library against the real proxy,
with real aiohttp backends behind it (requests go to them as HTTP/1.1)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trustme

from config.model import Address, PathType
from tests.conftest import RecordingBackend, RunningProxy, certificate_for, simple_configuration

pytestmark = pytest.mark.e2e
HOST = "h2.test"


@pytest.fixture
async def h2_proxy(ca: trustme.CA, start_backend, start_proxy) -> tuple[RunningProxy, RecordingBackend]:
    backend = await start_backend("b1")
    configuration = simple_configuration(
        {"app": [backend.address]},
        {HOST: [("/", PathType.PREFIX, "app")], "": [("/", PathType.PREFIX, "app")]},  # "": nghttp/h2load by IP
        (certificate_for(ca, HOST),),
    )
    return await start_proxy(configuration), backend


def _ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


async def _run(*command: str) -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out, err


async def test_curl_negotiates_h2_and_reaches_the_backend_as_http1(h2_proxy, ca, tmp_path) -> None:
    proxy, backend = h2_proxy
    port = proxy.https_port
    code, out, err = await _run(
        "curl", "-sS", "--http2", "--cacert", _ca_file(ca, tmp_path), "--resolve", f"{HOST}:{port}:127.0.0.1",
        "-w", "\n%{http_version}", "-H", "X-Test: yes", f"https://{HOST}:{port}/hello?x=1",
    )  # fmt: skip
    assert code == 0, err
    body, _, version = out.rpartition(b"\n")
    assert version == b"2"
    seen = json.loads(body)
    assert seen["path_qs"] == "/hello?x=1" and seen["method"] == "GET"
    headers = {name.lower(): value for name, value in seen["headers"].items()}  # HTTP/2 names are lower-case
    assert headers["host"] == f"{HOST}:{port}" and headers["x-test"] == "yes"
    assert headers["x-forwarded-proto"] == "https"


async def test_curl_http1_still_served_on_the_same_listener(h2_proxy, ca, tmp_path) -> None:
    proxy, _ = h2_proxy
    port = proxy.https_port
    code, out, err = await _run(
        "curl", "-sS", "--http1.1", "--cacert", _ca_file(ca, tmp_path), "--resolve", f"{HOST}:{port}:127.0.0.1",
        "-w", "\n%{http_version}", f"https://{HOST}:{port}/one",
    )  # fmt: skip
    assert code == 0, err
    assert out.rpartition(b"\n")[2] == b"1.1"


async def test_curl_uploads_a_body_over_h2(h2_proxy, ca, tmp_path) -> None:
    proxy, backend = h2_proxy
    port = proxy.https_port
    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"u" * 300_000)  # several windows' worth: windows reopen as bytes are forwarded
    code, out, err = await _run(
        "curl", "-sS", "--http2", "--cacert", _ca_file(ca, tmp_path), "--resolve", f"{HOST}:{port}:127.0.0.1",
        "--data-binary", f"@{upload}", f"https://{HOST}:{port}/sink",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["received"] == 300_000


async def test_large_response_streams_over_h2(h2_proxy, ca, tmp_path) -> None:
    proxy, _ = h2_proxy
    port = proxy.https_port
    code, out, err = await _run(
        "curl", "-sS", "--http2", "--cacert", _ca_file(ca, tmp_path), "--resolve", f"{HOST}:{port}:127.0.0.1",
        f"https://{HOST}:{port}/stream/{5 * 1024 * 1024}",
    )  # fmt: skip
    assert code == 0, err
    assert out == b"x" * (5 * 1024 * 1024)


async def test_nghttp_many_streams_on_one_connection(h2_proxy) -> None:
    proxy, backend = h2_proxy
    port = proxy.https_port
    urls = [f"https://127.0.0.1:{port}/n/{n}" for n in range(20)]
    code, out, err = await _run("nghttp", "-n", "-s", "-m", "1", *urls)
    assert code == 0, (out, err)
    assert {seen["path_qs"] for seen in backend.received} == {f"/n/{n}" for n in range(20)}


async def test_h2load_all_requests_succeed(h2_proxy) -> None:
    proxy, _ = h2_proxy
    code, out, err = await _run("h2load", "-n", "400", "-c", "4", "-m", "16", f"https://127.0.0.1:{proxy.https_port}/load")
    assert code == 0, err
    assert b"400 succeeded, 0 failed, 0 errored" in out and b"400 2xx" in out, out


def _h2_client(port: int) -> tuple[ssl.SSLSocket, h2.connection.H2Connection]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname=HOST)
    assert sock.selected_alpn_protocol() == "h2"
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    sock.sendall(client.data_to_send())
    return sock, client


def _until(sock: ssl.SSLSocket, client: h2.connection.H2Connection, done) -> list[h2.events.Event]:
    seen: list[h2.events.Event] = []
    while not done(seen):
        data = sock.recv(65536)
        if not data:
            break
        seen += client.receive_data(data)
        sock.sendall(client.data_to_send())
    return seen


async def test_rapid_reset_flood_gets_goaway_enhance_your_calm(h2_proxy) -> None:
    proxy, _ = h2_proxy

    def attack() -> list[h2.events.Event]:
        sock, client = _h2_client(proxy.https_port)
        with sock:
            headers = [(":method", "GET"), (":scheme", "https"), (":authority", HOST), (":path", "/slow")]
            for stream_id in range(1, 2 * 400, 2):
                client.send_headers(stream_id, headers, end_stream=True)
                client.reset_stream(stream_id)
            sock.sendall(client.data_to_send())
            return _until(sock, client, lambda seen: any(isinstance(e, h2.events.ConnectionTerminated) for e in seen))

    events = await asyncio.to_thread(attack)
    (terminated,) = [event for event in events if isinstance(event, h2.events.ConnectionTerminated)]
    assert terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


async def test_mixed_h1_and_h2_clients_with_sni(h2_proxy) -> None:
    proxy, backend = h2_proxy

    def both() -> tuple[bytes, int]:
        sock, client = _h2_client(proxy.https_port)
        with sock:
            client.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", HOST), (":path", "/via-h2")], end_stream=True)
            sock.sendall(client.data_to_send())
            events = _until(sock, client, lambda seen: any(isinstance(e, h2.events.StreamEnded) for e in seen))
            body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
            status = [dict(e.headers)[b":status"] for e in events if isinstance(e, h2.events.ResponseReceived)][0]
        plain = ssl.create_default_context()
        plain.check_hostname = False
        plain.verify_mode = ssl.CERT_NONE
        with plain.wrap_socket(socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10), server_hostname=HOST) as h1:
            h1.sendall(f"GET /via-h1 HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while piece := h1.recv(65536):
                answer += piece
        return status + body, int(answer[9:12])

    h2_answer, h1_status = await asyncio.to_thread(both)
    assert h2_answer.startswith(b"200") and b"/via-h2" in h2_answer and h1_status == 200
    assert [seen["path_qs"] for seen in backend.received] == ["/via-h2", "/via-h1"]


def _frames_until_goaway(sock: ssl.SSLSocket) -> list:  # type: ignore[type-arg]
    return _read_frames(sock, lambda frames: any(type(frame).__name__ == "GoAwayFrame" for frame in frames))


def _raw_h2(port: int) -> ssl.SSLSocket:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname=HOST)
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # preface + SETTINGS
    return sock


async def test_continuation_flood_gets_goaway(h2_proxy) -> None:
    """CVE-2024-27316: endless CONTINUATION frames without END_HEADERS must not be buffered."""
    from hyperframe.frame import ContinuationFrame, HeadersFrame

    proxy, _ = h2_proxy

    def attack() -> list[object]:
        with _raw_h2(proxy.https_port) as sock:
            sock.sendall(HeadersFrame(1, data=b"\x82", flags=[]).serialize())  # no END_HEADERS
            piece = ContinuationFrame(1, data=b"\x40\x03abc\x03def" * 1000, flags=[]).serialize()
            try:
                for _ in range(200):  # 2.2 MB of header block if nothing stopped us
                    sock.sendall(piece)
            except (ConnectionError, ssl.SSLError):
                pass
            return _frames_until_goaway(sock)

    frames = await asyncio.to_thread(attack)
    goaway = frames[-1]
    assert type(goaway).__name__ == "GoAwayFrame"
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM  # type: ignore[attr-defined]


async def test_ping_flood_from_a_peer_that_never_reads_gets_goaway(h2_proxy) -> None:
    from hyperframe.frame import PingFrame

    proxy, _ = h2_proxy

    def attack() -> list[object]:
        with _raw_h2(proxy.https_port) as sock:
            ping = PingFrame(0, opaque_data=b"12345678").serialize() * 500
            try:
                for _ in range(40):  # 20,000 PINGs, never reading the ACKs
                    sock.sendall(ping)
            except (ConnectionError, ssl.SSLError):
                pass
            return _frames_until_goaway(sock)

    frames = await asyncio.to_thread(attack)
    goaways = [frame for frame in frames if type(frame).__name__ == "GoAwayFrame"]
    assert goaways and goaways[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM  # type: ignore[attr-defined]


def _read_frames(sock: ssl.SSLSocket, done, seconds: float = 20.0) -> list:  # type: ignore[type-arg]
    """Raw frames from the proxy until `done(frames)` or close (hyperframe, independent of our core)."""
    from hyperframe.frame import Frame

    sock.settimeout(seconds)
    buffer, frames = b"", []
    try:
        while not done(frames):
            data = sock.recv(65536)
            if not data:
                break
            buffer += data
            while len(buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
                if len(buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(buffer[9 : 9 + length]))
                buffer = buffer[9 + length :]
                frames.append(frame)
    except (TimeoutError, ConnectionError, ssl.SSLError):
        pass
    return frames


def _request_frame(stream_id: int, path: str) -> bytes:
    import hpack
    from hyperframe.frame import HeadersFrame

    block = hpack.Encoder().encode([(":method", "GET"), (":scheme", "https"), (":authority", HOST), (":path", path)])
    return HeadersFrame(stream_id, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()


async def test_zero_window_reader_is_reset_after_idle(ca, start_backend, start_proxy) -> None:
    """A client that never opens its window: the stream holds at most the watermark, then is reset."""
    from hyperframe.frame import DataFrame, RstStreamFrame, SettingsFrame

    from config.model import Timeouts

    backend = await start_backend("b1")
    configuration = simple_configuration(
        {"app": [backend.address]}, {"": [("/", PathType.PREFIX, "app")]}, (certificate_for(ca, HOST),),
        timeouts=Timeouts(idle=1.0, drain=2.0),
    )  # fmt: skip
    proxy = await start_proxy(configuration)

    def stall() -> list:  # type: ignore[type-arg]
        with _raw_h2(proxy.https_port) as sock:
            zero_window = SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0}).serialize()
            sock.sendall(zero_window + _request_frame(1, f"/stream/{50 * 1024 * 1024}"))
            return _read_frames(sock, lambda frames: any(type(f) is RstStreamFrame for f in frames))

    frames = await asyncio.to_thread(stall)
    resets = [frame for frame in frames if type(frame) is RstStreamFrame]
    assert resets and resets[0].error_code == h2.errors.ErrorCodes.CANCEL
    assert not any(type(frame) is DataFrame and frame.data for frame in frames)  # the window stayed shut


async def test_drain_sends_goaway_and_lets_the_stream_in_flight_finish(h2_proxy) -> None:
    from hyperframe.frame import DataFrame, GoAwayFrame

    proxy, _ = h2_proxy
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()

    def slow_request() -> list:  # type: ignore[type-arg]
        with _raw_h2(proxy.https_port) as sock:
            sock.sendall(_request_frame(1, "/slow/1"))
            loop.call_soon_threadsafe(ready.set)
            return _read_frames(sock, lambda frames: any("END_STREAM" in f.flags for f in frames if type(f) is DataFrame))

    request = asyncio.create_task(asyncio.to_thread(slow_request))
    await ready.wait()
    await asyncio.sleep(0.3)  # the stream is at the backend now
    proxy.stop.set()
    frames = await request
    goaways = [frame for frame in frames if type(frame) is GoAwayFrame]
    assert goaways and goaways[0].error_code == h2.errors.ErrorCodes.NO_ERROR and goaways[0].last_stream_id == 1
    body = b"".join(frame.data for frame in frames if type(frame) is DataFrame)
    assert body == b"late" and frames.index(goaways[0]) < len(frames) - 1  # the response came after the GOAWAY
