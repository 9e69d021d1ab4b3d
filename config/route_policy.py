"""Checks for per-route policy values, shared by the routes file and the Kubernetes translator.

Each function takes the text (or number) as written and returns the model value, or raises
`PolicyValueError` whose message says what is wrong and how to fix it; the producer adds the
location (FILE:LINE:COL, or the Ingress and annotation). `RoutePolicyBuilder`-free on purpose:
each producer assembles `config.model.RoutePolicy` from these values in its own spelling.

Regex safety. Python's `re` is a backtracking engine (no RE2 here), so a path like `(a+)+$` can take
exponential time on a crafted request path. Patterns are refused, not timed: `check_regex` parses
the pattern with the standard library's own parser and rejects (1) a repeat inside a repeat
(`(a+)+`, `(.*)*`), (2) an alternation inside a repeat (`(a|ab)*`), (3) backreferences and
look-arounds (not regular, and not in RE2 either), (4) more than `MAX_LONG_REPEATS` long repeats
(`*`, `+`, `{n,}` or a bound over `LONG_REPEAT`: `.*.*.*x` is O(n³)) and (5) patterns over
`MAX_REGEX_LENGTH`. What is left matches an anchored path in O(n²) at worst, and the router only
matches paths up to `MAX_REGEX_SUBJECT` characters against regex rules (a longer path matches no
regex rule), so one request costs at most a few million steps. The ingress-nginx idioms
`/api(/|$)(.*)`, `/(.+)/v1/(.*)`, `/app/?(.*)` all pass.
"""

from __future__ import annotations

import ipaddress
import re
import re._constants as sre_constants  # type: ignore[import-not-found]
import re._parser as sre_parser  # type: ignore[import-not-found]
import urllib.parse
from collections.abc import Iterable
from typing import Any

from config.model import HeaderEdits, IpNetwork

MAX_REGEX_LENGTH = 256  # ingress-nginx paths seen in practice are < 100; longer ones are generated and suspect
MAX_LONG_REPEATS = 2  # two are O(n²) on an anchored match; ingress-nginx idioms use one or two
LONG_REPEAT = 16  # a repeat allowing more than this many items counts as long
MAX_REGEX_SUBJECT = 2048  # request paths longer than this match no regex rule (bounds the O(n²))
REDIRECT_CODES = (301, 302, 303, 307, 308)  # ingress-nginx accepts any 3xx; these are the ones that redirect
SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}  # nginx size syntax: 8k, 1m, 1g (case-insensitive)
_SIZE = re.compile(r"(\d+)([kmg]?)", re.IGNORECASE)
_GROUP_REFERENCE = re.compile(r"\$(\d)")
_UNSAFE_IN_HEADER = re.compile(r"[\x00-\x1f\x7f]")

_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.POSSESSIVE_REPEAT}
_REFUSED = {
    sre_constants.GROUPREF: "backreferences",
    sre_constants.GROUPREF_EXISTS: "conditional groups",
    sre_constants.ASSERT: "look-ahead/look-behind",
    sre_constants.ASSERT_NOT: "negative look-ahead/look-behind",
}


