"""The decisions of an exchange as pure functions: failure kinds, retries, response plans.

Kept apart from the code that moves bytes so that each is a table test (tests/unit/test_decisions.py)
and so that every protocol shell decides the same way.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from proxy.http1 import RequestHead, ResponseHead

if TYPE_CHECKING:
    from config.model import Address, BackendProtocol, Configuration
    from proxy.router import RouteMatch

IDEMPOTENT_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))


class FailureKind(enum.Enum):
    """Why a backend attempt failed; `label` is the metric label, `status` what the client gets."""

    NO_ENDPOINT = ("no endpoint", 502)
    CONNECT_FAILED = ("connect failed", 502)
    CONNECT_TIMEOUT = ("connect timeout", 504)
    RESET = ("reset", 502)  # closed or reset before any response byte
    BAD_RESPONSE = ("bad response", 502)
    RESPONSE_TIMEOUT = ("response timeout", 504)
    RESET_WHILE_SENDING = ("reset while sending", 502)
    BACKEND_NOT_READING = ("backend not reading", 504)
    CUT_MID_BODY = ("cut mid-body", 502)  # after the head went out: only the connection can be cut
    # TLS to the backend (issue 12): every one is a 502, and none falls back to plaintext.
    TLS_UNTRUSTED = ("tls untrusted", 502)  # the chain does not lead to the configured CA
    TLS_NAME_MISMATCH = ("tls name mismatch", 502)  # the certificate is not for the name we expect
    TLS_EXPIRED = ("tls certificate expired", 502)  # or not yet valid
    TLS_HANDSHAKE_FAILED = ("tls handshake failed", 502)  # no common version/cipher, alert, not TLS at all
    TLS_HANDSHAKE_TIMEOUT = ("tls handshake timeout", 502)
    TLS_FAILED = ("tls failed", 502)  # after the handshake, e.g. TLS 1.3 "certificate required"
    TLS_NOT_CONFIGURED = ("tls not configured", 502)  # its context could not be built (a Problem says why)
    REFUSED_STREAM = ("refused stream", 502)  # HTTP/2 backend: not processed (RFC 9113 §8.7), any method may retry

    def __init__(self, label: str, status: int) -> None:
        self.label = label
        self.status = status

    @property
    def request_never_sent(self) -> bool:
        return self in _NEVER_SENT


_NEVER_SENT = frozenset(
    (
        FailureKind.CONNECT_FAILED,
        FailureKind.CONNECT_TIMEOUT,
        FailureKind.TLS_UNTRUSTED,
        FailureKind.TLS_NAME_MISMATCH,
        FailureKind.TLS_EXPIRED,
        FailureKind.TLS_HANDSHAKE_FAILED,
        FailureKind.TLS_HANDSHAKE_TIMEOUT,
        FailureKind.TLS_NOT_CONFIGURED,
        FailureKind.REFUSED_STREAM,
    )
)

# OpenSSL's X509_V_ERR_* codes (x509_vfy.h) that name a cause a user can act on.
_VERIFY_RESULT_KINDS = {
    2: FailureKind.TLS_UNTRUSTED,  # UNABLE_TO_GET_ISSUER_CERT
    18: FailureKind.TLS_UNTRUSTED,  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: FailureKind.TLS_UNTRUSTED,  # SELF_SIGNED_CERT_IN_CHAIN
    20: FailureKind.TLS_UNTRUSTED,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: FailureKind.TLS_UNTRUSTED,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    27: FailureKind.TLS_UNTRUSTED,  # CERT_UNTRUSTED
    9: FailureKind.TLS_EXPIRED,  # CERT_NOT_YET_VALID
    10: FailureKind.TLS_EXPIRED,  # CERT_HAS_EXPIRED
    62: FailureKind.TLS_NAME_MISMATCH,  # HOSTNAME_MISMATCH
    64: FailureKind.TLS_NAME_MISMATCH,  # IP_ADDRESS_MISMATCH
}


def tls_failure_kind(verify_result: int) -> FailureKind:
    """A failed backend handshake, by OpenSSL's verify result (0 = the chain was not the cause)."""
    return _VERIFY_RESULT_KINDS.get(verify_result, FailureKind.TLS_HANDSHAKE_FAILED)


class Retry(enum.Enum):
    SAME_ENDPOINT = "same endpoint"  # a fresh connection to it: the pooled one had gone stale
    NEXT_ENDPOINT = "next endpoint"
    STOP = "stop"  # answer the client with the failure


def is_replayable(head: RequestHead) -> bool:
    """Safe to send twice: idempotent and without a body (a body is streamed once, not kept)."""
    return head.method in IDEMPOTENT_METHODS and not head.has_body


