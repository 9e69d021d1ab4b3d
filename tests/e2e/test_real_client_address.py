"""The PROXY protocol through the real `ingress-proxy serve` process, behind a test L4 client.

The client is what an L4 balancer does: a raw TCP socket that writes a v1 or v2 header and then
carries the client's own stream (TLS with HTTP/1.1 or HTTP/2, or plain HTTP). The backend echoes
the headers it received, so each test sees the address the proxy decided on; an allowlist judges
that address; a listener that requires the header closes a client that does not send one, and a
listener that does not treats a header as a bad ClientHello. The access log (the process's stdout)
names the same decided address, on both request paths and both client protocols, and curl behind
no balancer shows that only a trusted peer's X-Forwarded-For moves it. Last, HAProxy itself (when
installed) sends PROXY v2 in front of us (`send-proxy-v2`).
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import ssl
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
import trustme

from proxy import fast_path
from tests.hostile.backends import BackendZoo
from tests.hostile.proxy_process import LOOPBACK, Ports, ProxyProcess, routes_document, write_certificate
from tests.ports import free_port

pytestmark = pytest.mark.e2e

HOST = "pp.test"
OFFICE = "office.test"  # allowlist: 203.0.113.0/24 only
TIMEOUTS = {"handshake": 2.0, "drain": 2.0}
WAIT = 20.0  # generous: other suites share this machine's two cores
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
FORGED = "6.6.6.6"  # what a client claims in its own X-Forwarded-For: never believed here


def v1(source: str) -> bytes:
    family, destination = ("TCP4", "10.0.0.1") if ipaddress.ip_address(source).version == 4 else ("TCP6", "2001:db8::1")
    return f"PROXY {family} {source} {destination} 40000 443\r\n".encode()


def v2(source: str | None, command: int = 0x21) -> bytes:
    """PROXY v2 with a TLV (AWS NLB sends one like it); `source` None: the LOCAL command."""
    if source is None:
        return V2_SIGNATURE + bytes((0x20, 0x00)) + b"\x00\x00"
    address = ipaddress.ip_address(source)
    destination = ipaddress.ip_address("10.0.0.1" if address.version == 4 else "2001:db8::1")
    tlv = b"\xea" + struct.pack("!H", 9) + b"vpce-0123"
    payload = address.packed + destination.packed + struct.pack("!HH", 40000, 443) + tlv
    return V2_SIGNATURE + bytes((command, 0x11 if address.version == 4 else 0x21)) + struct.pack("!H", len(payload)) + payload


def document(ports: Ports, zoo: BackendZoo, certificate: dict, **top: object) -> dict:
    routes = routes_document(ports, {"app": [str(zoo.app.address)]}, [("/", "app")], [certificate], TIMEOUTS, host=HOST)
    office = {"host": OFFICE, "policy": {"allow_sources": ["203.0.113.0/24"]}, "paths": [{"path": "/", "backend": "app"}]}
    routes["routes"].append(office)
    return {**routes, **top}


@pytest.fixture(scope="module")
def zoo() -> Iterator[BackendZoo]:
    backends = BackendZoo()
    yield backends
    backends.close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def certificate(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_certificate(ca, tmp_path_factory.mktemp("pp-cert"), "pp", HOST, OFFICE).entry()


def running(directory: Path, zoo: BackendZoo, certificate: dict, proxy_protocol: tuple[str, ...], **top: object) -> Iterator[ProxyProcess]:
    ports = Ports()
    proxy = ProxyProcess(directory, ports, document(ports, zoo, certificate, **top), proxy_protocol=proxy_protocol)
    yield proxy
    assert proxy.stop() == 0, proxy.stderr()[-3000:]
    assert proxy.tracebacks() == [], proxy.stderr()[-5000:]


@pytest.fixture(scope="module")
def behind_l4(zoo: BackendZoo, certificate: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """Both listeners require the header; X-Forwarded-For is trusted from 192.0.2.0/24 sources."""
    yield from running(tmp_path_factory.mktemp("pp"), zoo, certificate, ("https", "http"), trusted_proxies=["192.0.2.0/24"])


@pytest.fixture(scope="module")
def exposed(zoo: BackendZoo, certificate: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """Today's default: no listener reads a PROXY header."""
    yield from running(tmp_path_factory.mktemp("plain"), zoo, certificate, ())


# -- the test L4 client -------------------------------------------------------------------------


def tls_client(ca: trustme.CA, alpn: str) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols([alpn])
    return context


