"""Every Ingress v1 matching rule (shared/NOTES.md §4) as a table case."""

import pytest

from config.model import PathRule, PathType, RouteTable, VirtualHost
from proxy.router import Router, normalize_host

E, P, I = PathType.EXACT, PathType.PREFIX, PathType.IMPLEMENTATION_SPECIFIC


def table(*hosts: tuple[str, list[tuple[str, PathType, str]]], default: str | None = None) -> RouteTable:
    return RouteTable(
        virtual_hosts=tuple(
            VirtualHost(host, tuple(PathRule(path, kind, backend) for path, kind, backend in rules))
            for host, rules in hosts
        ),
        backends=(),
        default_backend=default,
    )


PREFIX_AAA = table(("", [("/aaa", P, "aaa")]))
CASES = {
    # Prefix is element-wise on "/"
    "prefix-equal": (PREFIX_AAA, "x", "/aaa", "aaa"),
    "prefix-trailing-slash-request": (PREFIX_AAA, "x", "/aaa/", "aaa"),
    "prefix-subpath": (PREFIX_AAA, "x", "/aaa/x", "aaa"),
    "prefix-not-string-prefix": (PREFIX_AAA, "x", "/aaaccc", None),
    "prefix-rule-trailing-slash-ignored": (table(("", [("/aaa/", P, "a")])), "x", "/aaa", "a"),
    "prefix-root-matches-all": (table(("", [("/", P, "root")])), "x", "/any/thing", "root"),
    "prefix-case-sensitive": (PREFIX_AAA, "x", "/AAA", None),
    "implementation-specific-like-prefix": (table(("", [("/app", I, "app")])), "x", "/app/x", "app"),
    "implementation-specific-element-wise": (table(("", [("/app", I, "app")])), "x", "/apple", None),
    # Exact
    "exact-match": (table(("", [("/foo", E, "f")])), "x", "/foo", "f"),
    "exact-slash-sensitive": (table(("", [("/foo", E, "f")])), "x", "/foo/", None),
    "exact-case-sensitive": (table(("", [("/foo", E, "f")])), "x", "/FOO", None),
    # Longest wins; Exact beats Prefix on a tie
    "longest-prefix-wins": (table(("", [("/", P, "root"), ("/a/b", P, "ab"), ("/a", P, "a")])), "x", "/a/b/c", "ab"),
    "shorter-prefix-when-longer-misses": (table(("", [("/a/b", P, "ab"), ("/a", P, "a")])), "x", "/a/bc", "a"),
    "exact-beats-prefix-on-tie": (table(("", [("/foo", P, "prefix"), ("/foo", E, "exact")])), "x", "/foo", "exact"),
    "prefix-beats-shorter-exact": (table(("", [("/foo", E, "exact"), ("/foo/bar", P, "prefix")])), "x", "/foo/bar", "prefix"),
    "exact-with-slash-beats-prefix": (table(("", [("/foo/", E, "exact"), ("/foo", P, "prefix")])), "x", "/foo/", "exact"),
    # Hosts
    "precise-host": (table(("foo.com", [("/", P, "foo")])), "foo.com", "/", "foo"),
    "host-case-insensitive": (table(("foo.com", [("/", P, "foo")])), "FoO.CoM", "/", "foo"),
    "host-port-stripped": (table(("foo.com", [("/", P, "foo")])), "foo.com:8443", "/", "foo"),
    "host-trailing-dot": (table(("foo.com", [("/", P, "foo")])), "foo.com.", "/", "foo"),
    "other-host-404": (table(("foo.com", [("/", P, "foo")])), "bar.com", "/", None),
    "wildcard-one-label": (table(("*.foo.com", [("/", P, "w")])), "bar.foo.com", "/", "w"),
    "wildcard-not-apex": (table(("*.foo.com", [("/", P, "w")])), "foo.com", "/", None),
    "wildcard-not-two-labels": (table(("*.foo.com", [("/", P, "w")])), "a.b.foo.com", "/", None),
    "precise-beats-wildcard": (table(("*.foo.com", [("/", P, "w")]), ("bar.foo.com", [("/", P, "p")])), "bar.foo.com", "/", "p"),
    "wildcard-beats-any": (table(("", [("/", P, "any")]), ("*.foo.com", [("/", P, "w")])), "x.foo.com", "/", "w"),
    "empty-host-matches-any": (table(("", [("/", P, "any")])), "whatever.example", "/", "any"),
    "ipv6-host-header": (table(("", [("/", P, "any")])), "[::1]:8443", "/", "any"),
    # Misses
    "miss-uses-default-backend": (table(("foo.com", [("/a", P, "a")]), default="dflt"), "foo.com", "/b", "dflt"),
    "unknown-host-uses-default-backend": (table(("foo.com", [("/", P, "a")]), default="dflt"), "bar.com", "/", "dflt"),
    "no-rules-no-default-404": (table(), "foo.com", "/", None),
}


@pytest.mark.parametrize("routes, host, path, expected", CASES.values(), ids=CASES.keys())
def test_route(routes: RouteTable, host: str, path: str, expected: str | None) -> None:
    assert Router(routes).route(host, path).backend == expected


@pytest.mark.parametrize(
    "header, expected",
    [("Foo.COM", "foo.com"), ("foo.com:80", "foo.com"), ("[::1]:443", "[::1]"), ("[::1]", "[::1]"), ("a.b.", "a.b")],
)
def test_normalize_host(header: str, expected: str) -> None:
    assert normalize_host(header) == expected
