"""Which path serves a request (proxy.fast_path): the counters prove that the fast run is fast and
the `INGRESS_PROXY_FAST_PATH=0` run general; each hand-over case still gets the general path's
answer, and pipelined requests through both paths come back in order."""

from __future__ import annotations

import ipaddress

import trustme
from prometheus_client import REGISTRY

from config.model import (
    Address,
    Backend,
    ClientAuth,
    ClientVerify,
    Configuration,
    PathRule,
    PathType,
    RealIp,
    RoutePolicy,
    RouteTable,
    Timeouts,
    VirtualHost,
)
from proxy import fast_path
from proxy.flow import ConnectionGone
from tests.conftest import simple_configuration
from tests.e2e.helpers import closed_by_peer, open_raw, read_response


def counts() -> tuple[int, ...]:
    return tuple(
        int(REGISTRY.get_sample_value("ingress_proxy_fast_path_requests_total", {"outcome": outcome}) or 0)
        for outcome in ("served", "handed_over", "routed_general")
    )


def configuration(backend: Address, **settings: object):
    return simple_configuration({"app": [backend]}, {"": [("/", PathType.PREFIX, "app")]}, **settings)


async def test_keep_alive_requests_take_the_path_the_switch_chose(start_proxy, start_backend):
    backend = await start_backend()
    proxy = await start_proxy(configuration(backend.address))
    reader, writer = await open_raw(proxy.http_port)
    before = counts()
    for number in range(5):
        writer.write(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % number)
        status, _, body = await read_response(reader)
        assert status == 200 and b'"/%d"' % number in body
    served, handed_over, routed_general = (now - then for now, then in zip(counts(), before))
    if fast_path.ENABLED:
        # The first request finds no idle backend connection (the general path opens one); the
        # other four reuse it on the fast path.
        assert (served, handed_over, routed_general) == (4, 0, 1)
    else:
        assert (served, handed_over, routed_general) == (0, 0, 0)
    writer.close()