def connect(port: int, header: bytes, source: str = LOOPBACK) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout=WAIT, source_address=(source, 0))
    sock.sendall(header)
    return sock


def read_all(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def http1(sock: socket.socket, host: str, forwarded_for: str | None = FORGED, target: str = "/seen") -> tuple[int, dict]:
    extra = f"X-Forwarded-For: {forwarded_for}\r\n" if forwarded_for else ""
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode())
    head, _, body = read_all(sock).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, (json.loads(body)["headers"] if status == 200 else {})


def https1(ca: trustme.CA, port: int, header: bytes, host: str = HOST, **kwargs: str | None) -> tuple[int, dict]:
    with tls_client(ca, "http/1.1").wrap_socket(connect(port, header), server_hostname=host) as sock:
        return http1(sock, host, **kwargs)


def https2(
    ca: trustme.CA, port: int, header: bytes, host: str = HOST, forwarded_for: str = FORGED, target: str = "/seen"
) -> tuple[int, dict]:
    """One HTTP/2 request (with a forged x-forwarded-for by default) on a TLS connection after `header`."""
    with tls_client(ca, "h2").wrap_socket(connect(port, header), server_hostname=host) as sock:
        assert sock.selected_alpn_protocol() == "h2"
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        connection.initiate_connection()
        request = [(":method", "GET"), (":path", target), (":scheme", "https"), (":authority", host), ("x-forwarded-for", forwarded_for)]
        connection.send_headers(1, request, end_stream=True)
        sock.sendall(connection.data_to_send())
        status, body = 0, b""
        while True:
            data = sock.recv(65536)
            assert data, "the proxy closed the HTTP/2 connection before the response ended"
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    connection.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    return status, (json.loads(body)["headers"] if status == 200 else {})
            sock.sendall(connection.data_to_send())


def closed_without_answer(sock: socket.socket) -> bool:
    try:
        return read_all(sock) == b""
    except ConnectionResetError:
        return True


# -- the header's source is the client -----------------------------------------------------------


@pytest.mark.parametrize(("header", "client"), [
    pytest.param(v1("203.0.113.7"), "203.0.113.7", id="v1-ipv4"),
    pytest.param(v1("2001:db8::7"), "2001:db8::7", id="v1-ipv6"),
    pytest.param(v2("203.0.113.7"), "203.0.113.7", id="v2-ipv4"),
    pytest.param(v2("2001:DB8:0::7"), "2001:db8::7", id="v2-ipv6"),
    pytest.param(v2(None), LOOPBACK, id="v2-local"),  # the balancer's own health check: the TCP peer
    pytest.param(b"PROXY UNKNOWN\r\n", LOOPBACK, id="v1-unknown"),
])  # fmt: skip
def test_the_backend_sees_the_headers_source(ca: trustme.CA, behind_l4: ProxyProcess, header: bytes, client: str) -> None:
    status, seen = https1(ca, behind_l4.ports.https, header)
    assert status == 200 and seen["X-Real-IP"] == client
    assert seen["X-Forwarded-For"] == client  # the client's own (forged) chain is replaced


def test_http2_clients_and_the_plain_listener_too(ca: trustme.CA, behind_l4: ProxyProcess) -> None:
    status, seen = https2(ca, behind_l4.ports.https, v2("203.0.113.8"))
    assert status == 200 and seen["X-Real-IP"] == seen["X-Forwarded-For"] == "203.0.113.8"
    with connect(behind_l4.ports.http, v1("2001:db8::8")) as sock:
        status, seen = http1(sock, HOST)
    assert status == 200 and seen["X-Real-IP"] == seen["X-Forwarded-For"] == "2001:db8::8"


@pytest.mark.parametrize("protocol", ["http/1.1", "h2"])
def test_an_allowlist_judges_the_headers_source(ca: trustme.CA, behind_l4: ProxyProcess, protocol: str) -> None:
    request = https1 if protocol == "http/1.1" else https2
    assert request(ca, behind_l4.ports.https, v1("203.0.113.9"), OFFICE)[0] == 200
    assert request(ca, behind_l4.ports.https, v2("198.51.100.9"), OFFICE)[0] == 403
    assert request(ca, behind_l4.ports.https, v2(None), OFFICE)[0] == 403  # LOCAL: the peer, 127.0.0.1


