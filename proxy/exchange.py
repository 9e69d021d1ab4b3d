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

Requests always go to backends as HTTP/1.1 (`http1.upstream_request_head` re-derives the head
from the parsed values: the framing is ours). A failure before any response byte was read is
retried per `decisions.retry_after`; once a response head went to the client, a backend failure
can only cut the client's response (`ClientSide.abort_response`).

Timeouts: each wait for the client's body is bounded by `idle`, each wait for the backend by
`backend_response`; 1xx interim responses never extend the latter.

Per-route policy (`proxy.policy`) runs after routing and before an endpoint is chosen, only when
the matched rule has one (`match.policy is not None`): it may answer locally (403, a redirect,
413), rewrite the head that goes upstream and bound a body of unknown length while it streams.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
from typing import Protocol

from config.model import Address, Hsts, Timeouts, VirtualHost
from proxy import metrics, policy as route_policy
from proxy.decisions import FailureKind, Retry, is_replayable, retry_after
from proxy.flow import ConnectionGone
from proxy.http1 import LAST_CHUNK, Body, EndOfMessage, PeerError, RequestHead, ResponseHead, encode_chunk
from proxy.http1 import upstream_request_head
from proxy.serving import Generation, Listener, ServingState
from proxy.upstream import UpstreamConnection, connect

LOG = logging.getLogger("ingress_proxy")
ACCESS_LOG = logging.getLogger("ingress_proxy.access")


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

    async def next_body_event(self, timeout: float) -> Body | EndOfMessage:
        """The next piece of the request body; raises PeerError, ConnectionGone or TimeoutError."""

    def invite_body(self, head: RequestHead) -> None:
        """The request is about to be forwarded: answer `Expect: 100-continue` where it applies."""

    def flush(self) -> None:
        """We are about to wait for the backend: send what is queued."""

    def answer_locally(self, head: RequestHead, status: int, extra: bytes) -> bool:
        """A response the proxy makes (`extra`: header lines); True if the connection may go on."""

    def send_interim(self, head: RequestHead, response: ResponseHead) -> None: ...

    def start_response(self, head: RequestHead, response: ResponseHead, extra: bytes) -> tuple[bool, bool]:
        """Send the final response head; (it opens a tunnel, the connection may go on after)."""

    def send_body(self, data: bytes) -> None: ...

    async def body_sent(self) -> None:
        """After `send_body`: wait while the client is behind (flow control, bounded by `idle`)."""

    def end_response(self) -> None: ...

    def abort_response(self) -> None:
        """The backend failed after the head went out: signal a truncated response."""

    async def tunnel(self, upstream: UpstreamConnection) -> None: ...


