"""One request, whatever protocol it came in on: route → backend (with retries) → response → metrics.

Theory of operation
-------------------
A protocol shell (HTTP/1.1 in `downstream`, an HTTP/2 stream in `http2_session`) parses a request
head into a `RequestHead` and calls `exchange(client, state, head)`. The exchange reads the
*current* generation once and keeps it to the end, routes, answers locally (redirect, 404, 503) or
borrows a keep-alive connection to an endpoint (or opens one), streams the request body to it, and
relays the response back through the `ClientSide` interface: the shell turns response heads and
body pieces into its own framing (HTTP/1.1 chunks or lengths, HTTP/2 frames) and owns write
coalescing, flow control and timers of its connection. The decisions (failure kinds, retries,
HTTP/1.1 response plan) are pure functions in `proxy.decisions`.

Requests go to backends as HTTP/1.1 (`http1.upstream_request_head` re-derives the head from the
parsed values: the framing is ours), over TCP or, for a backend whose protocol uses TLS, over TLS
set up by its prebuilt transport (`proxy.upstream_tls`; a TLS failure is a 502 with its own metric
label, never a plaintext retry). HTTP/2 backends (h2c, h2) get one stream per request on a pooled
connection (`_proxy_http2`, `proxy.upstream_http2`): the request body is pumped beside the
response, trailers pass both ways, a gRPC request's `grpc-timeout` bounds the exchange, and errors
the proxy makes on a gRPC request are gRPC-shaped (`_answer`). A gRPC request over HTTP/1.1 is
refused with 426: gRPC cannot live without HTTP/2's trailers. A failure before any response byte was read is
retried per `decisions.retry_after`; once a response head went to the client, a backend failure
can only cut the client's response (`ClientSide.abort_response`).

Timeouts: each wait for the client's body is bounded by `idle`, each wait for the backend by
`backend_response`; 1xx interim responses never extend the latter.

Per-route policy (`proxy.policy`) runs after routing and before an endpoint is chosen, only when
the matched rule has one (`match.policy is not None`): it may answer locally (403, a redirect,
413), rewrite the head that goes upstream and bound a body of unknown length while it streams —
for HTTP/1.1 and HTTP/2 backends alike (one shaping step, written as either kind of head).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import random
import time
from typing import Protocol

from h2 import exceptions as h2_exceptions
from h2.errors import ErrorCodes

from config.model import Address, ClientAuth, Hsts, Timeouts, VirtualHost
from proxy import client_auth, metrics, policy as route_policy
from proxy.access_log import ACCESS_LOG
from proxy.client_auth import ClientVerification
from proxy.decisions import FailureKind, Retry, RouteOutcome, is_replayable, retry_after, route_outcome
from proxy.flow import ConnectionGone
from proxy.http1 import LAST_CHUNK, Body, EndOfMessage, Headers, PeerError, RequestHead, ResponseHead, encode_chunk
from proxy.http1 import upstream_request_head
from proxy.serving import Generation, Listener, ServingState
from proxy.upstream import UpstreamConnection, connect
from proxy.upstream_http2 import (
    GRPC_DEADLINE_EXCEEDED,
    ResponseStarted,
    ResponseTrailers,
    StreamReset,
    UpstreamStream,
    grpc_error_head,
    grpc_status_for,
    grpc_timeout,
    is_grpc,
    request_fields,
    response_head,
)
from proxy.upstream_tls import UpstreamTlsFailure, UpstreamTransport

LOG = logging.getLogger("ingress_proxy")


class HttpDate:
    """The Date header value, formatted once per second."""

    second = 0
    value = b""

    @classmethod
    def now(cls) -> bytes:
        second = int(time.time())
        if second != cls.second:
            cls.second = second
            cls.value = email.utils.formatdate(second, usegmt=True).encode("ascii")
        return cls.value


class BackendFailed(Exception):
    def __init__(self, kind: FailureKind) -> None:
        super().__init__(kind.label)
        self.kind = kind


class ClientFailed(Exception):
    """The client broke off or sent a bad body while we were forwarding its request."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class ClientSide(Protocol):
    """What an exchange needs from the connection (or stream) its request arrived on."""

    listener: Listener
    client_ip: bytes
    protocol: str  # "http/1.1" or "h2": metrics label and access log
    closed: bool  # the client is gone: stop relaying
    upstream: UpstreamConnection | None  # the backend connection in use, closed if the client goes
    client_verification: ClientVerification | None  # the handshake's client certificate (client auth hosts)
    request_trailers: Headers  # trailers that ended the request body (HTTP/2), else ()

    async def next_body_event(self, timeout: float) -> Body | EndOfMessage:
        """The next piece of the request body; raises PeerError, ConnectionGone or TimeoutError."""

    def invite_body(self, head: RequestHead) -> None:
        """The request is about to be forwarded: answer `Expect: 100-continue` where it applies."""

    def flush(self) -> None:
        """We are about to wait for the backend: send what is queued."""

    def backlog(self) -> int:
        """Response bytes the client has not taken yet: the backend is not read while it is high."""

    @property
    def write_blocked(self) -> bool:
        """The client's transport is full: wait with `writable()` before reading the backend on."""

    async def writable(self) -> None:
        """Wait until the client takes bytes again (bounded by `idle`; ConnectionGone after)."""

    def answer_locally(self, head: RequestHead, status: int, extra: bytes, body: bytes = b"") -> bool:
        """A response the proxy makes (`extra`: header lines, `body`: a text other than the
        status's); True if the connection may go on."""

    def send_interim(self, head: RequestHead, response: ResponseHead) -> None: ...

    def start_response(self, head: RequestHead, response: ResponseHead, extra: bytes) -> tuple[bool, bool]:
        """Send the final response head; (it opens a tunnel, the connection may go on after)."""

    def send_body(self, data: bytes) -> None: ...

    async def body_sent(self) -> None:
        """After `send_body`: wait while the client is behind (flow control, bounded by `idle`)."""

    def end_response(self) -> None: ...

    def send_trailers(self, trailers: Headers) -> None:
        """End the response with trailers (HTTP/2; HTTP/1.1 ends it as `end_response` does)."""

    def abort_response(self) -> None:
        """The backend failed after the head went out: signal a truncated response."""

    async def tunnel(self, upstream: UpstreamConnection) -> None: ...


