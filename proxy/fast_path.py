"""The keep-alive fast path: the common HTTP/1.1 exchange, run entirely in protocol callbacks.

Theory of operation
-------------------
The general path (`proxy.exchange.exchange`, run by the client connection's handler coroutine)
pays for its generality on every request: a future and a timer per wait, a coroutine wake-up per
event. Most keep-alive requests need none of it: the whole head (and a small body, if any) came
in one read, the route has no policy, an idle HTTP/1.1 connection to the endpoint waits in its
pool, and the whole response, of known length, comes back in one read or a few. Such a request
is served here, from the client's `data_received` to the backend's `data_received`, with no task,
no future and no timer of its own; the connection has no handler coroutine while it is on this
path (`ClientConnection._fast`).

Two places decide, each once per request, and both fall back to the general path:
1. Before the request is sent (`start`): a complete head, no body or a buffered Content-Length
   body of at most FAST_BODY_LIMIT bytes without `Expect`, no upgrade; the routing decision both
   paths share (`decisions.route_outcome`) says HTTP1_PLAIN (no local answer, no policy, no
   client certificate to judge, no trusted X-Forwarded-For, endpoints spoken to in HTTP/1.1); and an
   idle pooled connection to the first candidate. A check that fails before routing leaves the request
   queued for `exchange`; one that fails after routing (no idle connection) hands the routed
   request to `exchange.proxy_routed`, so the round-robin cursor moves once per request whichever
   path serves it.
2. After it was sent (`FastExchange.backend_progress`, called from the backend's `data_received`
   and `connection_lost`, and `expired`, called at the response deadline): anything but a final
   response with a known length read to its end (an interim or 101, chunked or close-delimited,
   a Failure, more than FAST_RESPONSE_LIMIT bytes queued, a paused reader, a closed connection,
   the deadline) hands the in-flight state over: the backend connection, with its events still
   queued, goes to `exchange.proxy_routed(in_flight=...)`, which reads on exactly as if it had sent
   the request itself. Retries, failure kinds, 504s and mid-body cuts are the general path's alone.
   A hand-over happens at most once per request; afterwards this module never touches it again.

Both paths share one set of decisions (`decisions.route_outcome`, `decisions.plan_http1_response`,
`decisions.http1_connection_continues`), one head builder each way (`http1.upstream_request_head`,
`http1.client_response_head`), one metrics/access-log record (`exchange.record_exchange`), and the
pool's one door (`EndpointPool.give_back`, which checks `UpstreamConnection.reusable`), so they
cannot disagree on the bytes or on which connection may be reused. Pipelined requests stay in
order: the connection takes the next queued request only after the previous response was written.

Deadlines are timestamps, not timers: a request in flight has `FastExchange.deadline` (the
backend's `backend_response`), a connection idle on this path its idle and head deadlines; the
loop's one `proxy.deadlines.DeadlineSweeper` (the handshake timeout's too) acts on them.
`INGRESS_PROXY_FAST_PATH=0` turns this module off: every request takes the general path.
"""

from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING

from proxy import metrics
from proxy.decisions import RouteOutcome, http1_connection_continues, plan_http1_response, route_outcome
from proxy.exchange import HttpDate, hsts_header, proxy_routed, record_exchange
from proxy.flow import ConnectionGone, Failure
from proxy.http1 import END_OF_MESSAGE, Body, RequestHead, ResponseHead, client_response_head, upstream_request_head
from proxy.upstream_http2 import is_grpc
from proxy.upstream_tls import UpstreamTlsFailure

if TYPE_CHECKING:
    from config.model import Address
    from proxy.downstream import ClientConnection
    from proxy.serving import Generation
    from proxy.upstream import UpstreamConnection

ENABLED = os.environ.get("INGRESS_PROXY_FAST_PATH", "1") != "0"
FAST_BODY_LIMIT = 16 * 1024  # a request body already buffered whole, forwarded with its head in one write
FAST_RESPONSE_LIMIT = 64 * 1024  # a response is held whole before it is written: beyond this, streaming pays


