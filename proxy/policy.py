"""Per-route policy, enforced before an endpoint is chosen: pure functions over a compiled policy.

Theory of operation
-------------------
`config.model.RoutePolicy` holds plain values; `proxy.router` compiles each rule's policy once per
published generation into a `CompiledPolicy` (regexes compiled, header lines pre-serialised) and
hands it out with the route. A rule without policy gets `None`, and `proxy.exchange` then takes
exactly the path it took before policies existed: one `is None` test per request.

With a policy the exchange asks, in this order:
1. `local_answer(policy, client_ip, head)`: should the proxy answer by itself? Source ranges
   (deny first, then allow) → 403; a configured redirect → its code and Location; app-root for
   "/" → 302; a Content-Length over the body limit → 413. All of this happens before the body is
   invited, so a client sending `Expect: 100-continue` gets the refusal instead of a 100 and never
   sends the body.
2. `shaped_head(policy, head)`: the head as it goes upstream, whatever the backend speaks: the path rewritten
   (`$1`..`$9` from the rule's regex, the query kept), request header edits (remove, set = remove
   then add, add; X-Forwarded-Prefix is a set, so a client's own copy is dropped) and the Host
   (upstream-vhost). `upstream_request` writes it as an HTTP/1.1 head, `upstream_fields` as an
   HTTP/2 header block (h2c / gRPC backends), both from that one shaped head and one compiled list
   of added fields, so the two kinds of backend cannot see different requests. The framing stays
   `proxy.http1`'s (or `proxy.upstream_http2`'s) to derive; names that frame or that we derive
   cannot be edited (`config.route_policy.check_header_edit`).
   `shaped_response` does the same for the response's headers (`downstream_head`: edits, CORS
   headers for the request's Origin) and adds the affinity cookie, for either kind of backend. A CORS preflight (OPTIONS with an Origin and
   Access-Control-Request-Method) is answered in step 1 and never reaches the backend.
3. A body without a length (chunked, or HTTP/2 without content-length) is counted while it is
   forwarded: once it passes the limit the backend connection is closed (it has only seen a
   truncated request) and the client gets 413. This is the one place the backend sees part of an
   over-limit body; nginx avoids it by buffering the whole body to disk, which we never do.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import re
from dataclasses import dataclass

from config.model import Address, Affinity, Cors, HeaderEdits, IpNetwork, PathRule, RealIp, Timeouts
from config.route_policy import MAX_REGEX_SUBJECT
from proxy.http1 import RequestHead, ResponseHead, upstream_request_head
from proxy.upstream_http2 import request_fields

_GROUP_REFERENCE = re.compile(r"\$(\d)")


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    status: int
    extra: bytes  # header lines ("Name: value\r\n"...)


FORBIDDEN = LocalAnswer(403, b"")
TOO_LARGE = LocalAnswer(413, b"")


class CompiledPolicy:
    """One rule's RoutePolicy, ready for the hot path."""

    __slots__ = (
        "allow", "deny", "redirect", "app_root", "max_body_size", "path_pattern", "rewrite_target", "extra_request",
        "extra_request_fields", "drop_request", "timeouts", "_timeouts_for", "send_timeout", "upstream_host", "edits_response", "drop_response",
        "extra_response", "cors", "rate", "concurrency", "canary", "affinity",
    )

    def __init__(self, rule: PathRule) -> None:
        policy = rule.policy
        assert policy is not None
        self.allow: tuple[IpNetwork, ...] = policy.allow_sources
        self.deny: tuple[IpNetwork, ...] = policy.deny_sources
        self.redirect: LocalAnswer | None = None
        if policy.redirect is not None:
            self.redirect = LocalAnswer(policy.redirect.status, b"Location: %s\r\n" % policy.redirect.location.encode())
        self.app_root: LocalAnswer | None = None
        if policy.app_root is not None:
            self.app_root = LocalAnswer(302, b"Location: %s\r\n" % policy.app_root.encode())
        self.max_body_size = policy.max_body_size
        # ingress-nginx: `location ~* "^<path>"` for regex paths; a plain path is its literal text.
        source = rule.path if policy.regex else re.escape(rule.path)
        self.path_pattern = re.compile(source, re.IGNORECASE)
        self.rewrite_target = policy.rewrite_target
        self.timeouts = (policy.connect_timeout, policy.read_timeout)
        self._timeouts_for: tuple[Timeouts, Timeouts] | None = None  # (generation's, this route's), memoized
        self.send_timeout = policy.send_timeout
        request = policy.request_headers or HeaderEdits()
        if policy.forwarded_prefix is not None:
            request = HeaderEdits(set=(*request.set, ("X-Forwarded-Prefix", policy.forwarded_prefix)), add=request.add,
                                  remove=request.remove)  # fmt: skip
        self.drop_request, self.extra_request_fields = _compile_edits(request)
        self.extra_request = _lines(self.extra_request_fields)
        self.upstream_host = policy.upstream_host.encode() if policy.upstream_host is not None else b""
        self.drop_response, response_fields = _compile_edits(policy.response_headers or HeaderEdits())
        self.extra_response = _lines(response_fields)
        self.cors = CompiledCors(policy.cors) if policy.cors is not None else None
        self.rate: RateLimiter | None = None
        if policy.limit_rps is not None:
            burst = policy.limit_burst if policy.limit_burst is not None else policy.limit_rps * BURST_MULTIPLIER
            self.rate = RateLimiter(policy.limit_rps, max(burst, 1.0))
        self.concurrency = ConcurrencyLimiter(policy.limit_connections) if policy.limit_connections is not None else None
        self.canary = policy.canary
        self.affinity = CompiledAffinity(policy.affinity) if policy.affinity is not None else None
        self.edits_response = bool(self.drop_response or self.extra_response or self.cors)

    def route_timeouts(self, base: Timeouts) -> Timeouts:
        """The generation's timeouts with this route's connect/read ones; computed once per base."""
        if self.timeouts == (None, None):
            return base
        memo = self._timeouts_for
        if memo is None or memo[0] is not base:
            connect, read = self.timeouts
            memo = self._timeouts_for = (base, dataclasses.replace(
                base, connect=connect or base.connect, backend_response=read or base.backend_response
            ))
        return memo[1]

    def matches(self, path: str) -> bool:
        """For regex rules (the router asks): does the anchored, case-insensitive pattern match?"""
        return len(path) <= MAX_REGEX_SUBJECT and self.path_pattern.match(path) is not None


