"""Per-route policy end to end: curl over HTTP/1.1 and HTTP/2 → the in-process proxy → real
aiohttp backends that record what reached them. The same checks run for both protocols, since the
policy is enforced once, in the exchange, before an endpoint is chosen."""

from __future__ import annotations

import asyncio
import ipaddress
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
from prometheus_client import REGISTRY

from config.model import Affinity, Backend, Canary, Configuration, Cors, HeaderEdits, Hsts, RealIp, PathRule, PathType, Redirect, RoutePolicy, RouteTable, Timeouts, VirtualHost
from tests.conftest import RecordingBackend, RunningProxy, certificate_for

pytestmark = pytest.mark.e2e
P, I = PathType.PREFIX, PathType.IMPLEMENTATION_SPECIFIC
LIMIT = 1000
PROTOCOLS = ["--http1.1", "--http2"]


def networks(*cidrs: str) -> tuple:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


ROUTES = {  # host → (path, type, policy)
    "deny.test": ("/", P, RoutePolicy(allow_sources=networks("10.0.0.0/8"))),
    "allow.test": ("/", P, RoutePolicy(allow_sources=networks("127.0.0.0/8"), deny_sources=networks("10.0.0.0/8"))),
    "denied.test": ("/", P, RoutePolicy(deny_sources=networks("127.0.0.1"))),
    "moved.test": ("/", P, RoutePolicy(redirect=Redirect("https://new.test/", 301))),
    "root.test": ("/", P, RoutePolicy(app_root="/app")),
    "limit.test": ("/", P, RoutePolicy(max_body_size=LIMIT)),
    "api.test": ("/api(/|$)(.*)", I, RoutePolicy(regex=True, rewrite_target="/$2", forwarded_prefix="/api")),
    "edit.test": ("/", P, RoutePolicy(
        upstream_host="internal.test",
        request_headers=HeaderEdits(set=(("X-Env", "prod"),), add=(("X-Trace", "on"),), remove=("Cookie",)),
        response_headers=HeaderEdits(set=(("Cache-Control", "no-store"),), add=(("X-Policy", "yes"),), remove=("Content-Type",)),
    )),
    "slow.test": ("/", P, RoutePolicy(read_timeout=0.5)),
    "cors.test": ("/", P, RoutePolicy(cors=Cors(allow_origins=("https://app.test", "https://*.example.org"), max_age=600))),
    "cors-any.test": ("/", P, RoutePolicy(cors=Cors(allow_credentials=False))),
    "rate.test": ("/", P, RoutePolicy(limit_rps=0.01, limit_burst=2)),  # a token per 100 s: no timing in the test
    "conn.test": ("/", P, RoutePolicy(limit_connections=1)),
    "canary.test": ("/", P, RoutePolicy(canary=Canary("canary", weight=0, header="X-Canary", cookie="canary"))),
    "canary-all.test": ("/", P, RoutePolicy(canary=Canary("canary", weight=100))),
    "canary-value.test": ("/", P, RoutePolicy(canary=Canary("canary", header="X-Group", header_value="beta"))),
    "sticky.test": ("/", P, RoutePolicy(affinity=Affinity("route", max_age=60))),
    "plain.test": ("/", P, None),
}


BACKEND_OF = {"sticky.test": "sticky"}  # three endpoints; every other host: "app", one endpoint


@pytest.fixture
async def policy_proxy(ca: trustme.CA, start_backend, start_proxy) -> tuple[RunningProxy, RecordingBackend]:
    backend = await start_backend("app")
    canary = await start_backend("canary")
    sticky = [await start_backend(f"sticky-{number}") for number in range(3)]
    configuration = Configuration(
        routes=RouteTable(
            virtual_hosts=tuple(
                VirtualHost(host, (PathRule(path, kind, BACKEND_OF.get(host, "app"), policy),))
                for host, (path, kind, policy) in ROUTES.items()
            ),
            backends=(Backend("app", (backend.address,)), Backend("canary", (canary.address,)),
                      Backend("sticky", tuple(backend.address for backend in sticky))),
        ),
        certificates=(certificate_for(ca, *ROUTES),),
        timeouts=Timeouts(drain=2.0),
    )
    return await start_proxy(configuration), backend


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