def test_trusted_forwarded_for_applies_on_top_of_the_header(ca: trustme.CA, behind_l4: ProxyProcess) -> None:
    """A PROXY source inside trusted_proxies (an L7 proxy behind the L4 balancer) may name the
    client in X-Forwarded-For; any other source's chain is replaced by that source."""
    status, seen = https1(ca, behind_l4.ports.https, v1("192.0.2.10"), OFFICE, forwarded_for="203.0.113.50")
    assert status == 200 and seen["X-Real-IP"] == seen["X-Forwarded-For"] == "203.0.113.50"
    status, seen = https1(ca, behind_l4.ports.https, v1("198.51.100.10"), HOST, forwarded_for="203.0.113.50")
    assert status == 200 and seen["X-Real-IP"] == seen["X-Forwarded-For"] == "198.51.100.10"


def test_compute_full_forwarded_for_keeps_the_trusted_chain(
    ca: trustme.CA, zoo: BackendZoo, certificate: dict, tmp_path: Path
) -> None:
    for proxy in running(tmp_path, zoo, certificate, ("https",), trusted_proxies=["192.0.2.0/24"], compute_full_forwarded_for=True):
        status, seen = https1(ca, proxy.ports.https, v2("192.0.2.10"), forwarded_for="203.0.113.50, 192.0.2.99")
        assert status == 200 and seen["X-Real-IP"] == "203.0.113.50"
        assert seen["X-Forwarded-For"] == "203.0.113.50, 192.0.2.99, 192.0.2.10"
        status, seen = https2(ca, proxy.ports.https, v2("198.51.100.10"))  # untrusted: replaced, never appended to
        assert status == 200 and seen["X-Real-IP"] == seen["X-Forwarded-For"] == "198.51.100.10"


# -- the access log names the decided client ----------------------------------------------------


def tagged() -> str:
    """A request target no other request of the run has: its access-log line is found by it."""
    return f"/seen?log={uuid.uuid4().hex}"


def logged_client(proxy: ProxyProcess, target: str) -> str:
    """The client field of the one access-log line (text or JSON) for `target` on the proxy's stdout."""
    deadline = time.monotonic() + WAIT  # lines are written in batches, at most 0.1 s after the request
    while True:
        lines = [line for line in proxy.stdout().splitlines() if target in line]
        if lines:
            assert len(lines) == 1, lines
            line = lines[0]
            return str(json.loads(line)["client"]) if line.startswith("{") else line.split(" ", 1)[0]
        assert time.monotonic() < deadline, f"no access-log line for {target}:\n{proxy.stdout()[-2000:]}"
        time.sleep(0.05)


@pytest.mark.parametrize("protocol", ["http/1.1", "h2", "plain"])
def test_the_access_log_names_the_headers_source_not_a_forged_chain(
    ca: trustme.CA, behind_l4: ProxyProcess, protocol: str
) -> None:
    """An untrusted PROXY source's own X-Forwarded-For names someone else: the log, like the
    policy, names the source (the differential case of the next test)."""
    target = tagged()
    if protocol == "plain":
        with connect(behind_l4.ports.http, v1("203.0.113.21")) as sock:
            status, _ = http1(sock, HOST, forwarded_for=FORGED, target=target)
    else:
        request = https1 if protocol == "http/1.1" else https2
        status, _ = request(ca, behind_l4.ports.https, v2("203.0.113.21"), forwarded_for=FORGED, target=target)
    assert status == 200 and logged_client(behind_l4, target) == "203.0.113.21"


@pytest.mark.parametrize("protocol", ["http/1.1", "h2", "plain"])
def test_the_access_log_names_a_trusted_forwarded_for_client(ca: trustme.CA, behind_l4: ProxyProcess, protocol: str) -> None:
    """A PROXY source inside trusted_proxies names the client in X-Forwarded-For: the log names
    that client, the address the allowlist judged (office.test admits 203.0.113.0/24 only)."""
    target = tagged()
    if protocol == "plain":
        with connect(behind_l4.ports.http, v1("192.0.2.10")) as sock:
            status, _ = http1(sock, OFFICE, forwarded_for="203.0.113.51", target=target)
    else:
        request = https1 if protocol == "http/1.1" else https2
        status, _ = request(ca, behind_l4.ports.https, v1("192.0.2.10"), OFFICE, forwarded_for="203.0.113.51", target=target)
    assert status == 200 and logged_client(behind_l4, target) == "203.0.113.51"


