"""The routing rules both route producers apply: path types, path checks, conflicts, table order.

Theory of operation
-------------------
The routes file (`config.routes_file`) and the Kubernetes translator (`ingress_watch.translate`)
turn different spellings into one `RouteTable`. Whatever decides *which requests a rule matches*
and *what happens when two rules match the same requests* lives here, so the two producers cannot
disagree (they used to: `/foo` → one and `/foo/` → two on one host loaded from a routes file, and
the translator called the same pair a conflict).

The rules (Ingress v1 and ingress-nginx, shared/NOTES.md §4):

- A path starts with "/", whatever its type (ImplementationSpecific is matched like Prefix); a
  regex path (policy `regex`, ingress-nginx `use-regex`) too, because it is anchored at the start
  of the request path.
- Two rules on one host are *the same rule* when `proxy.router` would send exactly the same
  requests to them: Exact compares the whole path, so its key is the path; Prefix and
  ImplementationSpecific ignore a trailing "/" (ingress-nginx: `/foo` and `/foo/` are the same
  Prefix path), so theirs is the path without it; a regex path is its own key (text equality: the
  equivalence of two regular expressions is not decidable cheaply, and ingress-nginx does the same).
- The same rule twice with the same backend and policy is redundant: kept once, no problem. The
  same rule with a different backend or policy is a conflict: the first one fed wins and the
  producer reports the second. Producers feed rules in priority order: the routes file in file
  order, the translator oldest Ingress first. How a producer reports differs only as its contract
  does: a routes file with any problem is refused as a whole; a conflicting Ingress path is left
  out and the rest is served.
- A canary (ingress-nginx `canary: "true"`, routes-file `policy.canary`) is not a rule of its own:
  it attaches a weighted alternative backend to the rule with its match key, so it never
  conflicts; a canary with no such rule is reported and ignored.
- The resulting table is canonical: hosts sorted, rules sorted by (path, type), so equal input in
  any order (or from either producer) gives equal tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from config.model import ClientAuth, Hsts, PathRule, PathType, VirtualHost

PATH_TYPES = {path_type.value: path_type for path_type in PathType}


class RuleError(ValueError):
    """A path or path type that cannot be used; the message says how to fix it."""


def parse_path_type(text: str) -> PathType:
    try:
        return PATH_TYPES[text]
    except KeyError:
        raise RuleError(f"{text!r} is not a path type (use Exact, Prefix or ImplementationSpecific)") from None


def check_path(path: str, path_type: PathType) -> None:
    if not path.startswith("/"):
        raise RuleError(f"{path_type.value} paths start with '/' (write '/{path}')")


MatchKey = tuple[str, str]


def match_key(rule: PathRule) -> MatchKey:
    """Rules with one key match exactly the same requests in `proxy.router`."""
    if rule.policy is not None and rule.policy.regex:
        return ("regex", rule.path)
    if rule.path_type is PathType.EXACT:
        return ("exact", rule.path)
    return ("prefix", rule.path.rstrip("/"))


@dataclass(frozen=True)
class Conflict:
    """`rule` matches the same requests as the earlier `winner` but routes them differently."""

    rule: PathRule
    winner: PathRule
    winner_origin: str  # who routed the winner: "the rule at routes.yaml:4:5" or "Ingress ns/name"

    def describe(self, host: str) -> str:
        """"path '/a/' (Prefix) on host 'x' is already routed to B by <origin> (as '/a', the same path)"."""
        text = (
            f"path {self.rule.path!r} ({self.rule.path_type.value}) on host {host or '*'!r} is already routed to "
            f"{self.winner.backend}"
        )
        if self.winner.backend == self.rule.backend:
            text += " with a different policy"
        text += f" by {self.winner_origin}"
        if (self.winner.path, self.winner.path_type) != (self.rule.path, self.rule.path_type):
            text += f" (as {self.winner.path!r} ({self.winner.path_type.value}), which matches the same requests)"
        return text


class HostTable:
    """Path rules per host pattern, first come first served (feed them in priority order)."""

    def __init__(self) -> None:
        self._rules: dict[str, dict[MatchKey, tuple[PathRule, str]]] = {}

    def add(self, host: str, rule: PathRule, origin: str) -> Conflict | None:
        """File `rule` under `host`; a Conflict (and nothing filed) when an earlier rule differs."""
        rules = self._rules.setdefault(host, {})
        winner, winner_origin = rules.setdefault(match_key(rule), (rule, origin))
        if winner is rule or (winner.backend == rule.backend and winner.policy == rule.policy):
            return None
        return Conflict(rule, winner, winner_origin)

    def find(self, host: str, rule: PathRule) -> PathRule | None:
        """The filed rule that matches the same requests as `rule`, if any."""
        found = self._rules.get(host, {}).get(match_key(rule))
        return found[0] if found else None

    def replace(self, host: str, rule: PathRule) -> None:
        """Put `rule` in place of the filed rule with its match key (e.g. to attach a canary)."""
        rules = self._rules[host]
        key = match_key(rule)
        rules[key] = (rule, rules[key][1])

    def hosts(self) -> list[str]:
        return sorted(self._rules)

    def rules(self, host: str) -> tuple[PathRule, ...]:
        return tuple(sorted((rule for rule, _ in self._rules.get(host, {}).values()), key=_rule_order))

    def virtual_hosts(
        self,
        redirect_to_https: dict[str, bool],
        hsts: dict[str, Hsts | Literal[False]] | None = None,
        client_auth: dict[str, ClientAuth | None] | None = None,
    ) -> tuple[VirtualHost, ...]:
        """Hosts with at least one rule, sorted, each with its redirect flag (absent: False), its
        own HSTS (absent: the configuration's) and its client certificate auth (absent: none)."""
        own = hsts or {}
        auth = client_auth or {}
        return tuple(
            VirtualHost(
                host, rules, redirect_to_https=redirect_to_https.get(host, False), hsts=own.get(host),
                client_auth=auth.get(host),
            )
            for host in self.hosts()
            if (rules := self.rules(host))
        )


def _rule_order(rule: PathRule) -> tuple[str, str, str]:
    return (rule.path, rule.path_type.value, rule.backend)