async def curl(port: int, ca_file: str, protocol: str, host: str, target: str, *options: str, stdin: bytes | None = None) -> dict:
    """One request to the HTTPS listener on `port`; returns status, the response headers
    (lower-cased names), body and curl's figures."""
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", protocol, "--cacert", ca_file, "--resolve", f"{host}:{port}:127.0.0.1", "-D", "-",
        "-w", "\n%{json}", *options, f"https://{host}:{port}{target}",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(stdin), 60)
    assert process.returncode == 0, err
    response, _, figures = out.rpartition(b"\n")
    head, _, body = response.partition(b"\r\n\r\n")
    while head.split(b" ", 2)[1].startswith(b"1"):  # 100 Continue, if any, then the final head
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return {"status": int(lines[0].split()[1]), "headers": headers, "body": body, "curl": json.loads(figures)}


def protocol_label(protocol: str) -> str:
    return "h2" if protocol == "--http2" else "http/1.1"


def header(seen: dict, name: str) -> list[str]:
    """The values the backend saw under `name`, any case (HTTP/2 clients send lower case)."""
    return [value for key, value in seen["headers"].items() if key.lower() == name.lower()]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_source_ranges_answer_403_before_any_backend_is_asked(policy_proxy, ca_file, protocol) -> None:
    proxy, backend = policy_proxy
    assert (await curl(proxy.https_port, ca_file, protocol, "deny.test", "/x"))["status"] == 403
    assert (await curl(proxy.https_port, ca_file, protocol, "denied.test", "/x"))["status"] == 403
    assert backend.received == []
    allowed = await curl(proxy.https_port, ca_file, protocol, "allow.test", "/x")
    assert allowed["status"] == 200 and json.loads(allowed["body"])["path_qs"] == "/x"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_redirects_and_app_root(policy_proxy, ca_file, protocol) -> None:
    proxy, backend = policy_proxy
    moved = await curl(proxy.https_port, ca_file, protocol, "moved.test", "/any/path?q=1")
    assert moved["status"] == 301 and moved["headers"]["location"] == "https://new.test/"
    root = await curl(proxy.https_port, ca_file, protocol, "root.test", "/")
    assert root["status"] == 302 and root["headers"]["location"] == "/app"
    assert backend.received == []
    deeper = await curl(proxy.https_port, ca_file, protocol, "root.test", "/app/page")
    assert deeper["status"] == 200 and json.loads(deeper["body"])["path_qs"] == "/app/page"