def read_one_response(sock: socket.socket) -> int:
    """One Content-Length-framed response off a keep-alive connection; its status."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, "the proxy closed the keep-alive connection"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the proxy closed the keep-alive connection inside a body"
        body += chunk
    return int(lines[0].split(b" ", 2)[1])


def test_the_fast_path_logs_the_headers_source(zoo: BackendZoo, certificate: dict, tmp_path: Path) -> None:
    """Nothing trusted: keep-alive requests after a PROXY header take the fast path (when it is
    on), which logs the connection's own client, here the header's source."""
    for proxy in running(tmp_path, zoo, certificate, ("http",)):
        served_before = proxy.metric("ingress_proxy_fast_path_requests_total", outcome="served")
        targets = [tagged() for _ in range(3)]
        with connect(proxy.ports.http, v2("2001:db8::21")) as sock:
            for target in targets:
                sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\nX-Forwarded-For: {FORGED}\r\n\r\n".encode())
                assert read_one_response(sock) == 200
        assert [logged_client(proxy, target) for target in targets] == ["2001:db8::21"] * 3
        served = proxy.metric("ingress_proxy_fast_path_requests_total", outcome="served") - served_before
        assert served >= 1 if fast_path.ENABLED else served == 0  # the first request opens the backend connection


@pytest.fixture(scope="module")
def curl_ca(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("curl-ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def curl(curl_ca: str, port: int, target: str, version: str, forwarded_for: str) -> str:
    """curl's GET of `target` on the TLS listener with its own X-Forwarded-For; the status it got."""
    url = f"https://{HOST}:{port}{target}"
    command = [
        "curl", "-sS", "--max-time", str(WAIT), "--cacert", curl_ca, "--resolve", f"{HOST}:{port}:{LOOPBACK}", version,
        "-H", f"X-Forwarded-For: {forwarded_for}", "-o", "/dev/null", "-w", "%{http_code}", url,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=WAIT * 2, check=True).stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_curl_behind_no_balancer_only_a_trusted_peer_moves_the_logged_address(
    zoo: BackendZoo, certificate: dict, curl_ca: str, tmp_path: Path, version: str
) -> None:
    """No PROXY header: curl's own X-Forwarded-For names the logged client when its peer address
    (127.0.0.1) is in trusted_proxies, and is ignored when it is not. The JSON log says the same."""
    for trusting in (True, False):
        trusted = ["127.0.0.0/8"] if trusting else ["192.0.2.0/24"]
        directory = tmp_path / ("trusting" if trusting else "untrusting")
        directory.mkdir()
        for proxy in running(directory, zoo, certificate, (), trusted_proxies=trusted, access_log={"json": True}):
            target = tagged()
            assert curl(curl_ca, proxy.ports.https, target, version, "203.0.113.61") == "200"
            assert logged_client(proxy, target) == ("203.0.113.61" if trusting else LOOPBACK)


# -- required or refused -------------------------------------------------------------------------