BURST_MULTIPLIER = 5  # ingress-nginx's limit-burst-multiplier default
MAX_TRACKED_CLIENTS = 65_536  # per limited route: bounds memory under a spray of source addresses (~10 MB)
TOO_MANY = LocalAnswer(429, b"Retry-After: 1\r\n")
BUSY = LocalAnswer(503, b"")


class RateLimiter:
    """A token bucket per client address: `rate` tokens a second, at most `burst` saved up.

    Only limited clients cost memory for long: when MAX_TRACKED_CLIENTS is reached, buckets that
    have refilled (their clients are under the limit anyway) are dropped; if none has, the oldest
    half goes. State belongs to one generation of one process: a reload starts afresh, and each
    replica (and each --workers process) counts on its own.
    """

    __slots__ = ("rate", "burst", "buckets")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.buckets: dict[bytes, tuple[float, float]] = {}  # client → (tokens, when they were counted)

    def admit(self, client: bytes, now: float) -> bool:
        tokens, then = self.buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        admitted = tokens >= 1.0
        if admitted:
            tokens -= 1.0
        if client not in self.buckets and len(self.buckets) >= MAX_TRACKED_CLIENTS:
            self._forget(now)
        self.buckets[client] = (tokens, now)
        return admitted

    def _forget(self, now: float) -> None:
        full = [key for key, (tokens, then) in self.buckets.items() if tokens + (now - then) * self.rate >= self.burst]
        for key in full or list(self.buckets)[: len(self.buckets) // 2]:
            del self.buckets[key]


class ConcurrencyLimiter:
    """Requests in flight per client address (nginx limit_conn counts per request too)."""

    __slots__ = ("limit", "in_flight")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight: dict[bytes, int] = {}

    def enter(self, client: bytes) -> bool:
        count = self.in_flight.get(client, 0)
        if count >= self.limit:
            return False
        self.in_flight[client] = count + 1
        return True

    def leave(self, client: bytes) -> None:
        count = self.in_flight[client] - 1
        if count:
            self.in_flight[client] = count
        else:
            del self.in_flight[client]  # an address with nothing in flight costs nothing


class CompiledCors:
    """CORS answers as pre-built header lines; only the echoed origin varies per request."""

    __slots__ = ("any_origin", "exact", "suffixes", "echo", "common", "preflight")

    def __init__(self, cors: Cors) -> None:
        self.any_origin = "*" in cors.allow_origins
        self.exact = frozenset(origin.lower().encode() for origin in cors.allow_origins if "*" not in origin)
        self.suffixes = tuple(  # "https://*.example.com" → (b"https://", b".example.com")
            (scheme.encode(), rest[1:].lower().encode())
            for scheme, _, rest in (origin.partition("://") for origin in cors.allow_origins if origin.startswith(("http://*.", "https://*.")))
            for scheme in (scheme + "://",)
        )  # fmt: skip
        self.echo = cors.allow_credentials or not self.any_origin  # "*" with credentials is refused by browsers
        common = b""
        if cors.allow_credentials:
            common += b"Access-Control-Allow-Credentials: true\r\n"
        if cors.expose_headers:
            common += b"Access-Control-Expose-Headers: %s\r\n" % cors.expose_headers.encode()
        self.common = common
        self.preflight = (
            b"Access-Control-Allow-Methods: %s\r\nAccess-Control-Allow-Headers: %s\r\nAccess-Control-Max-Age: %d\r\n"
            % (cors.allow_methods.encode(), cors.allow_headers.encode(), cors.max_age)
        )

    def allowed_origin(self, origin: bytes) -> bytes | None:
        """What Access-Control-Allow-Origin says for this request's Origin, or None: no CORS."""
        if not origin:
            return None
        lower = origin.lower()
        if self.any_origin or lower in self.exact or any(
            lower.startswith(scheme) and lower.endswith(suffix) and len(lower) > len(scheme) + len(suffix)
            for scheme, suffix in self.suffixes
        ):
            return origin if self.echo else b"*"
        return None

    def response_lines(self, head: RequestHead) -> bytes:
        allowed = self.allowed_origin(_header(head, b"origin"))
        if allowed is None:
            return b""
        vary = b"Vary: Origin\r\n" if allowed != b"*" else b""
        return b"Access-Control-Allow-Origin: %s\r\n%s%s" % (allowed, vary, self.common)


def _header(head: RequestHead, name: bytes) -> bytes:
    for field_name, value in head.headers:
        if field_name.lower() == name:
            return value
    return b""


def _compile_edits(edits: HeaderEdits) -> tuple[frozenset[bytes], tuple[tuple[bytes, bytes], ...]]:
    """(names to drop from the message, fields to add to it: names as written, in order)."""
    drop = frozenset(name.lower().encode() for name in (*edits.remove, *(name for name, _ in edits.set)))
    fields = tuple((name.encode(), value.encode()) for name, value in (*edits.set, *edits.add))
    return drop, fields


def _lines(fields: tuple[tuple[bytes, bytes], ...]) -> bytes:
    """Fields as HTTP/1.1 header lines ("Name: value\r\n"...), serialised once per generation."""
    return b"".join(b"%s: %s\r\n" % field for field in fields)


class CompiledAffinity:
    """Cookie stickiness: endpoint tokens are a digest of (backend, address), the same in every
    replica and across restarts, so any replica honours a cookie another one issued."""

    __slots__ = ("name", "attributes", "_tokens")

    def __init__(self, affinity: Affinity) -> None:
        self.name = affinity.cookie_name
        attributes = f"; Path={affinity.path}; HttpOnly"
        if affinity.max_age is not None:
            attributes += f"; Max-Age={affinity.max_age}"
        self.attributes = attributes.encode()
        self._tokens: dict[tuple[str, Address], bytes] = {}

    def token(self, backend: str, address: Address) -> bytes:
        key = (backend, address)
        token = self._tokens.get(key)
        if token is None:
            if len(self._tokens) >= MAX_TRACKED_CLIENTS:
                self._tokens.clear()  # endpoints churned a lot: recompute what is asked again
            token = self._tokens[key] = hashlib.blake2b(f"{backend}|{address}".encode(), digest_size=8).hexdigest().encode()
        return token

    def order(self, backend: str, candidates: list[Address], head: RequestHead) -> tuple[list[Address], bytes | None]:
        """Candidates with the cookie's endpoint first (when it still exists), and the token the
        request carried (None: no cookie)."""
        wanted = _cookie(head, self.name)
        if wanted is None:
            return candidates, None
        token = wanted.encode("latin-1")
        for index, address in enumerate(candidates):
            if self.token(backend, address) == token:
                return [address, *candidates[:index], *candidates[index + 1 :]], token
        return candidates, token  # its endpoint is gone: balanced as usual, re-issued below

    def set_cookie(self, backend: str, address: Address, carried: bytes | None) -> bytes:
        """The Set-Cookie line when the request did not already name the endpoint that served it."""
        token = self.token(backend, address)
        if carried == token:
            return b""
        return b"Set-Cookie: %s=%s%s\r\n" % (self.name.encode(), token, self.attributes)


def chosen_backend(policy: CompiledPolicy, backend: str, head: RequestHead, draw: float) -> str:
    """The rule's backend or its canary's; `draw` is uniform in [0, 1) (random in the exchange)."""
    canary = policy.canary
    if canary is None:
        return backend
    if canary.header is not None:
        value = _header(head, canary.header.lower().encode()).decode("latin-1")
        if canary.header_value is not None:
            if value == canary.header_value:
                return canary.backend
        elif value == "always":
            return canary.backend
        elif value == "never":
            return backend
    if canary.cookie is not None:
        cookie = _cookie(head, canary.cookie)
        if cookie == "always":
            return canary.backend
        if cookie == "never":
            return backend
    return canary.backend if draw * canary.weight_total < canary.weight else backend


def _cookie(head: RequestHead, name: str) -> str | None:
    wanted = name.encode()
    for field_name, value in head.headers:
        if field_name.lower() == b"cookie":
            for pair in value.split(b";"):
                key, _, found = pair.strip().partition(b"=")
                if key == wanted:
                    return found.decode("latin-1")
    return None


@functools.lru_cache(maxsize=4096)  # parsing costs ~2 µs; a connection's address is asked on each request
def forwarded_client(real_ip: RealIp, peer: bytes, head: RequestHead) -> tuple[bytes, bytes]:
    """(the client's address, the X-Forwarded-For to send or b"" for that address alone) under
    `real_ip`: see config.model.RealIp. An untrusted peer is the client and its chain is dropped;
    a trusted peer's chain decides the client and, with compute_full_forwarded_for, goes on with
    the peer appended."""
    peer_address = client_address(peer)
    if peer_address is None or not any(peer_address in network for network in real_ip.trusted):
        return peer, b""
    chain = [item.strip() for name, value in head.headers if name.lower() == b"x-forwarded-for" for item in value.split(b",")]
    forwarded_for = b", ".join([*chain, peer]) if real_ip.compute_full_forwarded_for and chain else b""
    for candidate in reversed(chain):
        address = client_address(candidate)
        if address is None:
            return peer, forwarded_for  # a hop that is not an address: stop trusting there (nginx real_ip does too)
        if not any(address in network for network in real_ip.trusted):
            return candidate, forwarded_for
    return (chain[0] if chain else peer), forwarded_for  # every hop trusted: the leftmost one


def client_address(client_ip: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(client_ip.decode("ascii"))
    except ValueError:
        return None  # "-" (no peer address): matches no range
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d
    return address


def source_allowed(policy: CompiledPolicy, client_ip: bytes) -> bool:
    if not policy.allow and not policy.deny:
        return True
    address = client_address(client_ip)
    if address is None:
        return not policy.allow
    if any(address in network for network in policy.deny):
        return False
    return not policy.allow or any(address in network for network in policy.allow)


def local_answer(policy: CompiledPolicy, client_ip: bytes, head: RequestHead) -> LocalAnswer | None:
    """The answer the proxy gives instead of forwarding, or None to forward."""
    if not source_allowed(policy, client_ip):
        return FORBIDDEN
    if policy.redirect is not None:
        return policy.redirect
    if policy.app_root is not None and head.path == "/":
        return policy.app_root
    cors = policy.cors
    if cors is not None and head.method == b"OPTIONS" and _header(head, b"access-control-request-method"):
        lines = cors.response_lines(head)
        # A preflight is ours to answer (ingress-nginx: 204); 200 here, which browsers take as well,
        # because the proxy's local answers always carry a small text body.
        return LocalAnswer(200, lines + cors.preflight) if lines else FORBIDDEN
    if policy.max_body_size is not None and head.content_length is not None and head.content_length > policy.max_body_size:
        return TOO_LARGE
    return None


def rewritten_target(policy: CompiledPolicy, head: RequestHead) -> bytes:
    """nginx `rewrite <pattern> <target> break`: the whole path becomes the target, with `$n`
    replaced by the n-th group of the rule's pattern; the query is kept. A path the pattern does
    not match (a Prefix rule's path in another case) is left as it is."""
    assert policy.rewrite_target is not None
    path = head.path
    match = policy.path_pattern.match(path)
    if match is None:
        return head.target
    groups = match.groups()
    new_path = _GROUP_REFERENCE.sub(lambda ref: _group(groups, int(ref[1])), policy.rewrite_target)
    question = head.target.find(b"?")
    query = b"" if question == -1 else head.target[question:]
    return new_path.encode("latin-1") + query


def _group(groups: tuple[str | None, ...], number: int) -> str:
    if number == 0 or number > len(groups):
        return ""
    return groups[number - 1] or ""


def shaped_head(policy: CompiledPolicy, head: RequestHead) -> RequestHead:
    """The one request-shaping step both backend kinds use: the head as forwarded (target
    rewritten, the headers the policy removes or replaces dropped). What the policy adds
    (`extra_request` / `extra_request_fields`, compiled from one list) and the Host it sends
    (`upstream_host`) are written by `upstream_request` (HTTP/1.1) and `upstream_fields` (HTTP/2)."""
    target = rewritten_target(policy, head) if policy.rewrite_target is not None else head.target
    headers = head.headers
    if policy.drop_request:
        drop = policy.drop_request
        headers = tuple(field for field in headers if field[0].lower() not in drop)
    if target is not head.target or headers is not head.headers:  # one construction (replace() is ~3 µs)
        head = RequestHead(
            head.method, target, head.version, headers, head.host, head.keep_alive, head.upgrade, head.chunked,
            head.content_length, head.vouched,
        )
    return head


def upstream_request(
    policy: CompiledPolicy,
    head: RequestHead,
    client_ip: bytes,
    proto: bytes,
    local_address: bytes,
    real_ip: bytes = b"",
    forwarded_for: bytes = b"",
) -> bytes:
    """The HTTP/1.1 request head on the wire to the backend, as the policy shapes it (framing: http1's)."""
    return upstream_request_head(
        shaped_head(policy, head), client_ip, proto, local_address, policy.extra_request, policy.upstream_host, real_ip,
        forwarded_for,
    )


def upstream_fields(
    policy: CompiledPolicy, head: RequestHead, scheme: bytes, client_ip: bytes, proto: bytes, local_address: bytes,
    real_ip: bytes = b"", forwarded_for: bytes = b"",
) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 request header block for the backend, as the policy shapes it: the same shaped
    head and the same added fields as `upstream_request` (tests/unit/test_policy.py compares the two)."""
    return request_fields(
        shaped_head(policy, head), scheme, client_ip, proto, local_address, policy.extra_request_fields,
        policy.upstream_host, real_ip, forwarded_for,
    )


def downstream_head(
    policy: CompiledPolicy, head: RequestHead, response: ResponseHead, extra: bytes
) -> tuple[ResponseHead, bytes]:
    """The backend's response head with the policy's removals, and the header lines to add
    (header edits, CORS for the request's Origin, then `extra`)."""
    drop = policy.drop_response
    lines = policy.extra_response
    if policy.cors is not None:
        drop = drop | _CORS_RESPONSE_HEADERS  # ours replace the backend's, as nginx's more_set_headers
        lines += policy.cors.response_lines(head)
    if drop:
        headers = tuple(field for field in response.headers if field[0].lower() not in drop)
        response = dataclasses.replace(response, headers=headers)
    return response, lines + extra


def shaped_response(
    policy: CompiledPolicy, head: RequestHead, response: ResponseHead, backend: str, address: Address,
    affinity_token: bytes | None, extra: bytes,
) -> tuple[ResponseHead, bytes]:
    """The response as the policy shapes it for the client, whichever kind of backend sent it:
    `downstream_head`'s edits and CORS, then the affinity cookie naming the endpoint that served it."""
    if policy.edits_response:
        response, extra = downstream_head(policy, head, response, extra)
    if policy.affinity is not None:
        extra = policy.affinity.set_cookie(backend, address, affinity_token) + extra
    return response, extra


_CORS_RESPONSE_HEADERS = frozenset({
    b"access-control-allow-origin", b"access-control-allow-credentials", b"access-control-expose-headers",
})  # fmt: skip
