"""Table tests of the exchange's pure decisions (proxy/decisions.py)."""

from __future__ import annotations

import ipaddress

import pytest

from config.model import (
    Address,
    Backend,
    BackendProtocol,
    ClientAuth,
    Configuration,
    PathRule,
    PathType,
    RealIp,
    RouteTable,
    RoutePolicy,
    VirtualHost,
)
from proxy.balancer import Balancer
from proxy.decisions import (
    FailureKind,
    Retry,
    RouteOutcome,
    http1_connection_continues,
    is_replayable,
    plan_http1_response,
    retry_after,
    route_outcome,
    tls_failure_kind,
)
from proxy.http1 import RequestHead, ResponseHead
from proxy.policy import CompiledPolicy
from proxy.router import RouteMatch


def request(method: bytes = b"GET", version: str = "1.1", body: bool = False, upgrade: bool = False, keep: bool = True) -> RequestHead:
    return RequestHead(method, b"/", version, (), b"h", keep, upgrade, False, 3 if body else None)


def response(status: int = 200, length: int | None = 2, has_body: bool = True) -> ResponseHead:
    return ResponseHead(status, b"OK", "1.1", (), True, length is None and has_body, length, has_body)


@pytest.mark.parametrize(
    ("kind", "reused", "replayable", "expected"),
    [
        (FailureKind.CONNECT_FAILED, False, False, Retry.NEXT_ENDPOINT),  # never sent: any request moves on
        (FailureKind.CONNECT_TIMEOUT, False, True, Retry.NEXT_ENDPOINT),
        (FailureKind.RESET, True, True, Retry.SAME_ENDPOINT),  # stale keep-alive connection
        (FailureKind.RESET, False, True, Retry.NEXT_ENDPOINT),
        (FailureKind.RESET, True, False, Retry.STOP),  # a POST may have reached the backend
        (FailureKind.BAD_RESPONSE, True, True, Retry.NEXT_ENDPOINT),
        (FailureKind.RESPONSE_TIMEOUT, False, True, Retry.STOP),  # the backend may still be working on it
        (FailureKind.RESET_WHILE_SENDING, False, False, Retry.STOP),
        (FailureKind.BACKEND_NOT_READING, False, False, Retry.STOP),
        (FailureKind.TLS_UNTRUSTED, False, False, Retry.NEXT_ENDPOINT),  # the handshake failed: nothing was sent
        (FailureKind.TLS_HANDSHAKE_TIMEOUT, False, False, Retry.NEXT_ENDPOINT),
        (FailureKind.TLS_NOT_CONFIGURED, False, False, Retry.NEXT_ENDPOINT),
        (FailureKind.TLS_FAILED, False, False, Retry.STOP),  # after the handshake: the POST may have arrived
        (FailureKind.TLS_FAILED, True, True, Retry.NEXT_ENDPOINT),
        (FailureKind.REFUSED_STREAM, False, False, Retry.NEXT_ENDPOINT),  # HTTP/2: never processed, even a POST
    ],
)
def test_retry_after(kind: FailureKind, reused: bool, replayable: bool, expected: Retry) -> None:
    assert retry_after(kind, reused, replayable) is expected


@pytest.mark.parametrize(
    ("kind", "status"),
    [(FailureKind.CONNECT_FAILED, 502), (FailureKind.CONNECT_TIMEOUT, 504), (FailureKind.RESPONSE_TIMEOUT, 504),
     (FailureKind.BAD_RESPONSE, 502), (FailureKind.NO_ENDPOINT, 502), (FailureKind.BACKEND_NOT_READING, 504)],
)  # fmt: skip
def test_failure_statuses(kind: FailureKind, status: int) -> None:
    assert kind.status == status


@pytest.mark.parametrize(
    ("head", "replayable"),
    [(request(b"GET"), True), (request(b"PUT"), True), (request(b"POST"), False), (request(b"GET", body=True), False)],
)
def test_is_replayable(head: RequestHead, replayable: bool) -> None:
    assert is_replayable(head) is replayable