class FastExchange:
    """One request routed by the fast path; in flight until its response is written or handed over."""

    __slots__ = ("client", "head", "generation", "backend", "host_label", "hsts", "candidates", "started", "upstream", "deadline")

    def __init__(
        self,
        client: ClientConnection,
        head: RequestHead,
        generation: Generation,
        backend: str,
        host_label: str,
        hsts: bytes,
        candidates: list[Address],
        started: float,
    ) -> None:
        self.client = client
        self.head = head
        self.generation = generation
        self.backend = backend
        self.host_label = host_label
        self.hsts = hsts
        self.candidates = candidates
        self.started = started
        self.upstream: UpstreamConnection | None = None  # set once the request was sent
        self.deadline = 0.0  # when the response must have come (loop time), once sent

    def backend_progress(self) -> None:
        """The backend connection queued events (or closed): finish, wait for more, or hand over."""
        upstream = self.upstream
        assert upstream is not None and upstream.parser is not None
        events = upstream.events
        if events:
            response = events[0]
            if type(response) is not ResponseHead or response.status < 200 or (response.has_body and response.content_length is None):
                self._hand_over()
            elif upstream.parser.complete:
                self._finish(upstream, response)
            elif upstream.closed or upstream._reading_paused or upstream._unconsumed_bytes > FAST_RESPONSE_LIMIT:
                self._hand_over()
        elif upstream.closed:
            self._hand_over()

    def expired(self) -> None:
        """The sweeper saw the deadline pass: the general path answers 504 (or relays what came)."""
        self._hand_over()

    def abandon(self) -> None:
        """The client left: nobody will read this response."""
        self.client.sweeper.in_flight.discard(self)
        upstream = self.upstream
        if upstream is not None:
            upstream.fast = None
            upstream.abandon()
        self.client.upstream = None

    async def resume(self) -> bool:
        """Run by the client's handler after a hand-over: the general path from routing on."""
        upstream = self.upstream
        remaining = max(self.deadline - self.client.loop.time(), 0.0) if upstream is not None else 0.0
        return await proxy_routed(
            self.client, self.client.server, self.head, self.generation, self.backend, self.host_label,
            self.candidates, self.hsts, self.started, upstream, remaining,
        )  # fmt: skip

    def _hand_over(self) -> None:
        self.client.sweeper.in_flight.discard(self)
        if self.upstream is not None:
            self.upstream.fast = None
        metrics.FAST_PATH.handed_over += 1
        self.client.fast_hand_over(self)

    def _finish(self, upstream: UpstreamConnection, response: ResponseHead) -> None:
        self.client.sweeper.in_flight.discard(self)
        upstream.fast = None
        events = upstream.events
        events.popleft()  # the head
        pieces = []
        while (event := events.popleft()) is not END_OF_MESSAGE:
            pieces.append(event.data)
        if not events:
            upstream._unconsumed_bytes = 0
        client = self.client
        state = client.server
        head = self.head
        plan = plan_http1_response(head, response, state.draining)
        client.fast_response(
            client_response_head(response, False, plan.keep_alive and head.keep_alive, HttpDate.now(), self.hsts), pieces
        )
        client.upstream = None
        state.balancer.release(upstream)
        elapsed = client.loop.time() - self.started
        record_exchange(client, client.client_ip, head, self.generation, self.host_label, self.backend, response.status, elapsed)
        metrics.FAST_PATH.served += 1
        client.fast_done(http1_connection_continues(head, plan.keep_alive, state.draining))


def start(client: ClientConnection, head: RequestHead) -> bool:
    """Take the request at the front of `client.events` if the fast path can; False leaves it
    queued, untouched, for the general path (`exchange`)."""
    events = client.events
    if head.upgrade:
        return False
    body = b""
    if head.has_body:
        if head.content_length is None or head.content_length > FAST_BODY_LIMIT:
            return False
        if any(name.lower() == b"expect" for name, _ in head.headers):
            return False  # the general path answers 100-continue
        pieces = []
        for event in itertools.islice(events, 1, None):
            if event is END_OF_MESSAGE:
                break
            if type(event) is not Body:
                return False
            pieces.append(event.data)
        else:
            return False  # the body is still arriving: stream it
        body = b"".join(pieces)
        body_events = len(pieces) + 1
    elif len(events) < 2 or events[1] is not END_OF_MESSAGE:
        return False
    else:
        body_events = 0
    state = client.server
    generation = state.generation
    match = generation.router.route(head.host.decode("latin-1"), head.path)
    balancer = state.balancer
    if (
        route_outcome(match, generation.configuration, client.listener.tls, False, is_grpc(head.headers), False, balancer)
        is not RouteOutcome.HTTP1_PLAIN
    ):
        return False  # anything to answer locally, judge, vouch for or shape is `exchange`'s
    backend = match.backend
    assert backend is not None
    virtual_host = match.virtual_host
    candidates = balancer.candidates(backend)
    # Routed: from here the request is the fast path's, or the general path's from routing on
    # (which takes the head as its handler would, and leaves a body queued for `_proxy` to read).
    client.ready_event()
    if not head.has_body:
        client.ready_event()  # its EndOfMessage
    client.took_head()
    loop = client.loop
    exchange = FastExchange(
        client, head, generation, backend, (virtual_host.host or "*") if virtual_host else "-",
        hsts_header(client.listener, generation, virtual_host), candidates, loop.time(),
    )  # fmt: skip
    upstream = balancer.pool(candidates[0], balancer.transport(backend)).take()
    if upstream is None:
        metrics.FAST_PATH.routed_general += 1
        client.fast_hand_over(exchange)
        return True
    for _ in range(body_events):
        client.ready_event()
    listener = client.listener
    request = upstream_request_head(head, client.client_ip, listener.name.encode(), listener.address)
    client.upstream = exchange.upstream = upstream
    upstream.begin_request(head.method, client.backlog)
    if upstream._reading_paused:  # paused for its last client (proxy.flow): ours decides now
        upstream.backlog_shrank()
    try:
        upstream.write(request + body if body else request)
    except (ConnectionGone, UpstreamTlsFailure) as error:  # e.g. a TLS backend's close_notify raced us
        upstream.events.append(Failure(error))  # the general path reads it as its own attempt's failure
        upstream.close()
        metrics.FAST_PATH.handed_over += 1
        client.fast_hand_over(exchange)
        return True
    upstream.request_sent()
    upstream.fast = exchange
    exchange.deadline = loop.time() + generation.configuration.timeouts.backend_response
    client.fast_sent(exchange)
    client.sweeper.add_in_flight(exchange)
    return True
