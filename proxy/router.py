"""Ingress v1 request matching, compiled from a RouteTable once per published generation.

Host: the Host header, lower-cased, port stripped. A precise host beats a `*.one-label`
wildcard, which beats the catch-all (empty host). The chosen virtual host decides alone: a path
that misses there falls to the default backend (like ingress-nginx), not to a less specific host.

Path (on the path only, never the query): `Exact` compares the whole path, case- and
slash-sensitive. `Prefix` and `ImplementationSpecific` (ours: same as Prefix) compare element-wise
on `/`: `/aaa` matches `/aaa`, `/aaa/` and `/aaa/x`, never `/aaaccc`; a trailing `/` on the rule
is ignored. The longest match wins; on a tie Exact beats Prefix. An Exact match is always the
longest possible (no prefix can be longer than the path it matches), so Exact is tried first.
"""

from __future__ import annotations

from dataclasses import dataclass

from config.model import PathType, RouteTable, VirtualHost


@dataclass(frozen=True)
class RouteMatch:
    virtual_host: VirtualHost | None  # None: no virtual host matched (default backend or 404)
    backend: str | None  # None: nothing matched and there is no default backend → 404


class _CompiledHost:
    __slots__ = ("virtual_host", "exact", "prefixes")

    def __init__(self, virtual_host: VirtualHost) -> None:
        self.virtual_host = virtual_host
        self.exact: dict[str, str] = {}
        by_prefix: dict[str, str] = {}
        for rule in virtual_host.paths:  # first rule wins on duplicates, as sources order by priority
            if rule.path_type is PathType.EXACT:
                self.exact.setdefault(rule.path, rule.backend)
            else:
                by_prefix.setdefault(rule.path.rstrip("/"), rule.backend)
        # Longest first; "" (the rule "/") matches every path and so comes last.
        self.prefixes: tuple[tuple[str, str], ...] = tuple(
            sorted(by_prefix.items(), key=lambda item: len(item[0]), reverse=True)
        )

    def match(self, path: str) -> str | None:
        backend = self.exact.get(path)
        if backend is not None:
            return backend
        for prefix, backend in self.prefixes:
            if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
                return backend
        return None


def normalize_host(host_header: str) -> str:
    """Lower-case, strip the port (also from `[v6]:port`) and a trailing dot."""
    host = host_header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        host = host[: end + 1] if end != -1 else host
    else:
        colon = host.rfind(":")
        if colon != -1:
            host = host[:colon]
    return host.rstrip(".")


class Router:
    def __init__(self, table: RouteTable) -> None:
        self._precise: dict[str, _CompiledHost] = {}
        self._wildcard: dict[str, _CompiledHost] = {}  # keyed by the suffix after "*."
        self._any: _CompiledHost | None = None
        self._default_backend = table.default_backend
        for virtual_host in table.virtual_hosts:
            compiled = _CompiledHost(virtual_host)
            if not virtual_host.host:
                self._any = self._any or compiled
            elif virtual_host.host.startswith("*."):
                self._wildcard.setdefault(virtual_host.host[2:], compiled)
            else:
                self._precise.setdefault(virtual_host.host, compiled)

    def _host(self, host: str) -> _CompiledHost | None:
        found = self._precise.get(host)
        if found is not None:
            return found
        dot = host.find(".")
        if dot > 0:
            found = self._wildcard.get(host[dot + 1 :])
            if found is not None:
                return found
        return self._any

    def route(self, host_header: str, path: str) -> RouteMatch:
        compiled = self._host(normalize_host(host_header))
        if compiled is None:
            return RouteMatch(None, self._default_backend)
        return RouteMatch(compiled.virtual_host, compiled.match(path) or self._default_backend)
