"""Table tests of the exchange's pure decisions (proxy/decisions.py)."""

from __future__ import annotations

import pytest

from proxy.decisions import (
    FailureKind,
    Retry,
    http1_connection_continues,
    is_replayable,
    plan_http1_response,
    retry_after,
    tls_failure_kind,
)
from proxy.http1 import RequestHead, ResponseHead


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
