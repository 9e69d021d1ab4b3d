"""Per-route policy as tables: value checks (config.route_policy), enforcement (proxy.policy),
regex routing (proxy.router). In memory; the end-to-end proof is tests/e2e/test_route_policy.py."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import time

import pytest

from config.model import Address, Affinity, Canary, HeaderEdits, RealIp, PathRule, PathType, Redirect, RouteTable, RoutePolicy, VirtualHost
from config.route_policy import (
    MAX_REGEX_LENGTH,
    MAX_REGEX_SUBJECT,
    PolicyValueError,
    check_header_edit,
    check_redirect_location,
    check_regex,
    check_rewrite_target,
    parse_size,
)
from proxy.http1 import RequestHead, upstream_request_head
from proxy.policy import MAX_TRACKED_CLIENTS, chosen_backend, forwarded_client, CompiledPolicy, ConcurrencyLimiter, RateLimiter, local_answer, shaped_head, source_allowed, upstream_fields, upstream_request
from proxy.router import Router

P, E, I = PathType.PREFIX, PathType.EXACT, PathType.IMPLEMENTATION_SPECIFIC


def head(target: bytes = b"/", content_length: int | None = None, headers: tuple = ()) -> RequestHead:
    return RequestHead(
        method=b"POST" if content_length else b"GET", target=target, version="1.1", headers=((b"host", b"a.test"), *headers),
        host=b"a.test", keep_alive=True, upgrade=False, chunked=False, content_length=content_length,
    )


def compiled(path: str = "/", path_type: PathType = P, **fields: object) -> CompiledPolicy:
    for name in ("allow_sources", "deny_sources"):
        if name in fields:
            fields[name] = tuple(ipaddress.ip_network(text) for text in fields[name])  # type: ignore[union-attr]
    return CompiledPolicy(PathRule(path, path_type, "b", RoutePolicy(**fields)))  # type: ignore[arg-type]


@pytest.mark.parametrize(("raw", "size"), [
    ("1m", 1048576), ("8M", 8388608), ("512k", 524288), ("1g", 1073741824), ("1048576", 1048576), ("0", None), (" 2k ", 2048),
])  # fmt: skip
def test_sizes_use_nginx_syntax(raw: str, size: int | None) -> None:
    assert parse_size(raw) == size


@pytest.mark.parametrize("raw", ["lots", "1.5m", "-1", "1mb", ""])
def test_sizes_refused(raw: str) -> None:
    with pytest.raises(PolicyValueError):
        parse_size(raw)


@pytest.mark.parametrize(("pattern", "groups"), [
    ("/api(/|$)(.*)", 2), ("/(.+)/v1/(.*)", 2), ("/app/?(.*)", 1), ("/plain", 0), ("/v[0-9]{1,3}/x", 0),
])  # fmt: skip
def test_regex_idioms_of_ingress_nginx_pass(pattern: str, groups: int) -> None:
    assert check_regex(pattern) == groups


@pytest.mark.parametrize(("pattern", "why"), [
    ("(a+)+$", "nests a repeat"), ("/(.*)*", "nests a repeat"), ("/x(a|ab)*", "repeats an alternation"),
    (r"/(a)\1", "backreferences"), ("/x(?=y)", "look-ahead"), ("/x(?<!y)", "look-ahead"),
    ("/.*.*.*x", "open-ended repeats"), ("/(?:a{1,100}){1,100}", "nests a repeat"), ("/" + "a" * MAX_REGEX_LENGTH, "characters long"),
    ("/api(", "not a valid regex"),
])  # fmt: skip
def test_regexes_that_could_backtrack_without_end_are_refused(pattern: str, why: str) -> None:
    with pytest.raises(PolicyValueError) as refused:
        check_regex(pattern)
    assert why in refused.value.problem


def test_an_accepted_regex_stays_fast_on_the_longest_path_it_is_matched_against() -> None:
    """Not a timing assertion: a step bound. The worst accepted shape (two open-ended repeats)
    on a failing subject of MAX_REGEX_SUBJECT characters finishes; (a+)+ would not in our lifetime."""
    pattern = "/(.*)a(.*)b"
    check_regex(pattern)
    policy = compiled(pattern, I, regex=True)
    started = time.process_time()
    assert not policy.matches("/" + "a" * (MAX_REGEX_SUBJECT - 1))
    assert time.process_time() - started < 30  # generous: milliseconds here; refused shapes take ~forever
    assert not policy.matches("/" + "a" * MAX_REGEX_SUBJECT + "b")  # over the subject bound: no regex match


@pytest.mark.parametrize(("target", "groups", "ok"), [
    ("/$2", 2, True), ("/$1/x", 1, True), ("/", 0, True), ("/$3", 2, False), ("rel/$1", 1, False), ("/x\r\ny", 0, False),
])  # fmt: skip
def test_rewrite_targets(target: str, groups: int, ok: bool) -> None:
    if ok:
        assert check_rewrite_target(target, groups) == target
    else:
        with pytest.raises(PolicyValueError):
            check_rewrite_target(target, groups)


@pytest.mark.parametrize(("location", "ok"), [
    ("https://new.example.com/", True), ("/maintenance", True), ("http://x.test/a?b=c", True),
    ("javascript:alert(1)", False), ("new.example.com", False), ("/x\r\nSet-Cookie: a=b", False), ("https://", False),
])  # fmt: skip
def test_redirect_locations(location: str, ok: bool) -> None:
    if ok:
        assert check_redirect_location(location) == location
    else:
        with pytest.raises(PolicyValueError):
            check_redirect_location(location)


@pytest.mark.parametrize(("allow", "deny", "client", "allowed"), [
    ((), ("10.6.0.0/16",), b"10.6.1.1", False),
    ((), ("10.6.0.0/16",), b"10.7.1.1", True),
    (("10.0.0.0/8",), (), b"10.1.2.3", True),
    (("10.0.0.0/8",), (), b"11.1.2.3", False),
    (("10.0.0.0/8",), ("10.6.0.0/16",), b"10.6.0.1", False),  # deny first, as nginx's deny-then-allow order
    (("10.0.0.0/8",), (), b"::ffff:10.1.2.3", True),  # a dual-stack listener's view of an IPv4 client
    (("2001:db8::/32",), (), b"2001:db8::1", True),
    (("10.0.0.0/8",), (), b"-", False),  # no peer address: an allowlist cannot admit it
    ((), ("10.0.0.0/8",), b"-", True),
])  # fmt: skip
def test_source_ranges(allow: tuple, deny: tuple, client: bytes, allowed: bool) -> None:
    assert source_allowed(compiled(allow_sources=allow, deny_sources=deny), client) is allowed


@pytest.mark.parametrize(("fields", "request_head", "answer"), [
    ({"allow_sources": ("10.0.0.0/8",)}, head(), (403, b"")),
    ({"redirect": Redirect("https://new.test/", 301)}, head(b"/x?y"), (301, b"Location: https://new.test/\r\n")),
    ({"redirect": Redirect("/m", 302), "allow_sources": ("10.0.0.0/8",)}, head(), (403, b"")),  # 403 before redirect
    ({"app_root": "/app"}, head(b"/"), (302, b"Location: /app\r\n")),
    ({"app_root": "/app"}, head(b"/?x=1"), (302, b"Location: /app\r\n")),
    ({"app_root": "/app"}, head(b"/other"), None),
    ({"max_body_size": 10}, head(b"/", content_length=11), (413, b"")),
    ({"max_body_size": 10}, head(b"/", content_length=10), None),
    ({"max_body_size": 10}, head(b"/"), None),  # no declared length: counted while forwarded
])  # fmt: skip
def test_local_answers(fields: dict, request_head: RequestHead, answer: tuple | None) -> None:
    found = local_answer(compiled(**fields), b"192.0.2.1", request_head)
    assert (found.status, found.extra) == answer if answer else found is None


@pytest.mark.parametrize(("path", "regex", "target", "request_target", "upstream_target"), [
    ("/api(/|$)(.*)", True, "/$2", b"/api/users/7?full=1", b"/users/7?full=1"),
    ("/api(/|$)(.*)", True, "/$2", b"/api", b"/"),
    ("/API(/|$)(.*)", True, "/$2", b"/api/x", b"/x"),  # case-insensitive, as ingress-nginx's ~*
    ("/(.+)/v1/(.*)", True, "/$2/$1", b"/shop/v1/cart", b"/cart/shop"),
    ("/old", False, "/", b"/old/deep/path?q", b"/?q"),  # nginx: the whole path becomes the target
    ("/old", False, "/new$1", b"/old/x", b"/new"),  # no groups: $n is empty
])  # fmt: skip
def test_rewrites(path: str, regex: bool, target: str, request_target: bytes, upstream_target: bytes) -> None:
    policy = compiled(path, I, regex=regex, rewrite_target=target)
    forwarded = shaped_head(policy, head(request_target))
    assert forwarded.target == upstream_target and policy.extra_request == b""


def test_forwarded_prefix_replaces_the_clients_and_framing_stays_ours() -> None:
    policy = compiled("/api", P, forwarded_prefix="/api", rewrite_target="/")
    forged = head(b"/api/x", headers=((b"X-Forwarded-Prefix", b"/evil"), (b"content-length", b"999")))
    wire = upstream_request_head(shaped_head(policy, forged), b"192.0.2.1", b"https", b"127.0.0.1:8443", policy.extra_request)
    assert wire.startswith(b"GET / HTTP/1.1\r\n")
    assert re.findall(rb"(?i)x-forwarded-prefix: ([^\r]*)", wire) == [b"/api"]
    assert b"999" not in wire and wire.endswith(b"X-Forwarded-Prefix: /api\r\n\r\n")


def test_router_tries_exact_then_regex_longest_first_then_prefix_and_hands_out_policies() -> None:
    regex = RoutePolicy(regex=True)
    table = RouteTable(
        virtual_hosts=(VirtualHost("a.test", (
            PathRule("/", P, "root"),
            PathRule("/api", P, "prefix"),
            PathRule("/api/exact", E, "exact"),
            PathRule("/api/v[0-9]+", I, "short-regex", regex),
            PathRule("/api/v[0-9]+/admin", I, "long-regex", regex),
        )),),
        backends=(),
    )
    router = Router(table)
    assert router.route("a.test", "/api/exact").backend == "exact"
    assert router.route("a.test", "/api/v2/admin/x").backend == "long-regex"
    assert router.route("a.test", "/API/V2/x").backend == "short-regex"  # case-insensitive
    assert router.route("a.test", "/api/x").backend == "prefix"
    match = router.route("a.test", "/other")
    assert match.backend == "root" and match.policy is None  # no policy: the exchange's old path
    assert router.route("a.test", "/api/v2").policy is not None


def test_header_edits_on_the_wire_keep_our_framing() -> None:
    policy = compiled(
        upstream_host="internal.test",
        request_headers=HeaderEdits(set=(("X-Env", "prod"),), add=(("X-Trace", "on"),), remove=("cookie",)),
    )
    request = head(b"/", headers=((b"X-Env", b"dev"), (b"COOKIE", b"a=1"), (b"X-Trace", b"client")))
    wire = upstream_request(policy, request, b"192.0.2.1", b"https", b"127.0.0.1:8443")
    assert wire.startswith(b"GET / HTTP/1.1\r\nHost: internal.test\r\n")
    assert b"X-Forwarded-Host: a.test\r\n" in wire and b"a=1" not in wire and b"dev" not in wire
    assert re.findall(rb"X-Trace: ([^\r]*)", wire) == [b"client", b"on"] and b"X-Env: prod\r\n" in wire


# One shaping step, two kinds of backend: the HTTP/1.1 head and the HTTP/2 header block built for
# the same request under the same policy must say the same thing, field for field (framing aside:
# each protocol frames its own way; names are compared without case, as both protocols do).
SHAPING_POLICIES = {
    "none-of-the-shaping-keys": {"max_body_size": 10},
    "rewrite-and-prefix": {"regex": True, "rewrite_target": "/$2", "forwarded_prefix": "/api", "path": "/api(/|$)(.*)"},
    "edits-and-vhost": {
        "upstream_host": "internal.test",
        "request_headers": HeaderEdits(set=(("X-Env", "prod"),), add=(("X-Trace", "on"), ("X-Trace", "twice")), remove=("Cookie",)),
    },
    "everything": {
        "regex": True, "rewrite_target": "/v2/$1", "forwarded_prefix": "/old", "path": "/old/(.*)", "upstream_host": "b.internal:8080",
        "request_headers": HeaderEdits(set=(("Authorization", "Bearer x"),), remove=("X-Remove-Me",)),
    },
}  # fmt: skip
_FRAMING = {b"transfer-encoding", b"content-length", b"te", b"connection", b"upgrade"}


def _http1_as_fields(wire: bytes) -> tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]]]:
    """(method, target, Host, other fields lower-cased in order) of an HTTP/1.1 request head."""
    request_line, *lines = wire.removesuffix(b"\r\n\r\n").split(b"\r\n")
    method, target, _ = request_line.split(b" ")
    fields = [(name.lower(), value) for name, _, value in (line.partition(b": ") for line in lines)]
    host = [value for name, value in fields if name == b"host"]
    assert len(host) == 1
    return method, target, host[0], [field for field in fields if field[0] != b"host" and field[0] not in _FRAMING]


@pytest.mark.parametrize("name", SHAPING_POLICIES)
@pytest.mark.parametrize("real_ip", [b"", b"203.0.113.9"])
def test_http1_and_http2_backends_get_the_same_shaped_request(name: str, real_ip: bytes) -> None:
    fields = dict(SHAPING_POLICIES[name])
    path = str(fields.pop("path", "/"))
    policy = compiled(path, I if fields.get("regex") else P, **fields)
    request = head(b"/old/x?q=1", content_length=4, headers=(
        (b"Cookie", b"a=1"), (b"X-Env", b"dev"), (b"X-Trace", b"client"), (b"X-Remove-Me", b"1"),
        (b"X-Forwarded-Prefix", b"/forged"), (b"X-Forwarded-For", b"198.51.100.1"), (b"Accept", b"*/*"),
    ))  # fmt: skip
    wire = upstream_request(policy, request, b"192.0.2.1", b"https", b"127.0.0.1:8443", real_ip)
    block = upstream_fields(policy, request, b"http", b"192.0.2.1", b"https", b"127.0.0.1:8443", real_ip)
    method, target, host, http1_fields = _http1_as_fields(wire)
    pseudo = dict(field for field in block if field[0].startswith(b":"))
    assert (pseudo[b":method"], pseudo[b":path"], pseudo[b":authority"]) == (method, target, host)
    assert [field for field in block if not field[0].startswith(b":") and field[0] not in _FRAMING] == http1_fields
    assert any(name == b"x-real-ip" and value == (real_ip or b"192.0.2.1") for name, value in block)


def test_shaping_changes_what_each_policy_key_says() -> None:
    """The table above would pass if neither writer shaped anything: this pins what shaping does."""
    policy = compiled("/old/(.*)", I, **{key: value for key, value in SHAPING_POLICIES["everything"].items() if key != "path"})
    request = head(b"/old/x?q=1", headers=((b"X-Remove-Me", b"1"), (b"X-Forwarded-Prefix", b"/forged")))
    block = upstream_fields(policy, request, b"http", b"192.0.2.1", b"https", b"127.0.0.1:8443")
    assert block[:4] == [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"b.internal:8080"), (b":path", b"/v2/x?q=1")]
    rest = block[4:]
    assert (b"x-forwarded-host", b"a.test") in rest and (b"x-forwarded-prefix", b"/old") in rest
    assert (b"authorization", b"Bearer x") in rest
    assert not any(name in (b"x-remove-me",) or value == b"/forged" for name, value in rest)


@pytest.mark.parametrize(("name", "request_side", "refused"), [
    ("Content-Length", True, True), ("transfer-encoding", False, True), ("Host", True, True), ("X-Forwarded-For", True, True),
    ("Connection", False, True), ("bad name", True, True), ("X-Forwarded-For", False, False), ("X-Env", True, False),
])  # fmt: skip
def test_header_names_an_edit_may_not_touch(name: str, request_side: bool, refused: bool) -> None:
    if refused:
        with pytest.raises(PolicyValueError):
            check_header_edit(name, "v", request_side)
    else:
        assert check_header_edit(name, "v", request_side) == name
    with pytest.raises(PolicyValueError):
        check_header_edit("X-Ok", "a\r\nInjected: 1", request_side)


def test_rate_limit_is_a_token_bucket_per_client() -> None:
    limiter = RateLimiter(rate=2.0, burst=3.0)
    assert [limiter.admit(b"a", 0.0) for _ in range(4)] == [True, True, True, False]  # the burst, then refused
    assert limiter.admit(b"b", 0.0)  # another client has its own bucket
    assert not limiter.admit(b"a", 0.25) and limiter.admit(b"a", 0.5)  # 2/s: one token back after 0.5 s
    assert [limiter.admit(b"a", 100.0) for _ in range(4)] == [True, True, True, False]  # saved up to the burst only


def test_rate_limit_memory_is_bounded_and_forgets_clients_under_the_limit_first() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0)
    for number in range(MAX_TRACKED_CLIENTS):
        limiter.admit(b"%d" % number, 0.0)
    assert not limiter.admit(b"0", 0.0)  # client 0 is limited
    limiter.admit(b"new", 10.0)  # full: everyone has refilled by now, all are forgotten but the newcomer
    assert len(limiter.buckets) <= MAX_TRACKED_CLIENTS and b"new" in limiter.buckets


def test_concurrency_limit_counts_requests_in_flight_per_client() -> None:
    limiter = ConcurrencyLimiter(2)
    assert limiter.enter(b"a") and limiter.enter(b"a") and not limiter.enter(b"a") and limiter.enter(b"b")
    limiter.leave(b"a")
    assert limiter.enter(b"a")
    for client in (b"a", b"a", b"b"):
        limiter.leave(client)
    assert limiter.in_flight == {}  # nothing in flight, nothing kept


def test_affinity_puts_the_cookies_endpoint_first_and_reissues_when_it_is_gone() -> None:
    policy = compiled(affinity=Affinity("route", max_age=60))
    affinity = policy.affinity
    assert affinity is not None
    a, b, c = Address("10.0.0.1", 80), Address("10.0.0.2", 80), Address("10.0.0.3", 80)
    token_b = affinity.token("app", b)
    assert token_b == compiled(affinity=Affinity("route")).affinity.token("app", b)  # type: ignore[union-attr]  # same in every replica
    assert affinity.token("other", b) != token_b
    assert affinity.order("app", [a, b, c], head()) == ([a, b, c], None)  # no cookie: balanced
    sticky = head(headers=((b"Cookie", b"x=1; route=" + token_b),))
    assert affinity.order("app", [c, a, b], sticky) == ([b, c, a], token_b)
    assert affinity.set_cookie("app", b, token_b) == b""  # it already names the endpoint that served
    assert affinity.order("app", [a, c], sticky) == ([a, c], token_b)  # b is gone: balanced as usual
    assert affinity.set_cookie("app", a, token_b) == (
        b"Set-Cookie: route=" + affinity.token("app", a) + b"; Path=/; HttpOnly; Max-Age=60\r\n"
    )


TRUSTED = RealIp((ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32")))


@pytest.mark.parametrize(("peer", "forwarded", "client", "full_chain"), [
    (b"127.0.0.1", b"203.0.113.7", b"203.0.113.7", b"203.0.113.7, 127.0.0.1"),  # a trusted load balancer in front
    (b"127.0.0.1", b"198.51.100.1, 203.0.113.7, 10.1.1.1", b"203.0.113.7",  # rightmost untrusted hop
     b"198.51.100.1, 203.0.113.7, 10.1.1.1, 127.0.0.1"),
    (b"127.0.0.1", b"10.2.2.2, 10.1.1.1", b"10.2.2.2", b"10.2.2.2, 10.1.1.1, 127.0.0.1"),  # all trusted: the leftmost
    (b"127.0.0.1", b"junk, 203.0.113.7", b"203.0.113.7", b"junk, 203.0.113.7, 127.0.0.1"),
    (b"127.0.0.1", b"203.0.113.7, junk", b"127.0.0.1", b"203.0.113.7, junk, 127.0.0.1"),  # no address: trust stops
    (b"127.0.0.1", None, b"127.0.0.1", b"127.0.0.1"),
    (b"192.0.2.9", b"10.9.9.9", b"192.0.2.9", b"192.0.2.9"),  # an untrusted peer cannot claim an address: dropped
])  # fmt: skip
def test_trusted_forwarded_for(peer: bytes, forwarded: bytes | None, client: bytes, full_chain: bytes) -> None:
    """X-Real-IP is the client found; X-Forwarded-For is that client alone (ingress-nginx's default),
    or with compute-full-forwarded-for the trusted chain plus the peer; never an untrusted chain."""
    request = head(headers=((b"X-Forwarded-For", forwarded),) if forwarded is not None else ())
    for real_ip, sent in ((TRUSTED, client), (dataclasses.replace(TRUSTED, compute_full_forwarded_for=True), full_chain)):
        found, forwarded_for = forwarded_client(real_ip, peer, request)
        assert found == client
        wire = upstream_request_head(request, peer, b"https", b"127.0.0.1:8443", real_ip=found, forwarded_for=forwarded_for)
        assert b"\r\nX-Real-IP: " + found + b"\r\n" in wire and b"\r\nX-Forwarded-For: " + sent + b"\r\n" in wire
        assert wire.count(b"X-Forwarded-For") == 1


@pytest.mark.parametrize(("canary", "headers", "draw", "chosen"), [
    (Canary("c", weight=10), (), 0.0999, "c"),
    (Canary("c", weight=10), (), 0.1, "main"),
    (Canary("c", weight=5, weight_total=1000), (), 0.00499, "c"),  # canary-weight-total: 5 in 1000
    (Canary("c", weight=5, weight_total=1000), (), 0.005, "main"),
    (Canary("c", weight=1, weight_total=1), (), 0.99999, "c"),
    (Canary("c", weight=0), (), 0.0, "main"),
    (Canary("c", weight=100, header="X-Canary"), ((b"x-canary", b"never"),), 0.0, "main"),  # header first
    (Canary("c", weight=0, header="X-Canary"), ((b"X-Canary", b"always"),), 0.5, "c"),
    (Canary("c", weight=0, header="X-Group", header_value="beta"), ((b"x-group", b"beta"),), 0.5, "c"),
    (Canary("c", weight=100, header="X-Group", header_value="beta"), ((b"x-group", b"alpha"),), 0.5, "c"),  # no match: weight
    (Canary("c", weight=0, cookie="canary"), ((b"cookie", b"a=1; canary=always"),), 0.5, "c"),
    (Canary("c", weight=100, cookie="canary"), ((b"cookie", b"canary=never"),), 0.0, "main"),
])  # fmt: skip
def test_canary_choice(canary: Canary, headers: tuple, draw: float, chosen: str) -> None:
    assert chosen_backend(compiled(canary=canary), "main", head(headers=headers), draw) == chosen