def test_a_listener_requiring_the_header_closes_a_bare_client(ca: trustme.CA, behind_l4: ProxyProcess) -> None:
    before = behind_l4.metric("ingress_proxy_proxy_header_refusals_total", listener="https")
    with pytest.raises((ssl.SSLError, ConnectionError)):  # refused on the ClientHello's first byte
        https1(ca, behind_l4.ports.https, b"")
    with connect(behind_l4.ports.http, b"GET / HTTP/1.1\r\nHost: pp.test\r\n\r\n") as sock:
        assert closed_without_answer(sock)
    with connect(behind_l4.ports.https, b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 443\n") as sock:  # no CR: malformed
        assert closed_without_answer(sock)
    assert behind_l4.metric("ingress_proxy_proxy_header_refusals_total", listener="https") == before + 2
    assert behind_l4.metric("ingress_proxy_proxy_header_refusals_total", listener="http") >= 1
    assert "requires a PROXY protocol header" in behind_l4.stderr()  # the first refusal, at info


@pytest.mark.parametrize("listener", ["https", "http"])
def test_a_header_must_arrive_within_the_handshake_timeout(behind_l4: ProxyProcess, listener: str) -> None:
    before = behind_l4.metric("ingress_proxy_proxy_header_refusals_total", listener=listener)
    with connect(getattr(behind_l4.ports, listener), v2("203.0.113.7")[:20]) as sock:  # half a header, then silence
        assert closed_without_answer(sock)  # the socket's own timeout (WAIT) is far above the proxy's 2 s
    assert behind_l4.metric("ingress_proxy_proxy_header_refusals_total", listener=listener) == before + 1


PATIENT_HANDSHAKE = 60.0  # far above SOON: a close within SOON cannot be this deadline's
SOON = 10.0  # generous for a loaded two-core machine, yet a sixth of the deadline


@pytest.fixture(scope="module")
def patient(zoo: BackendZoo, certificate: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """Both listeners require the header and wait long for it."""
    timeouts = {**TIMEOUTS, "handshake": PATIENT_HANDSHAKE}
    yield from running(tmp_path_factory.mktemp("patient"), zoo, certificate, ("https", "http"), timeouts=timeouts)


def half_closed(port: int, sent: bytes) -> socket.socket:
    """A client that sends `sent` and then its FIN (it reads on): a balancer or client gone mid-header."""
    sock = connect(port, sent)
    sock.settimeout(SOON)
    sock.shutdown(socket.SHUT_WR)
    return sock


@pytest.mark.parametrize("listener", ["https", "http"])
@pytest.mark.parametrize("sent", [
    pytest.param(v1("203.0.113.7")[:20], id="v1"),
    pytest.param(v2("203.0.113.7")[:20], id="v2"),
    pytest.param(b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 443\r", id="v1-all-but-lf"),
])  # fmt: skip
def test_input_ending_inside_the_header_closes_at_once(patient: ProxyProcess, listener: str, sent: bytes) -> None:
    """A FIN inside the header is refused (and counted) then and there: the socket is closed
    long before the 60 s handshake deadline (a wait for it would raise socket.timeout here)."""
    before = patient.metric("ingress_proxy_proxy_header_refusals_total", listener=listener)
    with half_closed(getattr(patient.ports, listener), sent) as sock:
        assert closed_without_answer(sock)
    assert patient.metric("ingress_proxy_proxy_header_refusals_total", listener=listener) == before + 1


@pytest.mark.parametrize("listener", ["https", "http"])
def test_a_connect_and_close_is_closed_at_once_uncounted(patient: ProxyProcess, listener: str) -> None:
    """A TCP health check (connect, FIN, nothing sent) is no refusal: closed at once, not counted."""
    before = patient.metric("ingress_proxy_proxy_header_refusals_total", listener=listener)
    with half_closed(getattr(patient.ports, listener), b"") as sock:
        assert closed_without_answer(sock)
    assert patient.metric("ingress_proxy_proxy_header_refusals_total", listener=listener) == before


@pytest.mark.parametrize("header", [pytest.param(v1("203.0.113.7"), id="v1"), pytest.param(v2("203.0.113.7"), id="v2")])
def test_a_listener_without_it_treats_a_header_as_a_bad_client_hello(
    ca: trustme.CA, exposed: ProxyProcess, header: bytes
) -> None:
    before = exposed.metric("ingress_proxy_tls_handshake_failures_total")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https1(ca, exposed.ports.https, header)
    assert exposed.metric("ingress_proxy_tls_handshake_failures_total") == before + 1
    status, seen = https1(ca, exposed.ports.https, b"")  # a bare client is served as ever
    assert status == 200 and seen["X-Real-IP"] == seen["X-Forwarded-For"] == LOOPBACK  # its forged chain replaced


# -- HAProxy in front ----------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (make bench installs it)")
def test_haproxy_send_proxy_v2_in_front(ca: trustme.CA, behind_l4: ProxyProcess, tmp_path: Path) -> None:
    """HAProxy in TCP mode forwards the TLS stream with `send-proxy-v2`: the client connects from
    127.0.0.2, HAProxy reaches us from 127.0.0.1, and the backend is told 127.0.0.2."""
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "global\n  maxconn 100\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n"
        f"frontend l4\n  bind {LOOPBACK}:{port}\n  default_backend us\n"
        f"backend us\n  server proxy {LOOPBACK}:{behind_l4.ports.https} send-proxy-v2\n"
    )
    haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                socket.create_connection((LOOPBACK, port), timeout=1).close()
                break
            except OSError:
                assert haproxy.poll() is None and time.monotonic() < deadline, "haproxy did not start"
                time.sleep(0.05)
        target = tagged()
        with tls_client(ca, "http/1.1").wrap_socket(connect(port, b"", source="127.0.0.2"), server_hostname=HOST) as sock:
            status, seen = http1(sock, HOST, target=target)
        assert status == 200 and seen["X-Real-IP"] == seen["X-Forwarded-For"] == "127.0.0.2"
        assert logged_client(behind_l4, target) == "127.0.0.2"  # as HAProxy itself logs the PROXY source
    finally:
        haproxy.terminate()
        haproxy.wait(WAIT)