async def exchange(client: ClientSide, state: ServingState, head: RequestHead) -> bool:
    """Answer one request; True when the client connection may carry another."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    generation = state.generation
    client_ip, real_ip = client.client_ip, b""
    if generation.configuration.real_ip is not None:  # trusted X-Forwarded-For (config.model.RealIp)
        real_ip, head = route_policy.forwarded_client(generation.configuration.real_ip, client_ip, head)
        client_ip = real_ip
    match = generation.router.route(head.host.decode("latin-1"), head.path)
    virtual_host = match.virtual_host
    host_label = (virtual_host.host or "*") if virtual_host else "-"
    backend = match.backend
    hsts = hsts_header(client.listener, generation, virtual_host)
    if not client.listener.tls and virtual_host is not None and virtual_host.redirect_to_https:
        status = 308
        keep = client.answer_locally(head, status, _redirect_header(head, state.https_port) + hsts)
    elif backend is None:
        status = 404
        keep = client.answer_locally(head, status, hsts)
    elif match.policy is not None:
        if match.policy.canary is not None:  # chosen here so that metrics and the access log name it
            backend = route_policy.chosen_backend(match.policy, backend, head, random.random())
        status, keep = await _proxy_with_policy(client, state, head, backend, match.policy, generation, hsts, client_ip, real_ip)
    elif not (candidates := state.balancer.candidates(backend)):
        status = 503
        keep = client.answer_locally(head, status, hsts)
    else:
        timeouts = generation.configuration.timeouts
        status, keep = await _proxy(client, state, head, backend, candidates, timeouts, hsts, real_ip=real_ip)
    elapsed = loop.time() - started
    backend_label = backend or "-"
    requests, durations = metrics.request_series(host_label, backend_label, status, client.protocol)
    requests.inc()
    durations.observe(elapsed)
    if ACCESS_LOG.isEnabledFor(logging.INFO):
        _log_access(client, head, status, backend_label, elapsed, generation)
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
) -> tuple[int, bool]:
    """The policy's local answer, or the request forwarded as the policy shapes it. `client_ip`
    is the address policies judge (the peer's, or the trusted X-Forwarded-For's `real_ip`)."""
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
            return 503, client.answer_locally(head, 503, hsts)
        carried = None
        if policy.affinity is not None:
            candidates, carried = policy.affinity.order(backend, candidates, head)
        timeouts = policy.route_timeouts(generation.configuration.timeouts)
        return await _proxy(client, state, head, backend, candidates, timeouts, hsts, policy, carried, real_ip)
    finally:
        if concurrency is not None:
            concurrency.leave(client_ip)


def hsts_header(listener: Listener, generation: Generation, virtual_host: VirtualHost | None = None) -> bytes:
    """HSTS for responses on a TLS listener when configured (the host's own, else the
    configuration's): on proxied and proxy-made ones alike."""
    hsts = generation.configuration.hsts
    if virtual_host is not None and virtual_host.hsts is not None:
        hsts = virtual_host.hsts or None  # False: none for this host
    if not isinstance(hsts, Hsts) or not listener.tls:
        return b""
    return b"Strict-Transport-Security: %s\r\n" % hsts.header_value().encode()


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
) -> tuple[int, bool]:
    """Forward `head` (shaped by the route's `policy`, if any) with retries; relay the answer."""
    has_body = head.has_body
    replayable = is_replayable(head)
    if has_body:
        client.invite_body(head)
    listener = client.listener
    if policy is None:
        request = upstream_request_head(head, client.client_ip, listener.name.encode(), listener.address, real_ip=real_ip)
    else:
        request = route_policy.upstream_request(
            policy, head, client.client_ip, listener.name.encode(), listener.address, real_ip
        )
    balancer = state.balancer
    failure = FailureKind.NO_ENDPOINT
    attempts = list(candidates)
    while attempts:
        address = attempts.pop(0)
        upstream = client.upstream = balancer.pool(address).take()
        reused = upstream is not None
        try:
            if upstream is None:
                try:
                    upstream = client.upstream = await connect(address, timeouts.connect)
                except TimeoutError:
                    raise BackendFailed(FailureKind.CONNECT_TIMEOUT) from None
                except OSError:
                    raise BackendFailed(FailureKind.CONNECT_FAILED) from None
            upstream.begin_request(head.method)
            upstream.write(request)
            if has_body:  # never on a retry: only body-less requests are retried
                await _forward_request_body(client, head, upstream, timeouts, policy)
            upstream.request_sent()
            response = await _response_head(client, upstream, head, timeouts.backend_response)
        except ClientFailed as failed:
            if upstream is not None:
                upstream.close()
            client.upstream = None
            if failed.cause is BODY_TOO_LARGE:  # a policy limit, not a broken client: answer it
                metrics.POLICY_ANSWERS.labels("413").inc()
                return 413, client.answer_locally(head, 413, hsts)
            raise failed.cause from None
        except BackendFailed as error:
            failure = error.kind
        except ConnectionGone:
            failure = FailureKind.RESET
        except PeerError:
            failure = FailureKind.BAD_RESPONSE
        except TimeoutError:
            failure = FailureKind.RESPONSE_TIMEOUT
        else:
            extra = hsts
            if policy is not None:
                if policy.edits_response:
                    response, extra = route_policy.downstream_head(policy, head, response, hsts)
                if policy.affinity is not None:
                    extra = policy.affinity.set_cookie(backend, address, affinity_token) + extra
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
    return failure.status, client.answer_locally(head, failure.status, hsts)


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
            event = upstream.ready_event() or await upstream.next_event(timeouts.backend_response)
            if type(event) is Body:
                client.send_body(event.data)
                await client.body_sent()
            elif type(event) is EndOfMessage:
                client.end_response()
                break
    except (PeerError, ConnectionGone, TimeoutError) as error:
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


def _log_access(client: ClientSide, head: RequestHead, status: int, backend: str, elapsed: float, generation: Generation) -> None:
    fields = {
        "client": client.client_ip.decode(),
        "listener": client.listener.name,
        "protocol": client.protocol,
        "host": head.host.decode("latin-1"),
        "method": head.method.decode("latin-1"),
        "target": head.target.decode("latin-1"),
        "status": status,
        "backend": backend,
        "duration_ms": round(elapsed * 1000, 3),
    }
    if generation.configuration.access_log_json:
        ACCESS_LOG.info(json.dumps(fields))
    else:
        ACCESS_LOG.info(
            '%(client)s %(listener)s %(protocol)s "%(method)s %(host)s%(target)s" %(status)s %(backend)s %(duration_ms)sms',
            fields,
        )