async def test_pipelined_requests_through_both_paths_stay_in_order(start_proxy, start_backend):
    backend = await start_backend()
    proxy = await start_proxy(configuration(backend.address))
    reader, writer = await open_raw(proxy.http_port)
    writer.write(b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    writer.write(
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"  # general: chunked
        b"POST /3 HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nwxyz"  # fast: a small buffered body
        b"GET /stream/100000 HTTP/1.1\r\nHost: x\r\n\r\n"  # sent fast, handed over: a chunked response
        b"GET /5 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    bodies = [(await read_response(reader))[2] for _ in range(5)]
    assert b'"/1"' in bodies[0] and b'"/2"' in bodies[1] and b'"/3"' in bodies[2] and b'"/5"' in bodies[4]
    assert b'"body_length": 3' in bodies[1] and b'"body_length": 4' in bodies[2]
    assert bodies[3] == b"x" * 100000
    assert [seen["path_qs"] for seen in backend.received] == ["/warm", "/1", "/2", "/3", "/5"]
    writer.close()


async def test_chunked_response_is_handed_over_once_and_relayed(start_proxy, start_backend):
    backend = await start_backend()
    proxy = await start_proxy(configuration(backend.address))
    reader, writer = await open_raw(proxy.http_port)
    writer.write(b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_response(reader)
    before = counts()
    writer.write(b"GET /stream/300000 HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert (status, headers["transfer-encoding"], len(body)) == (200, "chunked", 300000)
    writer.write(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection goes back to the fast path
    assert (await read_response(reader))[0] == 200
    served, handed_over, _ = (now - then for now, then in zip(counts(), before))
    assert (served, handed_over) == ((1, 1) if fast_path.ENABLED else (0, 0))
    writer.close()


async def test_backend_silent_past_its_deadline_gets_504(start_proxy, start_backend):
    backend = await start_backend()
    proxy = await start_proxy(configuration(backend.address, timeouts=Timeouts(backend_response=0.5, drain=2.0)))
    reader, writer = await open_raw(proxy.http_port)
    writer.write(b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_response(reader)
    writer.write(b"GET /slow/3 HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, _ = await read_response(reader, timeout=10)
    assert status == 504
    writer.close()


async def test_idle_fast_connection_is_closed_after_idle(start_proxy, start_backend):
    backend = await start_backend()
    proxy = await start_proxy(configuration(backend.address, timeouts=Timeouts(idle=0.3, drain=2.0)))
    reader, writer = await open_raw(proxy.http_port)
    writer.write(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_response(reader)
    writer.write(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_response(reader)
    assert await closed_by_peer(reader, timeout=10)


async def test_pooled_connection_paused_for_its_last_client_reads_for_the_next(start_proxy, start_backend):
    """Flow control may leave a pooled connection paused (its last client was behind when the
    response ended); the next request on it must read again, whichever path serves it."""
    backend = await start_backend()
    proxy = await start_proxy(configuration(backend.address))
    reader, writer = await open_raw(proxy.http_port)
    writer.write(b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_response(reader)
    (pooled, _), = proxy.server.balancer.pool(backend.address)._idle
    pooled.transport.pause_reading()
    pooled._reading_paused = True
    writer.write(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await read_response(reader, timeout=10)  # the backend_response timeout is 60 s
    assert status == 200 and b'"/next"' in body
    writer.close()


async def test_pooled_connection_that_refuses_the_write_is_retried_on_a_new_one(start_proxy, start_backend):
    """A pooled connection whose write fails (a TLS backend's close_notify racing our request looks
    so) is the general path's reset-on-a-reused-connection: retried once on a fresh connection."""
    backend = await start_backend()
    proxy = await start_proxy(configuration(backend.address))
    reader, writer = await open_raw(proxy.http_port)
    writer.write(b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_response(reader)
    (pooled, _), = proxy.server.balancer.pool(backend.address)._idle

    def refuse(data: bytes) -> None:
        raise ConnectionGone()

    pooled.write = refuse
    writer.write(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await read_response(reader, timeout=10)
    assert status == 200 and b'"/again"' in body
    assert pooled.closed and [seen["path_qs"] for seen in backend.received] == ["/warm", "/again"]
    writer.close()


async def test_requests_with_anything_to_judge_or_vouch_for_never_take_the_fast_path(start_proxy, start_backend):
    """The routing decision both paths share (decisions.route_outcome): only a plain HTTP/1.1
    forward is the fast path's, even with an idle pooled connection waiting for it."""
    backend = await start_backend()
    rule = ("/", PathType.PREFIX, "app")
    hosts = (
        VirtualHost("plain.test", (PathRule(*rule),)),
        VirtualHost("cert.test", (PathRule(*rule),), client_auth=ClientAuth(trustme.CA().cert_pem.bytes(), ClientVerify.OPTIONAL)),
        VirtualHost("policy.test", (PathRule(*rule, RoutePolicy(forwarded_prefix="/p")),)),
        VirtualHost("redirect.test", (PathRule(*rule),), redirect_to_https=True),
    )
    routes = RouteTable(hosts, (Backend("app", (backend.address,)),))
    proxy = await start_proxy(Configuration(routes, timeouts=Timeouts(drain=2.0)))
    trusting = await start_proxy(
        configuration(backend.address, real_ip=RealIp((ipaddress.ip_network("127.0.0.0/8"),)))
    )
    reader, writer = await open_raw(proxy.http_port)
    trusting_reader, trusting_writer = await open_raw(trusting.http_port)
    for warm_reader, warm_writer, host in ((reader, writer, b"plain.test"), (trusting_reader, trusting_writer, b"x")):
        warm_writer.write(b"GET /warm HTTP/1.1\r\nHost: %s\r\n\r\n" % host)  # leaves an idle pooled connection
        assert (await read_response(warm_reader))[0] == 200
    before = counts()
    for request, status in (
        (b"GET /c HTTP/1.1\r\nHost: cert.test\r\n\r\n", 200),  # forwarded with ssl-client-verify: NONE
        (b"GET /p HTTP/1.1\r\nHost: policy.test\r\n\r\n", 200),
        (b"GET /g HTTP/1.1\r\nHost: plain.test\r\nContent-Type: application/grpc\r\n\r\n", 426),
        (b"GET /r HTTP/1.1\r\nHost: redirect.test\r\n\r\n", 308),
    ):
        writer.write(request)
        assert (await read_response(reader))[0] == status
    trusting_writer.write(b"GET /xff HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 192.0.2.7\r\n\r\n")
    assert (await read_response(trusting_reader))[0] == 200
    assert counts() == before, "none of these may be served, sent or routed by the fast path"
    seen = {entry["path_qs"]: {name.lower(): value for name, value in entry["headers"].items()} for entry in backend.received}
    assert seen["/c"].get("ssl-client-verify") == "NONE" and seen["/p"].get("x-forwarded-prefix") == "/p"
    assert seen["/xff"].get("x-real-ip") == "192.0.2.7"
    writer.write(b"GET /plain HTTP/1.1\r\nHost: plain.test\r\n\r\n")  # the control: this one is the fast path's
    assert (await read_response(reader))[0] == 200
    assert counts()[0] - before[0] == (1 if fast_path.ENABLED else 0)
    writer.close()
    trusting_writer.close()