def h2_upload(port: int, ca: trustme.CA, host: str, body: bytes, declared: bool) -> tuple[int | None, int | None]:
    """POST `body` over HTTP/2 with the h2 library, in pieces, until the proxy ends the stream;
    returns (response status, RST_STREAM error code or None). curl is not used here: after an
    early answer and RST_STREAM(NO_ERROR) (RFC 9113 §8.1, which nginx and httpd send too) curl 7.88
    may fail before it reports the response (curl/curl#22984, fixed by curl/curl#22987)."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(["h2"])
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname=host) as sock:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        fields = [(":method", "POST"), (":scheme", "https"), (":authority", host), (":path", "/up")]
        if declared:
            fields.append(("content-length", str(len(body))))
        client.send_headers(1, fields)
        status = reset = None
        sent = ended = 0
        while not ended:
            piece = body[sent : sent + 256]
            if piece and client.local_flow_control_window(1) >= len(piece):
                client.send_data(1, piece, end_stream=sent + len(piece) == len(body))
                sent += len(piece)
            sock.sendall(client.data_to_send())
            if sent < len(body) and status is None:
                sock.settimeout(0.05)  # keep sending while nothing came back
            else:
                sock.settimeout(30)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                break
            for event in client.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.StreamEnded):
                    ended = 1
                elif isinstance(event, h2.events.StreamReset):
                    reset, ended = event.error_code, 1
            sock.sendall(client.data_to_send())
        return status, reset


@pytest.mark.parametrize("declared", [True, False])
async def test_http2_body_over_the_limit_gets_413_with_or_without_a_length(policy_proxy, ca, declared) -> None:
    proxy, backend = policy_proxy
    status, reset = await asyncio.to_thread(h2_upload, proxy.https_port, ca, "limit.test", b"x" * (LIMIT * 20), declared)
    assert status == 413 and reset in (None, h2.errors.ErrorCodes.NO_ERROR)
    assert backend.received == []


async def test_body_over_the_limit_gets_413_and_never_reaches_the_backend(policy_proxy, ca_file) -> None:
    proxy, backend = policy_proxy
    protocol = "--http1.1"  # HTTP/2: test_http2_body_over_the_limit_gets_413_with_or_without_a_length
    big, small = b"x" * (LIMIT + 1), b"y" * LIMIT
    declared = await curl(proxy.https_port, ca_file, protocol, "limit.test", "/up", "--data-binary", "@-", stdin=big)
    assert declared["status"] == 413
    unknown_length = await curl(proxy.https_port, ca_file, protocol, "limit.test", "/up", "-T", "-", stdin=big)  # chunked
    assert unknown_length["status"] == 413
    assert backend.received == []
    for protocol in PROTOCOLS:  # under the limit, both protocols, with and without a length
        fits = await curl(proxy.https_port, ca_file, protocol, "limit.test", "/up", "--data-binary", "@-", stdin=small)
        assert fits["status"] == 200 and json.loads(fits["body"])["body_length"] == LIMIT
        fits_unknown = await curl(proxy.https_port, ca_file, protocol, "limit.test", "/up", "-T", "-", stdin=small)
        assert fits_unknown["status"] == 200 and json.loads(fits_unknown["body"])["body_length"] == LIMIT


async def test_expect_100_continue_over_the_limit_is_refused_before_the_body_is_sent(policy_proxy, ca_file) -> None:
    proxy, backend = policy_proxy
    refused = await curl(
        proxy.https_port, ca_file, "--http1.1", "limit.test", "/up", "-H", "Expect: 100-continue", "--expect100-timeout", "30",
        "--data-binary", "@-", stdin=b"z" * 100_000,
    )  # fmt: skip
    assert refused["status"] == 413
    assert refused["curl"]["size_upload"] == 0  # curl waited for 100 Continue, got 413, sent nothing
    assert backend.received == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_regex_rewrite_with_capture_groups_and_forwarded_prefix(policy_proxy, ca_file, protocol) -> None:
    proxy, _ = policy_proxy
    rewritten = await curl(proxy.https_port, ca_file, protocol, "api.test", "/api/users/7?full=1", "-H", "X-Forwarded-Prefix: /evil")
    seen = json.loads(rewritten["body"])
    assert rewritten["status"] == 200 and seen["path_qs"] == "/users/7?full=1"
    assert header(seen, "X-Forwarded-Prefix") == ["/api"]
    assert header(seen, "Host")[0].startswith("api.test")
    bare = json.loads((await curl(proxy.https_port, ca_file, protocol, "api.test", "/API"))["body"])  # case-insensitive, $2 empty
    assert bare["path_qs"] == "/"
    assert (await curl(proxy.https_port, ca_file, protocol, "api.test", "/apix"))["status"] == 404  # (/|$) after /api
    assert (await curl(proxy.https_port, ca_file, protocol, "api.test", "/v1/api/x"))["status"] == 404  # anchored at the start


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_route_without_policy_is_forwarded_untouched(policy_proxy, ca_file, protocol) -> None:
    proxy, _ = policy_proxy
    plain = await curl(proxy.https_port, ca_file, protocol, "plain.test", "/api/x?y=1", "-H", "X-Forwarded-Prefix: /theirs")
    seen = json.loads(plain["body"])
    assert plain["status"] == 200 and seen["path_qs"] == "/api/x?y=1" and header(seen, "X-Forwarded-Prefix") == ["/theirs"]


async def test_the_routes_file_policy_through_the_real_process(ca: trustme.CA, start_backend, tmp_path: Path, ca_file) -> None:
    """`ingress-proxy serve --routes FILE` with `policy:` blocks: the file's spelling reaches the
    data plane (the in-process tests above build the model directly)."""
    from tests.hostile.proxy_process import Ports, ProxyProcess, listen_section, write_certificate

    backend = await start_backend("app")
    certificate = write_certificate(ca, tmp_path, "site", "api.test", "office.test", "limit.test")
    app = {"endpoints": [str(backend.address)]}
    ports = Ports()
    document = {
        "listen": listen_section(ports),
        "tls": {"certificates": [certificate.entry()]},
        "routes": [
            {"host": "api.test", "policy": {"regex": True, "rewrite_target": "/$2", "forwarded_prefix": "/api"},
             "paths": [{"path": "/api(/|$)(.*)", "type": "ImplementationSpecific", "backend": "app"}]},
            {"host": "office.test", "policy": {"allow_sources": ["10.0.0.0/8"]}, "paths": [{"path": "/", "backend": "app"}]},
            {"host": "limit.test", "policy": {"max_body_size": "1k"}, "paths": [{"path": "/", "backend": "app"}]},
        ],
        "backends": {"app": app},
    }  # fmt: skip
    process = await asyncio.to_thread(ProxyProcess, tmp_path, ports, document)
    try:
        port = process.ports.https
        for protocol in PROTOCOLS:
            seen = json.loads((await curl(port, ca_file, protocol, "api.test", "/api/a/b?c=d"))["body"])
            assert seen["path_qs"] == "/a/b?c=d" and header(seen, "X-Forwarded-Prefix") == ["/api"]
            assert (await curl(port, ca_file, protocol, "office.test", "/"))["status"] == 403
        too_big = await curl(port, ca_file, "--http1.1", "limit.test", "/", "--data-binary", "@-", stdin=b"x" * 1025)
        assert too_big["status"] == 413
        assert (await asyncio.to_thread(h2_upload, port, ca, "limit.test", b"x" * 1025, True))[0] == 413
        assert 'ingress_proxy_policy_answers_total{status="403"} 2.0' in process.metrics()
        assert 'ingress_proxy_policy_answers_total{status="413"} 2.0' in process.metrics()
    finally:
        assert await asyncio.to_thread(process.stop) == 0
    assert process.tracebacks() == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_header_edits_and_upstream_vhost(policy_proxy, ca_file, protocol) -> None:
    proxy, _ = policy_proxy
    edited = await curl(
        proxy.https_port, ca_file, protocol, "edit.test", "/e", "-H", "X-Env: dev", "-H", "Cookie: secret=1",
    )  # fmt: skip
    seen = json.loads(edited["body"])
    assert header(seen, "X-Env") == ["prod"] and header(seen, "Cookie") == []
    assert header(seen, "X-Trace") == ["on"]  # (beside a client's copy: tests/unit/test_policy.py, on the wire)
    assert header(seen, "Host") == ["internal.test"]
    assert header(seen, "X-Forwarded-Host")[0].startswith("edit.test")  # what the client asked for
    assert edited["headers"]["cache-control"] == "no-store" and edited["headers"]["x-policy"] == "yes"
    assert "content-type" not in edited["headers"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_route_read_timeout_replaces_the_global_one(policy_proxy, ca_file, protocol) -> None:
    proxy, _ = policy_proxy
    assert (await curl(proxy.https_port, ca_file, protocol, "slow.test", "/slow/5"))["status"] == 504  # global: 60 s
    assert (await curl(proxy.https_port, ca_file, protocol, "plain.test", "/slow/1"))["status"] == 200


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_cors_preflight_is_answered_by_the_proxy_and_responses_carry_the_headers(policy_proxy, ca_file, protocol) -> None:
    proxy, backend = policy_proxy
    preflight = ("-X", "OPTIONS", "-H", "Access-Control-Request-Method: POST")
    answered = await curl(proxy.https_port, ca_file, protocol, "cors.test", "/api", *preflight, "-H", "Origin: https://a.b.example.org")
    assert answered["status"] == 200
    assert answered["headers"]["access-control-allow-origin"] == "https://a.b.example.org"
    assert answered["headers"]["access-control-allow-credentials"] == "true"
    assert answered["headers"]["access-control-max-age"] == "600"
    assert "POST" in answered["headers"]["access-control-allow-methods"]
    refused = await curl(proxy.https_port, ca_file, protocol, "cors.test", "/api", *preflight, "-H", "Origin: https://evil.test")
    assert refused["status"] == 403 and "access-control-allow-origin" not in refused["headers"]
    assert backend.received == []  # preflights never reach the backend
    simple = await curl(proxy.https_port, ca_file, protocol, "cors.test", "/api", "-H", "Origin: https://app.test")
    assert simple["status"] == 200 and simple["headers"]["access-control-allow-origin"] == "https://app.test"
    assert simple["headers"]["vary"] == "Origin"
    foreign = await curl(proxy.https_port, ca_file, protocol, "cors.test", "/api", "-H", "Origin: https://evil.test")
    assert foreign["status"] == 200 and "access-control-allow-origin" not in foreign["headers"]
    anyone = await curl(proxy.https_port, ca_file, protocol, "cors-any.test", "/", "-H", "Origin: https://x.test")
    assert anyone["headers"]["access-control-allow-origin"] == "*" and "access-control-allow-credentials" not in anyone["headers"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_rate_limit_per_client_answers_429_after_the_burst(policy_proxy, ca_file, protocol) -> None:
    proxy, _ = policy_proxy
    statuses = [(await curl(proxy.https_port, ca_file, protocol, "rate.test", "/"))["status"] for _ in range(3)]
    assert statuses == [200, 200, 429]


async def test_connection_limit_per_client_answers_503_while_one_is_in_flight(policy_proxy, ca_file) -> None:
    proxy, _ = policy_proxy
    policy = proxy.server.generation.router.route("conn.test", "/").policy
    assert policy is not None and policy.concurrency is not None
    slow = asyncio.create_task(curl(proxy.https_port, ca_file, "--http2", "conn.test", "/slow/3"))
    async with asyncio.timeout(30):
        while not policy.concurrency.in_flight:  # the first request is in the exchange: no guessing
            await asyncio.sleep(0.01)
    assert (await curl(proxy.https_port, ca_file, "--http1.1", "conn.test", "/"))["status"] == 503
    assert (await slow)["status"] == 200
    assert (await curl(proxy.https_port, ca_file, "--http1.1", "conn.test", "/"))["status"] == 200


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_canary_by_header_cookie_and_weight(policy_proxy, ca_file, protocol) -> None:
    proxy, _ = policy_proxy

    async def served_by(host: str, *options: str) -> str:
        return json.loads((await curl(proxy.https_port, ca_file, protocol, host, "/", *options))["body"])["backend"]

    assert await served_by("canary.test") == "app"  # weight 0
    assert await served_by("canary.test", "-H", "X-Canary: always") == "canary"
    assert await served_by("canary.test", "-H", "X-Canary: never", "-H", "Cookie: canary=always") == "app"  # header first
    assert await served_by("canary.test", "-H", "Cookie: a=1; canary=always") == "canary"
    assert await served_by("canary.test", "-H", "Cookie: canary=never") == "app"
    assert await served_by("canary-all.test") == "canary"  # weight 100
    assert await served_by("canary-value.test", "-H", "X-Group: beta") == "canary"
    assert await served_by("canary-value.test", "-H", "X-Group: always") == "app"  # with a value, only the value counts
    labels = {"host": "canary-all.test", "backend": "canary", "status": "200", "protocol": protocol_label(protocol)}
    assert REGISTRY.get_sample_value("ingress_proxy_requests_total", labels)  # metrics name the backend that served


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_affinity_cookie_keeps_a_client_on_one_endpoint(policy_proxy, ca_file, protocol) -> None:
    proxy, _ = policy_proxy
    first = await curl(proxy.https_port, ca_file, protocol, "sticky.test", "/")
    cookie = first["headers"]["set-cookie"]
    assert cookie.startswith("route=") and "HttpOnly" in cookie and "Max-Age=60" in cookie
    pair = cookie.split(";")[0]
    served = json.loads(first["body"])["backend"]
    for _ in range(6):  # round-robin would move on to the other two endpoints
        again = await curl(proxy.https_port, ca_file, protocol, "sticky.test", "/", "-H", f"Cookie: {pair}")
        assert json.loads(again["body"])["backend"] == served and "set-cookie" not in again["headers"]
    stale = await curl(proxy.https_port, ca_file, protocol, "sticky.test", "/", "-H", "Cookie: route=0000000000000000")
    assert stale["headers"]["set-cookie"].startswith("route=")  # an endpoint that is gone: re-picked, re-issued
    spread = {json.loads((await curl(proxy.https_port, ca_file, protocol, "sticky.test", "/"))["body"])["backend"] for _ in range(3)}
    assert len(spread) == 3  # without the cookie: balanced as before


async def test_hsts_per_host_overrides_the_configurations(ca: trustme.CA, start_backend, start_proxy, ca_file) -> None:
    backend = await start_backend("app")
    hosts = {"global.test": None, "off.test": False, "own.test": Hsts(max_age=60, include_subdomains=True)}
    configuration = Configuration(
        routes=RouteTable(
            virtual_hosts=tuple(VirtualHost(host, (PathRule("/", P, "app"),), hsts=hsts) for host, hsts in hosts.items()),
            backends=(Backend("app", (backend.address,)),),
        ),
        certificates=(certificate_for(ca, *hosts),),
        hsts=Hsts(max_age=100),
        timeouts=Timeouts(drain=2.0),
    )
    proxy = await start_proxy(configuration)
    for protocol in PROTOCOLS:
        seen = {host: (await curl(proxy.https_port, ca_file, protocol, host, "/"))["headers"] for host in hosts}
        assert seen["global.test"]["strict-transport-security"] == "max-age=100"
        assert "strict-transport-security" not in seen["off.test"]
        assert seen["own.test"]["strict-transport-security"] == "max-age=60; includeSubDomains"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_trusted_x_forwarded_for_gives_the_real_client_address(
    ca: trustme.CA, start_backend, start_proxy, ca_file, protocol
) -> None:
    backend = await start_backend("app")

    async def proxy_trusting(cidr: str) -> RunningProxy:
        office = RoutePolicy(allow_sources=networks("10.0.0.0/8"))
        return await start_proxy(Configuration(
            routes=RouteTable(
                virtual_hosts=(VirtualHost("office.test", (PathRule("/", P, "app", office),)),
                               VirtualHost("plain.test", (PathRule("/", P, "app"),))),
                backends=(Backend("app", (backend.address,)),),
            ),
            certificates=(certificate_for(ca, "office.test", "plain.test"),),
            timeouts=Timeouts(drain=2.0),
            real_ip=RealIp(networks(cidr)),
        ))  # fmt: skip

    behind_lb = await proxy_trusting("127.0.0.1/32")  # we are the load balancer's backend
    port = behind_lb.https_port
    allowed = await curl(port, ca_file, protocol, "office.test", "/", "-H", "X-Forwarded-For: 10.1.2.3")
    seen = json.loads(allowed["body"])
    assert allowed["status"] == 200 and header(seen, "X-Real-IP") == ["10.1.2.3"]
    assert header(seen, "X-Forwarded-For") == ["10.1.2.3"]  # replaced by the client found (compute-full: off)
    assert (await curl(port, ca_file, protocol, "office.test", "/"))["status"] == 403  # the peer itself is not in 10/8

    exposed = await proxy_trusting("192.0.2.0/24")  # clients reach us directly: their header is not believed
    forged = await curl(exposed.https_port, ca_file, protocol, "office.test", "/", "-H", "X-Forwarded-For: 10.1.2.3")
    assert forged["status"] == 403
    plain = json.loads((await curl(exposed.https_port, ca_file, protocol, "plain.test", "/", "-H", "X-Forwarded-For: 10.1.2.3"))["body"])
    assert header(plain, "X-Forwarded-For") == ["127.0.0.1"] and header(plain, "X-Real-IP") == ["127.0.0.1"]  # replaced