@pytest.mark.parametrize(
    ("head", "answer", "draining", "plan"),
    [
        (request(), response(), False, (False, False, True)),
        (request(), response(length=None), False, (False, True, True)),  # chunked or until-close: re-chunked
        (request(version="1.0"), response(length=None), False, (False, False, False)),  # 1.0 reads until we close
        (request(upgrade=True), response(101, None, False), False, (True, False, False)),
        (request(upgrade=True), response(200), False, (False, False, False)),  # tunnel bytes may follow
        (request(), response(204, None, False), False, (False, False, True)),
        (request(), response(), True, (False, False, False)),
    ],
)
def test_plan_http1_response(head: RequestHead, answer: ResponseHead, draining: bool, plan: tuple[bool, bool, bool]) -> None:
    decided = plan_http1_response(head, answer, draining)
    assert (decided.tunnel, decided.rechunk, decided.keep_alive) == plan


@pytest.mark.parametrize(
    ("head", "keeps", "draining", "continues"),
    [(request(), True, False, True), (request(keep=False), True, False, False), (request(version="1.0"), True, False, False),
     (request(), False, False, False), (request(), True, True, False)],
)  # fmt: skip
def test_http1_connection_continues(head: RequestHead, keeps: bool, draining: bool, continues: bool) -> None:
    assert http1_connection_continues(head, keeps, draining) is continues


@pytest.mark.parametrize(
    ("verify_result", "expected"),
    [
        (0, FailureKind.TLS_HANDSHAKE_FAILED),  # the chain was fine (or not checked): alert, no common cipher...
        (20, FailureKind.TLS_UNTRUSTED),  # unable to get local issuer certificate: another CA signed it
        (19, FailureKind.TLS_UNTRUSTED),  # self-signed certificate in chain
        (18, FailureKind.TLS_UNTRUSTED),  # a self-signed leaf
        (21, FailureKind.TLS_UNTRUSTED),
        (10, FailureKind.TLS_EXPIRED),
        (9, FailureKind.TLS_EXPIRED),  # not yet valid
        (62, FailureKind.TLS_NAME_MISMATCH),  # hostname mismatch
        (64, FailureKind.TLS_NAME_MISMATCH),  # IP address mismatch
        (7, FailureKind.TLS_HANDSHAKE_FAILED),  # certificate signature failure: no more specific label
    ],
)
def test_tls_failure_kind(verify_result: int, expected: FailureKind) -> None:
    assert tls_failure_kind(verify_result) is expected
    assert expected.status == 502


_RULE = PathRule("/", PathType.PREFIX, "app")
_PLAIN_HOST = VirtualHost("a.test", (_RULE,))
_REDIRECTING_HOST = VirtualHost("r.test", (_RULE,), redirect_to_https=True)
_CLIENT_AUTH_HOST = VirtualHost("c.test", (_RULE,), client_auth=ClientAuth(b"(a CA bundle)"))
_POLICY = CompiledPolicy(PathRule("/", PathType.PREFIX, "app", RoutePolicy(rewrite_target="/x")))
_PLAIN = Configuration(RouteTable((), ()))
_TRUSTED_XFF = Configuration(RouteTable((), ()), real_ip=RealIp((ipaddress.ip_network("10.0.0.0/8"),)))


def _backends() -> Balancer:
    balancer = Balancer()
    endpoint = (Address("127.0.0.1", 8080),)
    balancer.set_backends(
        (Backend("app", endpoint), Backend("empty", ()), Backend("grpc", endpoint, BackendProtocol.H2C))
    )
    return balancer