class PolicyValueError(ValueError):
    """A policy value that cannot be used: what is wrong, and how to fix it (each producer words
    the pair its own way: "what; fix" for Kubernetes Events, "what (fix)" in routes-file lines)."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; {fix}")
        self.problem = problem
        self.fix = fix


def parse_size(raw: str | int) -> int | None:
    """nginx size syntax (`1m`, `512k`, `1048576`) → bytes; 0 means no limit (None), as in nginx."""
    match = _SIZE.fullmatch(str(raw).strip())
    if match is None:
        raise PolicyValueError(f"{raw!r} is not a size", "write bytes or a number with k, m or g (e.g. 8m), 0 for no limit")
    size = int(match[1]) * SIZE_UNITS[match[2].lower()]
    return size or None


def parse_timeout(raw: str | int | float) -> float:
    """Seconds: ingress-nginx writes integers ("60"), the routes file numbers; "60s" is accepted too."""
    text = str(raw).strip().removesuffix("s")
    try:
        seconds = float(text)
    except ValueError:
        raise PolicyValueError(f"{raw!r} is not a number of seconds", "write e.g. 30") from None
    if not (0 < seconds < 86_400):
        raise PolicyValueError(f"{raw!r} is not between 0 and a day", "write a positive number of seconds, e.g. 30")
    return seconds


def parse_networks(items: Iterable[str]) -> tuple[IpNetwork, ...]:
    """CIDRs or single addresses (`10.0.0.0/8`, `192.168.1.7`, `fd00::/8`) → networks, in order."""
    networks = []
    for item in items:
        text = item.strip()
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise PolicyValueError(f"{text!r} is not an IP address or CIDR", "write e.g. 10.0.0.0/8 or 2001:db8::/32") from None
    if not networks:
        raise PolicyValueError("the list is empty", "name at least one CIDR, or remove the key")
    return tuple(networks)


def split_list(raw: str) -> list[str]:
    """ingress-nginx list annotations: comma-separated, blanks ignored."""
    return [part.strip() for part in str(raw).split(",") if part.strip()]


def check_regex(pattern: str) -> int:
    """Refuse patterns that could backtrack catastrophically; return the number of capture groups."""
    if len(pattern) > MAX_REGEX_LENGTH:
        raise PolicyValueError(f"the regex is {len(pattern)} characters long, over the {MAX_REGEX_LENGTH} allowed", "shorten it")
    try:
        parsed = sre_parser.parse(pattern)
    except re.error as error:
        raise PolicyValueError(f"{pattern!r} is not a valid regex: {error}", "fix the pattern") from None
    long_repeats = _check_nodes(parsed, pattern, inside_repeat=False)
    if long_repeats > MAX_LONG_REPEATS:
        raise PolicyValueError(
            f"{pattern!r} has {long_repeats} open-ended repeats (*, +, {{n,}}), over the {MAX_LONG_REPEATS} allowed "
            "(each one multiplies the worst-case matching time)",
            "merge them",
        )
    return int(parsed.state.groups) - 1


def _check_nodes(nodes: Any, pattern: str, inside_repeat: bool) -> int:
    """Raise on a refused construct; return how many long repeats the nodes hold."""
    long_repeats = 0
    for opcode, argument in nodes:
        if opcode in _REFUSED:
            raise PolicyValueError(f"{pattern!r} uses {_REFUSED[opcode]}, which are not allowed", "write a plain regex")
        if opcode in _REPEATS:
            low, high, sub = argument
            repeats = high != 1
            if inside_repeat and repeats:
                raise PolicyValueError(
                    f"{pattern!r} nests a repeat inside a repeat (like (a+)+), which can backtrack without end",
                    "flatten it: (a+)+ → a+",
                )
            long_repeats += high > LONG_REPEAT
            long_repeats += _check_nodes(sub, pattern, inside_repeat or repeats)
        elif opcode is sre_constants.SUBPATTERN:
            long_repeats += _check_nodes(argument[-1], pattern, inside_repeat)
        elif opcode is sre_constants.ATOMIC_GROUP:
            long_repeats += _check_nodes(argument, pattern, inside_repeat)
        elif opcode is sre_constants.BRANCH:
            if inside_repeat:
                raise PolicyValueError(
                    f"{pattern!r} repeats an alternation (like (a|ab)*), which can backtrack without end",
                    "use a character class or move the alternation out of the repeat",
                )
            for branch in argument[1]:
                long_repeats += _check_nodes(branch, pattern, inside_repeat)
    return long_repeats


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 field-name
# Names an edit may not touch: they frame the message (RFC 9110 §7.6.1: not the peer's to change) or
# the proxy derives them from the parse (proxy.http1), so an edit would be silently undone or, worse,
# desynchronise framing. Host has its own key (upstream-vhost).
FRAMING_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "content-length",
})  # fmt: skip
DERIVED_REQUEST_HEADERS = frozenset({
    "host", "x-forwarded-for", "x-real-ip", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port", "expect",
})  # fmt: skip


def check_header_edit(name: str, value: str | None, request: bool) -> str:
    """A header name an edit may touch (returned as written), with a value safe to write."""
    if not _TOKEN.fullmatch(name):
        raise PolicyValueError(f"{name!r} is not a header name", "use letters, digits and -")
    lower = name.lower()
    if lower in FRAMING_HEADERS or (request and lower in DERIVED_REQUEST_HEADERS):
        fix = "use upstream_host / upstream-vhost" if lower == "host" else "remove it: the proxy writes this header itself"
        raise PolicyValueError(f"header {name} cannot be edited", fix)
    if value is not None:
        _check_header_safe(value, f"the value of header {name}")
    return name


def parse_header_lines(raw: str) -> tuple[tuple[str, str], ...]:
    """Annotation syntax for header edits: one `Name: value` per line."""
    pairs = []
    for line in str(raw).splitlines():
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise PolicyValueError(f"{line.strip()!r} is not 'Name: value'", "write one 'Name: value' per line")
        pairs.append((name.strip(), value.strip()))
    return tuple(pairs)


def check_rewrite_target(target: str, groups: int) -> str:
    """A path (with `$1`..`$9`) the request path is rewritten to; refs beyond the groups are refused."""
    _check_header_safe(target, "rewrite target")
    if not target.startswith("/"):
        raise PolicyValueError(f"rewrite target {target!r} is not a path", "start it with '/', e.g. /$2")
    for reference in _GROUP_REFERENCE.findall(target):
        if int(reference) > groups:
            raise PolicyValueError(
                f"rewrite target {target!r} uses ${reference} but the path has {groups} capture group(s)",
                "add the group to the path (and enable regex) or fix the reference",
            )
    return target


def header_edits(
    set_pairs: tuple[tuple[str, str], ...], add_pairs: tuple[tuple[str, str], ...], remove: tuple[str, ...], request: bool
) -> HeaderEdits | None:
    """Checked edits (None when there are none); the first bad name or value raises."""
    edits = HeaderEdits(
        set=tuple((check_header_edit(name, value, request), value) for name, value in set_pairs),
        add=tuple((check_header_edit(name, value, request), value) for name, value in add_pairs),
        remove=tuple(check_header_edit(name, None, request) for name in remove),
    )
    return edits if edits != HeaderEdits() else None


_ORIGIN = re.compile(r"https?://(\*\.)?[A-Za-z0-9.-]+(:[0-9]{1,5})?")


def check_cors_origins(origins: Iterable[str]) -> tuple[str, ...]:
    """"*", exact origins (scheme://host[:port]) or scheme://*.domain wildcards."""
    checked = []
    for origin in origins:
        text = origin.strip().rstrip("/")
        if text != "*" and not _ORIGIN.fullmatch(text):
            raise PolicyValueError(f"{origin!r} is not an origin", "write * or e.g. https://app.example.com or https://*.example.com")
        checked.append(text)
    if not checked:
        raise PolicyValueError("no origin given", "write * or a comma-separated list of origins")
    return tuple(checked)


def check_token_list(raw: str, what: str) -> str:
    """A comma-separated list of methods or header names, normalised to "A, B"."""
    items = split_list(raw)
    for item in items:
        if not _TOKEN.fullmatch(item):
            raise PolicyValueError(f"{what} {item!r} is not a token", f"write a comma-separated list of {what}s")
    return ", ".join(items)


def check_positive(raw: str | int | float, what: str, whole: bool = False) -> float:
    text = str(raw).strip()
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise PolicyValueError(f"{what} {raw!r} is not {kind}", f"write {kind} above 0, e.g. 10") from None
    if not value > 0:
        raise PolicyValueError(f"{what} {raw!r} is not above 0", "write a number above 0, e.g. 10; remove the key for no limit")
    return value


def check_weight(raw: str | int | float, total: int) -> int:
    """A canary weight: a whole number from 0 to `total` (ingress-nginx canary-weight, an integer)."""
    text = str(raw).strip()
    if not text.isdigit() or int(text) > total:
        raise PolicyValueError(f"{raw!r} is not from 0 to {total}", f"write a whole number from 0 to {total}")
    return int(text)


def check_weight_total(raw: str | int | float) -> int:
    """The denominator of canary weights (ingress-nginx canary-weight-total; default 100)."""
    text = str(raw).strip()
    if not text.isdigit() or int(text) == 0:
        raise PolicyValueError(f"{raw!r} is not a whole number above 0", "write e.g. 100, or 1000 for weights in tenths of a percent")
    return int(text)


def check_cookie_name(name: str) -> str:
    if not _TOKEN.fullmatch(name):
        raise PolicyValueError(f"{name!r} is not a cookie name", "use letters, digits and -")
    return name


def check_max_age(raw: str | int) -> int:
    text = str(raw).strip()
    if not text.isdigit():
        raise PolicyValueError(f"{raw!r} is not a whole number of seconds", "write e.g. 86400")
    return int(text)


def check_host_value(host: str) -> str:
    """upstream-vhost: a host[:port] written into the Host header as is."""
    if not host or not re.fullmatch(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?", host):
        raise PolicyValueError(f"{host!r} is not a host name or host:port", "write e.g. backend.internal or backend.internal:8080")
    return host


def check_path_value(path: str, what: str) -> str:
    _check_header_safe(path, what)
    if not path.startswith("/"):
        raise PolicyValueError(f"{what} {path!r} does not start with '/'", f"write '/{path}'")
    return path


def check_redirect_location(location: str) -> str:
    """An absolute http(s) URL or a path; control characters would split the response head."""
    _check_header_safe(location, "redirect location")
    if location.startswith("/"):
        return location
    parsed = urllib.parse.urlsplit(location)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise PolicyValueError(f"redirect location {location!r} is neither an http(s) URL nor a path", "write e.g. https://example.com/")
    return location


def check_redirect_code(code: int | str) -> int:
    text = str(code).strip()
    if not text.isdigit() or int(text) not in REDIRECT_CODES:
        raise PolicyValueError(f"redirect code {code!r} does not redirect", f"use one of {', '.join(map(str, REDIRECT_CODES))}")
    return int(text)


def _check_header_safe(value: str, what: str) -> None:
    if _UNSAFE_IN_HEADER.search(value):
        raise PolicyValueError(f"{what} contains a control character (CR, LF, ...)", "remove it")