async def exchange(client: ClientSide, state: ServingState, head: RequestHead) -> bool:
    """Answer one request; True when the client connection may carry another."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    generation = state.generation
    # The decided client: the peer, or a PROXY header's source, or a trusted X-Forwarded-For's hop.
    # Policies judge it and the access log names it; computed here once, nowhere else.
    client_ip, real_ip, forwarded_for = client.client_ip, b"", b""
    if generation.configuration.real_ip is not None:  # trusted X-Forwarded-For (config.model.RealIp)
        real_ip, forwarded_for = route_policy.forwarded_client(generation.configuration.real_ip, client_ip, head)
        client_ip = real_ip
    match = generation.router.route(head.host.decode("latin-1"), head.path)
    virtual_host = match.virtual_host
    host_label = (virtual_host.host or "*") if virtual_host else "-"
    backend = match.backend
    hsts = hsts_header(client.listener, generation, virtual_host)
    grpc = is_grpc(head.headers)
    refusal = None
    if virtual_host is not None and virtual_host.client_auth is not None:
        refusal, head = _client_certificate(client, virtual_host.client_auth, head)
    outcome = route_outcome(
        match, generation.configuration, client.listener.tls, client.protocol == "h2", grpc, refusal is not None, state.balancer
    )
    if outcome is RouteOutcome.HTTP1_PLAIN or outcome is RouteOutcome.HTTP1_BACKEND:
        assert backend is not None
        status, keep = await _proxy(
            client, state, head, backend, state.balancer.candidates(backend), generation.configuration.timeouts, hsts,
            real_ip=real_ip, forwarded_for=forwarded_for,
        )  # fmt: skip
    elif outcome is RouteOutcome.HTTP2_BACKEND:
        assert backend is not None
        status, keep = await _proxy_http2(
            client, state, head, backend, state.balancer.candidates(backend), generation.configuration.timeouts, hsts, grpc,
            real_ip=real_ip, forwarded_for=forwarded_for,
        )  # fmt: skip
    elif outcome is RouteOutcome.POLICY:
        assert backend is not None and match.policy is not None
        if match.policy.canary is not None:  # chosen here so that metrics and the access log name it
            backend = route_policy.chosen_backend(match.policy, backend, head, random.random())
        status, keep = await _proxy_with_policy(
            client, state, head, backend, match.policy, generation, hsts, client_ip, real_ip, forwarded_for, grpc
        )
    elif outcome is RouteOutcome.GRPC_OVER_HTTP1:
        status = 426
        keep = client.answer_locally(head, status, _GRPC_OVER_HTTP1 + hsts)
    elif outcome is RouteOutcome.REDIRECT_TO_HTTPS:
        status = 308
        keep = client.answer_locally(head, status, _redirect_header(head, state.https_port) + hsts)
    elif outcome is RouteOutcome.CERTIFICATE_REFUSED:
        assert refusal is not None
        status = refusal.status
        keep = client.answer_locally(head, status, refusal.extra + hsts, refusal.body)
    else:
        status = 404 if outcome is RouteOutcome.NOT_FOUND else 503  # NO_ENDPOINTS
        keep = _answer(client, head, status, hsts, grpc)
    record_exchange(client, client_ip, head, generation, host_label, backend, status, loop.time() - started)
    return keep


def record_exchange(
    client: ClientSide,
    client_ip: bytes,
    head: RequestHead,
    generation: Generation,
    host_label: str,
    backend: str | None,
    status: int,
    elapsed: float,
) -> None:
    """The request's metrics and access-log line: one record for every path that answers one.
    `client_ip` is the decided client `exchange` judged (ingress-nginx's `$remote_addr`); the
    paths that route no request with a trusted X-Forwarded-For (`decisions.route_outcome` sends
    those to `exchange`) pass the connection's own, which is then the decided one."""
    backend_label = backend or "-"
    metrics.REQUESTS.record(host_label, backend_label, status, client.protocol, elapsed)
    if ACCESS_LOG.enabled:
        ACCESS_LOG.record(
            (client_ip, client.listener.name, client.protocol, head.host, head.method, head.target, status,
             backend_label, elapsed, generation.configuration.access_log_json)
        )  # fmt: skip


async def proxy_routed(
    client: ClientSide,
    state: ServingState,
    head: RequestHead,
    generation: Generation,
    backend: str,
    host_label: str,
    candidates: list[Address],
    hsts: bytes,
    started: float,
    in_flight: UpstreamConnection | None,
    in_flight_timeout: float,
) -> bool:
    """The rest of `exchange` for a request the fast path (`proxy.fast_path`) routed to a plain
    HTTP/1.1 backend with no policy: `in_flight` is the connection it already sent the request on
    to `candidates[0]` (its events still queued), to wait at most `in_flight_timeout` s more for
    the response head; None if it found no idle one, so the request is still to be sent."""
    timeouts = generation.configuration.timeouts
    status, keep = await _proxy(
        client, state, head, backend, candidates, timeouts, hsts, in_flight=in_flight, in_flight_timeout=in_flight_timeout
    )
    elapsed = asyncio.get_running_loop().time() - started
    record_exchange(client, client.client_ip, head, generation, host_label, backend, status, elapsed)  # HTTP1_PLAIN: nothing trusted
    return keep


async def _proxy_with_policy(
    client: ClientSide,
    state: ServingState,
    head: RequestHead,
    backend: str,
    policy: route_policy.CompiledPolicy,
    generation: Generation,
    hsts: bytes,
    client_ip: bytes,
    real_ip: bytes,
    forwarded_for: bytes,
    grpc: bool,
) -> tuple[int, bool]:
    """The policy's local answer, or the request forwarded as the policy shapes it, to either kind
    of backend (the shaping is `proxy.policy`'s, one step for both). `client_ip` is the address
    policies judge (the peer's or PROXY header's, or the trusted X-Forwarded-For's `real_ip`;
    `forwarded_for`: see `http1.upstream_request_head`)."""
    answer = route_policy.local_answer(policy, client_ip, head)
    if answer is None and policy.rate is not None and not policy.rate.admit(client_ip, time.monotonic()):
        answer = route_policy.TOO_MANY
    concurrency = policy.concurrency
    if answer is None and concurrency is not None and not concurrency.enter(client_ip):
        answer, concurrency = route_policy.BUSY, None
    if answer is not None:
        metrics.POLICY_ANSWERS.labels(str(answer.status)).inc()
        return answer.status, client.answer_locally(head, answer.status, answer.extra + hsts)
    try:
        candidates = state.balancer.candidates(backend)
        if not candidates:
            return 503, _answer(client, head, 503, hsts, grpc)
        carried = None
        if policy.affinity is not None:
            candidates, carried = policy.affinity.order(backend, candidates, head)
        timeouts = policy.route_timeouts(generation.configuration.timeouts)
        if state.balancer.protocol(backend).multiplexed:
            return await _proxy_http2(
                client, state, head, backend, candidates, timeouts, hsts, grpc, policy, carried, real_ip, forwarded_for
            )
        return await _proxy(client, state, head, backend, candidates, timeouts, hsts, policy, carried, real_ip, forwarded_for)
    finally:
        if concurrency is not None:
            concurrency.leave(client_ip)


def _client_certificate(
    client: ClientSide, host_auth: ClientAuth, head: RequestHead
) -> tuple[client_auth.Refusal | None, RequestHead]:
    """A host with client auth: the refusal (400 per its verify mode, 421 on a connection not
    made for it), or the head carrying the certificate's headers (proxy/client_auth.py)."""
    verification = client.client_verification
    if verification is not None:
        answer = verification.answer(host_auth)
    elif client.listener.tls:
        answer = client_auth.MISDIRECTED  # the connection's SNI chose a context without client auth
    else:
        answer = client_auth.plaintext_answer(host_auth)
    if isinstance(answer, client_auth.Refusal):
        return answer, head
    return None, dataclasses.replace(head, vouched=answer)


def hsts_header(listener: Listener, generation: Generation, virtual_host: VirtualHost | None = None) -> bytes:
    """HSTS for responses on a TLS listener when configured (the host's own, else the
    configuration's): on proxied and proxy-made ones alike."""
    hsts = generation.configuration.hsts
    if virtual_host is not None and virtual_host.hsts is not None:
        hsts = virtual_host.hsts or None  # False: none for this host
    if not isinstance(hsts, Hsts) or not listener.tls:
        return b""
    return b"Strict-Transport-Security: %s\r\n" % hsts.header_value().encode()


# gRPC needs HTTP/2 end to end (trailers carry its status): refused clearly, never half-forwarded.
_GRPC_OVER_HTTP1 = b"Upgrade: h2c\r\nGrpc-Status: 14\r\nGrpc-Message: gRPC needs HTTP/2; this request came over HTTP/1.1\r\n"


def _answer(client: ClientSide, head: RequestHead, status: int, hsts: bytes, grpc: bool) -> bool:
    """A proxy-made error: plain, or gRPC-shaped (HTTP 200 + grpc-status) for a gRPC request."""
    if not grpc:
        return client.answer_locally(head, status, hsts)
    _, keep = client.start_response(head, grpc_error_head(grpc_status_for(status), f"ingress-proxy: {status}"), hsts)
    client.end_response()
    return keep


def _attempt_failure(error: Exception, backend: str, address: Address) -> FailureKind:
    """What the exception that ended one backend attempt means, for the retry and the metric."""
    if isinstance(error, BackendFailed | UpstreamTlsFailure):
        if isinstance(error, UpstreamTlsFailure):
            LOG.info("backend %s %s: %s", backend, address, error)
        return error.kind
    if isinstance(error, PeerError):
        return FailureKind.BAD_RESPONSE
    if isinstance(error, TimeoutError):
        return FailureKind.RESPONSE_TIMEOUT
    if isinstance(error, h2_exceptions.H2Error):  # the HTTP/2 backend connection broke under us
        LOG.info("backend %s %s: HTTP/2: %r", backend, address, error)
    return FailureKind.RESET  # closed or reset before any response byte


def _redirect_header(head: RequestHead, https_port: int) -> bytes:
    host = head.host.split(b":")[0] if not head.host.startswith(b"[") else head.host.split(b"]")[0] + b"]"
    authority = host if https_port == 443 else b"%s:%d" % (host, https_port)
    return b"Location: https://%s%s\r\n" % (authority, head.target)


async def _proxy(
    client: ClientSide,
    state: ServingState,
    head: RequestHead,
    backend: str,
    candidates: list[Address],
    timeouts: Timeouts,
    hsts: bytes,
    policy: route_policy.CompiledPolicy | None = None,
    affinity_token: bytes | None = None,
    real_ip: bytes = b"",
    forwarded_for: bytes = b"",
    in_flight: UpstreamConnection | None = None,
    in_flight_timeout: float = 0.0,
) -> tuple[int, bool]:
    """Forward `head` (shaped by the route's `policy`, if any) with retries; relay the answer.

    `in_flight`: the first attempt was already sent on this connection to `candidates[0]` (by the
    fast path, which hands it over once); only its response is read, within `in_flight_timeout`."""
    has_body = head.has_body
    replayable = is_replayable(head)
    if has_body:
        client.invite_body(head)
    listener = client.listener
    if policy is None:
        request = upstream_request_head(
            head, client.client_ip, listener.name.encode(), listener.address, real_ip=real_ip, forwarded_for=forwarded_for
        )
    else:
        request = route_policy.upstream_request(
            policy, head, client.client_ip, listener.name.encode(), listener.address, real_ip, forwarded_for
        )
    balancer = state.balancer
    transport = balancer.transport(backend)
    failure = FailureKind.NO_ENDPOINT
    attempts = list(candidates)
    while attempts:
        address = attempts.pop(0)
        upstream: UpstreamConnection | None
        sent, response_timeout = in_flight is not None, timeouts.backend_response
        if in_flight is not None:  # a pooled connection (reused), like any first attempt of the fast path's
            upstream = client.upstream = in_flight
            in_flight, response_timeout = None, in_flight_timeout
        else:
            upstream = client.upstream = balancer.pool(address, transport).take()
        reused = upstream is not None
        try:
            if not sent:
                if upstream is None:
                    upstream = client.upstream = await _connect(backend, address, transport, timeouts)
                upstream.begin_request(head.method, client.backlog)
                upstream.write(request)
                if has_body:  # never on a retry: only body-less requests are retried
                    await _forward_request_body(client, head, upstream, timeouts, policy)
                upstream.request_sent()
            assert upstream is not None
            response = await _response_head(client, upstream, head, response_timeout)
        except ClientFailed as failed:
            if upstream is not None:
                upstream.close()
            client.upstream = None
            if failed.cause is BODY_TOO_LARGE:  # a policy limit, not a broken client: answer it
                metrics.POLICY_ANSWERS.labels("413").inc()
                return 413, client.answer_locally(head, 413, hsts)
            raise failed.cause from None
        except (BackendFailed, ConnectionGone, PeerError, TimeoutError, UpstreamTlsFailure) as error:
            failure = _attempt_failure(error, backend, address)
        else:
            extra = hsts
            if policy is not None:
                response, extra = route_policy.shaped_response(policy, head, response, backend, address, affinity_token, hsts)
            return response.status, await _relay_response(client, state, head, upstream, response, backend, timeouts, extra)
        if upstream is not None:
            upstream.close()
        client.upstream = None
        metrics.UPSTREAM_ERRORS.labels(backend, failure.label).inc()
        retry = retry_after(failure, reused, replayable)
        if retry is Retry.SAME_ENDPOINT:
            attempts.insert(0, address)
        elif retry is Retry.STOP:
            break
    return failure.status, _answer(client, head, failure.status, hsts, is_grpc(head.headers))


class _Http2Progress:
    """How far an HTTP/2 exchange got: what decides whether a failed attempt may be retried."""

    __slots__ = ("response_started", "body_read", "body_too_large")

    def __init__(self) -> None:
        self.response_started = False  # the response head went to the client
        self.body_read = False  # the client's body is being consumed: the request cannot be replayed
        self.body_too_large = False  # a body without a length passed the route's limit: 413


async def _proxy_http2(
    client: ClientSide,
    state: ServingState,
    head: RequestHead,
    backend: str,
    candidates: list[Address],
    timeouts: Timeouts,
    hsts: bytes,
    grpc: bool,
    policy: route_policy.CompiledPolicy | None = None,
    affinity_token: bytes | None = None,
    real_ip: bytes = b"",
    forwarded_for: bytes = b"",
) -> tuple[int, bool]:
    """`_proxy` for an HTTP/2 backend: one stream on a pooled connection; the request body is
    pumped beside the response (gRPC bidi streams need both ways at once); a gRPC request's
    `grpc-timeout` bounds the whole exchange. The route's `policy` shapes the head and the
    response as for HTTP/1.1 backends, and bounds a body of unknown length while it is pumped;
    `real_ip` and `forwarded_for` as for `_proxy`."""
    balancer = state.balancer
    transport = balancer.transport(backend)
    listener = client.listener
    scheme = b"https" if transport is not None else b"http"
    proto, local_address = listener.name.encode(), listener.address
    if policy is None:
        fields = request_fields(
            head, scheme, client.client_ip, proto, local_address, real_ip=real_ip, forwarded_for=forwarded_for
        )
    else:
        fields = route_policy.upstream_fields(
            policy, head, scheme, client.client_ip, proto, local_address, real_ip, forwarded_for
        )
    replayable = is_replayable(head)
    progress = _Http2Progress()
    failure = FailureKind.NO_ENDPOINT
    attempts = list(candidates)
    try:
        async with asyncio.timeout(grpc_timeout(head.headers) if grpc else None):
            while attempts:
                address = attempts.pop(0)
                stream: UpstreamStream | None = None
                try:
                    try:
                        stream = await balancer.http2_pool(address, transport).open_stream(timeouts.connect, timeouts.backend_handshake)
                    except TimeoutError:
                        raise BackendFailed(FailureKind.CONNECT_TIMEOUT) from None
                    except (OSError, ConnectionGone):
                        raise BackendFailed(FailureKind.CONNECT_FAILED) from None
                    return await _exchange_http2(
                        client, head, stream, fields, hsts, timeouts, backend, progress, policy, affinity_token
                    )
                except ClientFailed as failed:
                    raise failed.cause from None
                except (BackendFailed, ConnectionGone, PeerError, UpstreamTlsFailure, h2_exceptions.H2Error) as error:
                    if progress.body_too_large:  # the pump cut the stream: a policy limit, answered as such
                        metrics.POLICY_ANSWERS.labels("413").inc()
                        return 413, _answer(client, head, 413, hsts, grpc)
                    failure = _attempt_failure(error, backend, address)
                finally:
                    if stream is not None:
                        stream.release()
                metrics.UPSTREAM_ERRORS.labels(backend, failure.label).inc()
                retry = retry_after(failure, False, replayable)
                if progress.body_read:
                    break  # part of the client's body went to the failed attempt: it cannot be sent again
                if retry is Retry.SAME_ENDPOINT:
                    attempts.insert(0, address)
                elif retry is Retry.STOP:
                    break
    except TimeoutError:  # the gRPC deadline passed (the backend stream was reset on the way out)
        metrics.UPSTREAM_ERRORS.labels(backend, FailureKind.RESPONSE_TIMEOUT.label).inc()
        if progress.response_started:
            client.send_trailers(((b"grpc-status", b"%d" % GRPC_DEADLINE_EXCEEDED), (b"grpc-message", b"deadline exceeded")))
            return 504, True
        return 504, _answer(client, head, 504, hsts, grpc)
    return failure.status, _answer(client, head, failure.status, hsts, grpc)


async def _exchange_http2(
    client: ClientSide,
    head: RequestHead,
    stream: UpstreamStream,
    fields: list[tuple[bytes, bytes]],
    hsts: bytes,
    timeouts: Timeouts,
    backend: str,
    progress: _Http2Progress,
    policy: route_policy.CompiledPolicy | None,
    affinity_token: bytes | None,
) -> tuple[int, bool]:
    stream.send_head(fields, end_stream=not head.has_body)
    pump = asyncio.create_task(_pump_request_body(client, head, stream, timeouts, progress, policy)) if head.has_body else None
    try:
        while True:
            if not stream.events:
                client.flush()
            event = await stream.next_event(timeouts.backend_response)
            if type(event) is ResponseStarted:
                break
            if type(event) is StreamReset:
                kind = FailureKind.REFUSED_STREAM if event.error_code == ErrorCodes.REFUSED_STREAM else FailureKind.BAD_RESPONSE
                raise BackendFailed(kind)
            raise PeerError(502, "backend sent data before a response head")
        response = response_head(event.fields, head.method)
        if response.status < 200:
            raise PeerError(502, "backend sent an interim response")  # h2 reports 1xx apart; never here
        if response.has_body and stream.events and type(stream.events[0]) is EndOfMessage:
            response = dataclasses.replace(response, has_body=False)  # trailers-only (gRPC errors): one HEADERS frame
        extra = hsts
        if policy is not None:
            response, extra = route_policy.shaped_response(
                policy, head, response, backend, stream.connection.address, affinity_token, hsts
            )
        _, keep = client.start_response(head, response, extra)
        progress.response_started = True
        await _relay_http2(client, stream, response, timeouts, backend)
        return response.status, keep and not client.closed
    except TimeoutError:
        if progress.response_started:
            raise ConnectionGone() from None  # a backend silent mid-response: cut, as HTTP/1.1 does
        raise BackendFailed(FailureKind.RESPONSE_TIMEOUT) from None
    finally:
        if pump is not None and not pump.done():
            pump.cancel()


async def _relay_http2(client: ClientSide, stream: UpstreamStream, response: ResponseHead, timeouts: Timeouts, backend: str) -> None:
    if not response.has_body:
        await stream.next_event(timeouts.backend_response)  # its EndOfMessage, queued already
        return
    try:
        while True:
            if not stream.events:
                client.flush()
            event = await stream.next_event(timeouts.backend_response)
            if type(event) is Body:
                client.send_body(event.data)
                await client.body_sent()
                stream.consumed(len(event.data))
            elif type(event) is ResponseTrailers:
                client.send_trailers(event.fields)  # grpc-status, grpc-message travel here
                await stream.next_event(timeouts.backend_response)  # h2 reports the end after them
                return
            elif type(event) is EndOfMessage:
                client.end_response()
                return
            else:  # StreamReset mid-response: propagate as a reset
                client.abort_response()
                metrics.UPSTREAM_ERRORS.labels(backend, FailureKind.CUT_MID_BODY.label).inc()
                return
    except (PeerError, ConnectionGone, TimeoutError):
        if client.closed:
            raise ConnectionGone() from None
        metrics.UPSTREAM_ERRORS.labels(backend, FailureKind.CUT_MID_BODY.label).inc()
        client.abort_response()


async def _pump_request_body(
    client: ClientSide,
    head: RequestHead,
    stream: UpstreamStream,
    timeouts: Timeouts,
    progress: _Http2Progress,
    policy: route_policy.CompiledPolicy | None,
) -> None:
    """Forward the request body to the backend stream while the response flows back. The route's
    `send_timeout` bounds each wait for the backend's window, and its `max_body_size` (a declared
    length was checked before) a body of unknown length: past it the stream is cut, as for
    HTTP/1.1 backends (`_forward_request_body`)."""
    remaining = send_timeout = None
    if policy is not None:
        send_timeout = policy.send_timeout
        if head.content_length is None:
            remaining = policy.max_body_size
    try:
        while True:
            event = await client.next_body_event(timeouts.idle)
            progress.body_read = True
            if type(event) is not Body:
                stream.end_request(client.request_trailers)
                return
            if remaining is not None:
                remaining -= len(event.data)
                if remaining < 0:
                    progress.body_too_large = True
                    break
            await stream.send_data(event.data, send_timeout or timeouts.backend_response)
    except (PeerError, ConnectionGone, TimeoutError, h2_exceptions.H2Error):
        pass  # the client failed or left, or the backend reset the stream
    stream.cancel()
    stream.push(ConnectionGone())


async def _connect(backend: str, address: Address, transport: UpstreamTransport | None, timeouts: Timeouts) -> UpstreamConnection:
    """A new connection to `address`, over TLS when the backend's protocol uses it."""
    try:
        return await connect(address, timeouts.connect, transport, timeouts.backend_handshake)
    except TimeoutError:
        raise BackendFailed(FailureKind.CONNECT_TIMEOUT) from None
    except OSError:
        raise BackendFailed(FailureKind.CONNECT_FAILED) from None


BODY_TOO_LARGE = PeerError(413, "request body over the route's limit")


async def _forward_request_body(
    client: ClientSide,
    head: RequestHead,
    upstream: UpstreamConnection,
    timeouts: Timeouts,
    policy: route_policy.CompiledPolicy | None,
) -> None:
    """Stream the request body (re-chunked if it has no length) until its EndOfMessage.

    `idle` bounds each wait for the client, `backend_response` each wait for a backend that does
    not read what we send (without it, both connections would hang forever; a route's
    `send_timeout` replaces it). The route's `max_body_size` (a declared length was checked
    before) bounds a body of unknown length."""
    remaining = send_timeout = None
    if policy is not None:
        send_timeout = policy.send_timeout
        if head.content_length is None:
            remaining = policy.max_body_size
    while True:
        try:
            event = await client.next_body_event(timeouts.idle)
        except TimeoutError:
            raise ClientFailed(PeerError(408, "request body not received in time")) from None
        except (PeerError, ConnectionGone) as error:
            raise ClientFailed(error) from None
        if type(event) is Body:
            if remaining is not None:
                remaining -= len(event.data)
                if remaining < 0:
                    raise ClientFailed(BODY_TOO_LARGE)
            upstream.write(encode_chunk(event.data) if head.chunked else event.data)
            if upstream._writing_paused:
                try:
                    async with asyncio.timeout(send_timeout or timeouts.backend_response):
                        await upstream.drain()
                except ConnectionGone:
                    raise BackendFailed(FailureKind.RESET_WHILE_SENDING) from None
                except TimeoutError:
                    raise BackendFailed(FailureKind.BACKEND_NOT_READING) from None
        else:
            if head.chunked:
                upstream.write(LAST_CHUNK)
            return


async def _response_head(client: ClientSide, upstream: UpstreamConnection, head: RequestHead, timeout: float) -> ResponseHead:
    """The final response head; 1xx interim responses are passed on where the client's protocol
    allows, but do not extend `timeout` (a backend sending 103s forever would never time out)."""
    deadline = upstream.loop.time() + timeout
    while True:
        if not upstream.events:
            client.flush()
        event = upstream.ready_event() or await upstream.next_event(timeout)
        if type(event) is not ResponseHead:
            raise PeerError(502, "backend sent data before a response head")
        if event.status >= 200 or event.status == 101:
            return event
        upstream.ready_event() or await upstream.next_event(timeout)  # the interim response's EndOfMessage
        if upstream.loop.time() > deadline:
            raise TimeoutError
        client.send_interim(head, event)


async def _relay_response(
    client: ClientSide,
    state: ServingState,
    head: RequestHead,
    upstream: UpstreamConnection,
    response: ResponseHead,
    backend: str,
    timeouts: Timeouts,
    hsts: bytes,
) -> bool:
    """Send the response to the client; True when the client connection may continue."""
    is_tunnel, keep = client.start_response(head, response, hsts)
    if is_tunnel:
        await client.tunnel(upstream)
        client.upstream = None
        return False
    try:
        while True:
            if not upstream.events:
                client.flush()
                if client.write_blocked:  # the backend waits for the client (proxy.flow)
                    await client.writable()
            event = upstream.ready_event() or await upstream.next_event(timeouts.backend_response)
            if type(event) is Body:
                client.send_body(event.data)
                del event  # the shell has the piece: don't keep it alive while the client drains
                await client.body_sent()
            elif type(event) is EndOfMessage:
                client.end_response()
                break
    except (PeerError, ConnectionGone, TimeoutError, UpstreamTlsFailure) as error:
        upstream.close()
        client.upstream = None
        if client.closed:
            raise ConnectionGone() from None  # the client went away, not the backend
        metrics.UPSTREAM_ERRORS.labels(backend, FailureKind.CUT_MID_BODY.label).inc()
        LOG.info("backend %s failed mid-response: %s", upstream.address, type(error).__name__)
        client.abort_response()
        return False  # the client sees a truncated body: the only honest signal left
    client.upstream = None
    state.balancer.release(upstream)
    return keep