_ROUTE_OUTCOMES = [  # (match, configuration, TLS listener, HTTP/2 client, gRPC, certificate refused) → outcome
    (RouteMatch(_PLAIN_HOST, "app"), _PLAIN, True, False, False, False, RouteOutcome.HTTP1_PLAIN),
    (RouteMatch(None, "app"), _PLAIN, False, False, False, False, RouteOutcome.HTTP1_PLAIN),  # the default backend
    (RouteMatch(_PLAIN_HOST, "app"), _PLAIN, True, True, False, False, RouteOutcome.HTTP1_PLAIN),  # an h2 client too
    (RouteMatch(_PLAIN_HOST, "app"), _TRUSTED_XFF, True, False, False, False, RouteOutcome.HTTP1_BACKEND),
    (RouteMatch(_CLIENT_AUTH_HOST, "app"), _PLAIN, True, False, False, False, RouteOutcome.HTTP1_BACKEND),
    (RouteMatch(_CLIENT_AUTH_HOST, "app"), _PLAIN, True, False, False, True, RouteOutcome.CERTIFICATE_REFUSED),
    (RouteMatch(_CLIENT_AUTH_HOST, None), _PLAIN, True, False, False, True, RouteOutcome.CERTIFICATE_REFUSED),  # before 404
    (RouteMatch(_PLAIN_HOST, "app"), _PLAIN, True, False, True, False, RouteOutcome.GRPC_OVER_HTTP1),
    (RouteMatch(_REDIRECTING_HOST, None), _PLAIN, False, False, True, True, RouteOutcome.GRPC_OVER_HTTP1),  # first of all
    (RouteMatch(_PLAIN_HOST, "grpc"), _PLAIN, True, True, True, False, RouteOutcome.HTTP2_BACKEND),
    (RouteMatch(_PLAIN_HOST, "grpc"), _TRUSTED_XFF, True, False, False, False, RouteOutcome.HTTP2_BACKEND),
    (RouteMatch(_REDIRECTING_HOST, "app"), _PLAIN, False, False, False, False, RouteOutcome.REDIRECT_TO_HTTPS),
    (RouteMatch(_REDIRECTING_HOST, "app"), _PLAIN, False, False, False, True, RouteOutcome.REDIRECT_TO_HTTPS),
    (RouteMatch(_REDIRECTING_HOST, "app"), _PLAIN, True, False, False, False, RouteOutcome.HTTP1_PLAIN),  # already HTTPS
    (RouteMatch(_PLAIN_HOST, None), _PLAIN, True, False, False, False, RouteOutcome.NOT_FOUND),
    (RouteMatch(None, None), _TRUSTED_XFF, True, False, False, False, RouteOutcome.NOT_FOUND),
    (RouteMatch(_PLAIN_HOST, "app", _POLICY), _PLAIN, True, False, False, False, RouteOutcome.POLICY),
    (RouteMatch(_PLAIN_HOST, "empty", _POLICY), _PLAIN, True, False, False, False, RouteOutcome.POLICY),  # its own 503
    (RouteMatch(_PLAIN_HOST, "empty"), _PLAIN, True, False, False, False, RouteOutcome.NO_ENDPOINTS),
    (RouteMatch(_PLAIN_HOST, "unknown"), _PLAIN, True, False, False, False, RouteOutcome.NO_ENDPOINTS),
    (RouteMatch(_CLIENT_AUTH_HOST, "empty"), _PLAIN, True, False, False, False, RouteOutcome.NO_ENDPOINTS),
]


@pytest.mark.parametrize(("match", "configuration", "tls", "http2_client", "grpc", "refused", "outcome"), _ROUTE_OUTCOMES)
def test_route_outcome(
    match: RouteMatch, configuration: Configuration, tls: bool, http2_client: bool, grpc: bool, refused: bool,
    outcome: RouteOutcome,
) -> None:  # fmt: skip
    backends = _backends()
    assert route_outcome(match, configuration, tls, http2_client, grpc, refused, backends) is outcome
    assert backends._cursor == {}, "deciding must not move the round-robin cursor: the path that serves it does"


def test_every_outcome_has_a_row() -> None:
    assert {row[-1] for row in _ROUTE_OUTCOMES} == set(RouteOutcome)
