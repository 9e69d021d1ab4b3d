"""Ingress v1 request matching, compiled from a RouteTable once per published generation.

Host: the Host header, lower-cased, port stripped. A precise host beats a `*.one-label`
wildcard, which beats the catch-all (empty host). The chosen virtual host decides alone: a path
that misses there falls to the default backend (like ingress-nginx), not to a less specific host.

Path (on the path only, never the query): `Exact` compares the whole path, case- and
slash-sensitive. `Prefix` and `ImplementationSpecific` (ours: same as Prefix) compare element-wise
on `/`: `/aaa` matches `/aaa`, `/aaa/` and `/aaa/x`, never `/aaaccc`; a trailing `/` on the rule
is ignored. The longest match wins; on a tie Exact beats Prefix. An Exact match is always the
longest possible (no prefix can be longer than the path it matches), so Exact is tried first.

Regex rules (policy `regex`, ingress-nginx `use-regex`) are tried after Exact and before Prefix,
longest pattern first, as nginx tries `~*` locations before plain prefix ones and ingress-nginx
orders paths by length; each is anchored at the start of the path and case-insensitive.

A rule's policy is compiled here (`proxy.policy.CompiledPolicy`) and returned with the backend; a
rule without one returns None, so the exchange does no policy work for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from config.model import PathRule, PathType, RouteTable, VirtualHost
from proxy.policy import CompiledPolicy

Target = tuple[str, CompiledPolicy | None]  # backend name, the rule's policy


@dataclass(frozen=True, slots=True)
class RouteMatch:
    virtual_host: VirtualHost | None  # None: no virtual host matched (default backend or 404)
    backend: str | None  # None: nothing matched and there is no default backend → 404
    policy: CompiledPolicy | None = None  # the matched rule's policy; None for none (and for the default backend)


def _target(rule: PathRule) -> Target:
    return (rule.backend, CompiledPolicy(rule) if rule.policy is not None else None)


class _CompiledHost:
    __slots__ = ("virtual_host", "exact", "regexes", "prefixes")

    def __init__(self, virtual_host: VirtualHost) -> None:
        self.virtual_host = virtual_host
        self.exact: dict[str, Target] = {}
        by_prefix: dict[str, Target] = {}
        regexes: list[tuple[str, CompiledPolicy, str]] = []
        for rule in virtual_host.paths:  # first rule wins on duplicates, as sources order by priority
            target = _target(rule)
            policy = target[1]
            if policy is not None and rule.policy is not None and rule.policy.regex:
                regexes.append((rule.path, policy, rule.backend))
            elif rule.path_type is PathType.EXACT:
                self.exact.setdefault(rule.path, target)
            else:
                by_prefix.setdefault(rule.path.rstrip("/"), target)
        self.regexes: tuple[tuple[CompiledPolicy, Target], ...] = tuple(
            (policy, (backend, policy)) for _, policy, backend in sorted(regexes, key=lambda item: -len(item[0]))
        )
        # Longest first; "" (the rule "/") matches every path and so comes last.
        self.prefixes: tuple[tuple[str, Target], ...] = tuple(
            sorted(by_prefix.items(), key=lambda item: len(item[0]), reverse=True)
        )

    def match(self, path: str) -> Target | None:
        target = self.exact.get(path)
        if target is not None:
            return target
        for policy, target in self.regexes:
            if policy.matches(path):
                return target
        for prefix, target in self.prefixes:
            if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
                return target
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
        target = compiled.match(path)
        if target is None:
            return RouteMatch(compiled.virtual_host, self._default_backend)
        return RouteMatch(compiled.virtual_host, target[0], target[1])