def retry_after(kind: FailureKind, reused_connection: bool, replayable: bool) -> Retry:
    """What to do after a failed attempt, before any response byte went to the client.

    A reset on a reused keep-alive connection is the backend's idle timeout racing our request:
    try the same endpoint again on a new connection. A request that was never sent may go to the
    next endpoint whatever it is; one that may have reached the backend only when replayable, and
    never after a response timeout (the backend may still be working on it)."""
    if kind.request_never_sent:
        return Retry.NEXT_ENDPOINT
    if not replayable or kind is FailureKind.RESPONSE_TIMEOUT:
        return Retry.STOP
    if reused_connection and kind is FailureKind.RESET:
        return Retry.SAME_ENDPOINT
    return Retry.NEXT_ENDPOINT


@dataclass(frozen=True, slots=True)
class Http1ResponsePlan:
    tunnel: bool  # 101 to an upgrade request: bytes flow both ways afterwards
    rechunk: bool  # the body goes to the client chunked (backend sent chunked or read-until-close)
    keep_alive: bool  # the client connection may carry another request after this response


def plan_http1_response(request: RequestHead, response: ResponseHead, draining: bool) -> Http1ResponsePlan:
    tunnel = response.status == 101 and request.upgrade
    unframed = response.has_body and response.content_length is None
    rechunk = unframed and request.version == "1.1"
    keep_alive = (
        not tunnel
        and not (unframed and not rechunk)  # an HTTP/1.0 client reads such a body until we close
        and not (request.upgrade and response.status != 101)  # the client may already send tunnel bytes
        and not draining
    )
    return Http1ResponsePlan(tunnel, rechunk, keep_alive)


def http1_connection_continues(request: RequestHead, exchange_keeps: bool, draining: bool) -> bool:
    """After answering `request`: may the HTTP/1.1 connection read the next one?"""
    return exchange_keeps and request.keep_alive and request.version == "1.1" and not draining


class RouteOutcome(enum.Enum):
    """What a routed request becomes: a local answer (by kind), or a forward (by kind of backend).

    The one routing decision of both request paths (`route_outcome`): the general path
    (`exchange.exchange`) dispatches on it, the fast path (`proxy.fast_path`) takes HTTP1_PLAIN
    alone, so a kind of request added here is the general path's until someone makes it plain."""

    GRPC_OVER_HTTP1 = "grpc over http/1.1"  # 426: gRPC needs HTTP/2 end to end
    REDIRECT_TO_HTTPS = "redirect to https"  # 308 on a plaintext listener
    CERTIFICATE_REFUSED = "client certificate refused"  # the host's client-auth answer (400/421/302)
    NOT_FOUND = "not found"  # 404: no host or path matched and no default backend
    POLICY = "policy"  # the route's policy answers or shapes the forward (its own 503 when empty)
    NO_ENDPOINTS = "no endpoints"  # 503
    HTTP2_BACKEND = "http/2 backend"  # multiplexed: h2 or gRPC endpoints
    HTTP1_BACKEND = "http/1.1 backend"  # with headers to vouch for: a trusted X-Forwarded-For's or a client certificate's
    HTTP1_PLAIN = "plain http/1.1 backend"  # nothing to judge or vouch for: the fast path's


class Backends(Protocol):
    """What `route_outcome` reads of the balancer (proxy.balancer.Balancer), without moving its cursor."""

    def protocol(self, backend: str) -> BackendProtocol: ...

    def has_endpoints(self, backend: str) -> bool: ...


def route_outcome(
    match: RouteMatch,
    configuration: Configuration,
    tls_listener: bool,
    http2_client: bool,
    grpc: bool,
    certificate_refused: bool,
    backends: Backends,
) -> RouteOutcome:
    """The outcome of one request. Reads only: the caller takes the endpoints of a forward
    (`Balancer.candidates`, which moves the round-robin cursor) once it serves it, so a path that
    declines (the fast path, for any outcome but HTTP1_PLAIN) leaves the cursor where it was.

    `certificate_refused`: the client-certificate answer of a host with client auth was a refusal
    (`exchange._client_certificate`). The fast path never judges certificates and passes False: a
    client-auth host is HTTP1_BACKEND at best, never HTTP1_PLAIN. The order is the precedence: a
    gRPC request over HTTP/1.1 is refused before a redirect, a redirect before a certificate."""
    virtual_host = match.virtual_host
    if grpc and not http2_client:
        return RouteOutcome.GRPC_OVER_HTTP1
    if virtual_host is not None and virtual_host.redirect_to_https and not tls_listener:
        return RouteOutcome.REDIRECT_TO_HTTPS
    if certificate_refused:
        return RouteOutcome.CERTIFICATE_REFUSED
    backend = match.backend
    if backend is None:
        return RouteOutcome.NOT_FOUND
    if match.policy is not None:
        return RouteOutcome.POLICY
    if not backends.has_endpoints(backend):
        return RouteOutcome.NO_ENDPOINTS
    if backends.protocol(backend).multiplexed:
        return RouteOutcome.HTTP2_BACKEND
    if configuration.real_ip is not None or (virtual_host is not None and virtual_host.client_auth is not None):
        return RouteOutcome.HTTP1_BACKEND
    return RouteOutcome.HTTP1_PLAIN
