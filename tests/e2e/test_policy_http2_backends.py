"""Per-route policy on HTTP/2 backends, end to end: curl over HTTP/1.1 and HTTP/2 → the in-process
proxy → a real h2c server (the `h2` library, server side) that records each request's header block
and answers with headers of its own; and one gRPC call (grpcio both ends) whose metadata a policy
edits. The HTTP/1.1-backend side of the same policies is tests/e2e/test_route_policy.py; that both
kinds of backend get the same shaped request is tests/unit/test_policy.py's table."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
import trustme
from prometheus_client import REGISTRY

from config.model import (
    Address, Affinity, Backend, BackendProtocol, Configuration, Cors, HeaderEdits, PathRule, PathType, RoutePolicy, RouteTable,
    Timeouts, VirtualHost,
)  # fmt: skip
from tests.conftest import LOOPBACK, RunningProxy, certificate_for
from tests.e2e.test_grpc_backends import SERVICE, _start_server, open_channel  # noqa: F401 (open_channel: a fixture)
from tests.e2e.test_route_policy import PROTOCOLS, curl

pytestmark = pytest.mark.e2e
P, I = PathType.PREFIX, PathType.IMPLEMENTATION_SPECIFIC
LIMIT = 1000

ROUTES = {  # host → (path, type, policy)
    "api.test": ("/api(/|$)(.*)", I, RoutePolicy(regex=True, rewrite_target="/$2", forwarded_prefix="/api")),
    "edit.test": ("/", P, RoutePolicy(
        upstream_host="internal.test",
        request_headers=HeaderEdits(set=(("X-Env", "prod"),), add=(("X-Trace", "on"),), remove=("Cookie",)),
        response_headers=HeaderEdits(set=(("Cache-Control", "no-store"),), add=(("X-Policy", "yes"),), remove=("Content-Type",)),
    )),
    "cors.test": ("/", P, RoutePolicy(cors=Cors(allow_origins=("https://app.test",)))),
    "limit.test": ("/", P, RoutePolicy(max_body_size=LIMIT)),
    "sticky.test": ("/", P, RoutePolicy(affinity=Affinity("route"))),
    "plain.test": ("/", P, None),
}  # fmt: skip


class RecordingH2c(asyncio.Protocol):
    """An h2c endpoint: records each complete request's header block in `seen` (an incomplete one,
    reset by the proxy, is never recorded) and answers JSON of it, with Content-Type and
    Cache-Control the policy may edit."""

    def __init__(self, name: str, seen: list[dict]) -> None:
        self.name = name
        self.seen = seen

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.requests: dict[int, tuple[list, int]] = {}
        transport.write(self.h2.data_to_send())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.requests[event.stream_id] = (list(event.headers), 0)
            elif isinstance(event, h2.events.DataReceived):
                fields, size = self.requests[event.stream_id]
                self.requests[event.stream_id] = (fields, size + len(event.data))
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.requests.pop(event.stream_id, None)
            elif isinstance(event, h2.events.StreamEnded):
                fields, size = self.requests.pop(event.stream_id)
                record = {"endpoint": self.name, "fields": fields, "body_size": size}
                self.seen.append(record)
                reply = json.dumps(record).encode()
                self.h2.send_headers(event.stream_id, [
                    (":status", "200"), ("content-type", "application/json"), ("cache-control", "public"),
                    ("content-length", str(len(reply))),
                ])  # fmt: skip
                self.h2.send_data(event.stream_id, reply, end_stream=True)
        self.transport.write(self.h2.data_to_send())  # type: ignore[attr-defined]


def values(record: dict, name: str) -> list[str]:
    return [value for key, value in record["fields"] if key == name]


@pytest.fixture
async def h2c_proxy(ca: trustme.CA, start_proxy) -> AsyncIterator[tuple[RunningProxy, list[dict]]]:
    seen: list[dict] = []
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(lambda name=f"h2c-{n}": RecordingH2c(name, seen), LOOPBACK, 0) for n in range(3)]
    addresses = tuple(Address(LOOPBACK, server.sockets[0].getsockname()[1]) for server in servers)
    configuration = Configuration(
        routes=RouteTable(
            virtual_hosts=tuple(
                VirtualHost(host, (PathRule(path, kind, "sticky" if host == "sticky.test" else "one", policy),))
                for host, (path, kind, policy) in ROUTES.items()
            ),
            backends=(Backend("one", addresses[:1], BackendProtocol.H2C), Backend("sticky", addresses, BackendProtocol.H2C)),
        ),
        certificates=(certificate_for(ca, *ROUTES),),
        timeouts=Timeouts(drain=2.0),
    )
    try:
        yield await start_proxy(configuration), seen
    finally:
        for server in servers:
            server.close()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_rewrite_target_and_forwarded_prefix_reach_an_h2c_backend(h2c_proxy, ca_file, protocol) -> None:
    proxy, _ = h2c_proxy
    answer = await curl(proxy.https_port, ca_file, protocol, "api.test", "/api/users/7?full=1", "-H", "X-Forwarded-Prefix: /forged")
    record = json.loads(answer["body"])
    assert values(record, ":path") == ["/users/7?full=1"]
    assert values(record, "x-forwarded-prefix") == ["/api"]  # the client's copy replaced


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_header_edits_and_upstream_vhost_on_an_h2c_backend(h2c_proxy, ca_file, protocol) -> None:
    proxy, _ = h2c_proxy
    answer = await curl(proxy.https_port, ca_file, protocol, "edit.test", "/e", "-H", "X-Env: dev", "-H", "Cookie: secret=1")
    record = json.loads(answer["body"])
    assert values(record, ":authority") == ["internal.test"]
    assert values(record, "x-forwarded-host")[0].startswith("edit.test")  # what the client asked for
    assert values(record, "x-env") == ["prod"] and values(record, "cookie") == [] and values(record, "x-trace") == ["on"]
    assert answer["headers"]["cache-control"] == "no-store" and answer["headers"]["x-policy"] == "yes"
    assert "content-type" not in answer["headers"]
    untouched = await curl(proxy.https_port, ca_file, protocol, "plain.test", "/e", "-H", "Cookie: secret=1")
    assert untouched["headers"]["cache-control"] == "public" and untouched["headers"]["content-type"] == "application/json"
    assert values(json.loads(untouched["body"]), "cookie") == ["secret=1"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_cors_headers_on_responses_of_an_h2c_backend(h2c_proxy, ca_file, protocol) -> None:
    proxy, _ = h2c_proxy
    allowed = await curl(proxy.https_port, ca_file, protocol, "cors.test", "/", "-H", "Origin: https://app.test")
    assert allowed["headers"]["access-control-allow-origin"] == "https://app.test"
    other = await curl(proxy.https_port, ca_file, protocol, "cors.test", "/", "-H", "Origin: https://evil.test")
    assert "access-control-allow-origin" not in other["headers"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_affinity_cookie_is_issued_and_honoured_for_an_h2c_backend(h2c_proxy, ca_file, protocol) -> None:
    proxy, _ = h2c_proxy
    first = await curl(proxy.https_port, ca_file, protocol, "sticky.test", "/")
    pair = first["headers"]["set-cookie"].split(";")[0]
    assert pair.startswith("route=")
    served = json.loads(first["body"])["endpoint"]
    for _ in range(4):  # round-robin would move on to the other endpoints
        again = await curl(proxy.https_port, ca_file, protocol, "sticky.test", "/", "-H", f"Cookie: {pair}")
        assert json.loads(again["body"])["endpoint"] == served and "set-cookie" not in again["headers"]


async def test_a_body_of_unknown_length_over_the_limit_gets_413_and_never_completes_upstream(h2c_proxy, ca_file) -> None:
    proxy, seen = h2c_proxy
    before = REGISTRY.get_sample_value("ingress_proxy_policy_answers_total", {"status": "413"}) or 0
    chunked = await curl(proxy.https_port, ca_file, "--http1.1", "limit.test", "/up", "-T", "-", stdin=b"x" * (LIMIT * 20))
    assert chunked["status"] == 413
    assert seen == []  # the backend saw a stream reset part-way, never a whole request
    assert REGISTRY.get_sample_value("ingress_proxy_policy_answers_total", {"status": "413"}) == before + 1
    small = await curl(proxy.https_port, ca_file, "--http1.1", "limit.test", "/up", "-T", "-", stdin=b"y" * LIMIT)
    assert small["status"] == 200 and json.loads(small["body"])["body_size"] == LIMIT


async def test_grpc_metadata_is_edited_by_the_routes_policy(ca: trustme.CA, start_proxy, open_channel) -> None:
    server, backend = _start_server()
    try:
        policy = RoutePolicy(request_headers=HeaderEdits(set=(("x-tenant", "blue"),), remove=("x-secret",)))
        routes = RouteTable(
            (VirtualHost("grpc.test", (PathRule("/", P, "grpc", policy),)),), (Backend("grpc", (backend.address,), BackendProtocol.H2C),)
        )
        proxy = await start_proxy(Configuration(routes=routes, certificates=(certificate_for(ca, "grpc.test"),), timeouts=Timeouts(drain=2.0)))
        call = open_channel(proxy.https_port).unary_unary(f"/{SERVICE}/Unary")
        metadata = (("x-tenant", "red"), ("x-secret", "s"), ("x-kept", "k"))
        assert await asyncio.to_thread(call, b"hi", timeout=20, metadata=metadata) == b"echo:hi"
        seen = backend.recorder.metadata
        assert seen["x-tenant"] == "blue" and "x-secret" not in seen and seen["x-kept"] == "k"
    finally:
        server.stop(grace=None)
