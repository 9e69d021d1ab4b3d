"""Client certificate settings of a host, checked the same way for both producers.

The routes file (`client_auth:` under a route entry) and the translator (ingress-nginx
`auth-tls-*` annotations) read their own spellings and call these, so the same values give the
same `ClientAuth` and the same refusals. Each check raises ValueError with the fix in its text.
A verify mode of `off` means no client auth at all: `client_auth` returns None for it, and a
subject pattern with it is refused (nothing would be matched; ingress-nginx would answer every
request 403, since `$ssl_client_s_dn` is then empty).
"""

from __future__ import annotations

import re

from config.model import ClientAuth, ClientVerify
from config.route_policy import PolicyValueError, check_redirect_location, check_regex

VERIFY_MODES = {mode.value: mode for mode in ClientVerify}
DEFAULT_DEPTH = 1  # ingress-nginx's auth-tls-verify-depth default (OpenSSL 3: one intermediate allowed)
MAX_DEPTH = 100  # OpenSSL's own default verify depth; a chain longer than that is not a real PKI


def parse_verify(text: str) -> ClientVerify:
    mode = VERIFY_MODES.get(text.strip().lower())
    if mode is None:
        raise ValueError(f"{text!r} is not a verify mode (use on, optional, optional_no_ca or off)")
    return mode


def check_depth(depth: int) -> int:
    if not 0 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth {depth} is out of range (0 to {MAX_DEPTH}; the intermediates allowed below a CA of the bundle)")
    return depth


def check_error_page(location: str) -> str:
    """An http(s) URL or a path (PolicyValueError otherwise, as for a redirect's location)."""
    return check_redirect_location(location.strip())


def compile_match_subject(pattern: str) -> re.Pattern[str]:
    """The subject DN regex, compiled once (PolicyValueError when `check_regex` refuses it: the
    pattern meets the certificate's subject, which a client chooses, as a path regex meets a path)."""
    if not pattern:
        raise PolicyValueError("the pattern is empty", "write a regex such as CN=(alice|bob)\\.example, or remove the key")
    if not all(" " <= character <= "~" for character in pattern):
        raise PolicyValueError(
            f"{pattern!r} holds a control or non-ASCII character, which the printed DN never does (OpenSSL escapes them)",
            "write the escape as the DN shows it, e.g. \\\\C3\\\\BC for ü",
        )
    check_regex(pattern)
    return re.compile(pattern)


def check_match_subject_with(verify: ClientVerify) -> None:
    """ValueError when a subject pattern comes with verify `off`."""
    if verify is ClientVerify.OFF:
        raise ValueError("a subject pattern needs verify on, optional or optional_no_ca (off asks for no certificate)")


def client_auth(
    ca_pem: bytes,
    verify: ClientVerify,
    depth: int,
    pass_certificate: bool,
    error_page: str | None = None,
    match_subject: re.Pattern[str] | None = None,
) -> ClientAuth | None:
    """The host's setting; None when `verify` is off (nothing is asked for)."""
    if match_subject is not None:
        check_match_subject_with(verify)
    if verify is ClientVerify.OFF:
        return None
    return ClientAuth(ca_pem, verify, check_depth(depth), pass_certificate, error_page, match_subject)
