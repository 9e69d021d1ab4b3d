"""TLS policy settings → checked `TlsPolicy` values, and applying one to a context.

Both route sources (routes file, ConfigMap) call these checks, and the data plane applies a policy
with `apply_policy`, the same function the checks run on a throwaway context: a name is accepted
exactly when this OpenSSL accepts it. OpenSSL itself is lax in ways that would hide typos:
`SSL_CTX_set_cipher_list` ignores unknown names as long as one name matched, and
`SSL_CTX_set_ciphersuites` ignores unknown suites entirely. So every element of a list is tried
on its own, and each one that selects nothing is reported by name (all of them at once), never
silently dropped. Checks raise `PolicyError` whose text is one line with the fix; the caller adds
where the setting is (FILE:LINE:COL, or the ConfigMap key).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from OpenSSL import SSL
from OpenSSL._util import lib

from config.model import TlsPolicy, TlsVersion
from proxy.tls import libssl

_SEPARATORS = re.compile(r"[:,; ]+")  # what OpenSSL's cipher-string parser splits on
_CIPHER_DIRECTIVE = re.compile(r"@(STRENGTH|SECLEVEL=[0-5])")
_VERSIONS = {version.value.lower(): version for version in TlsVersion}
_PROTOCOL_CONSTANTS = {TlsVersion.TLS1_2: SSL.TLS1_2_VERSION, TlsVersion.TLS1_3: SSL.TLS1_3_VERSION}
_OLD_VERSIONS = ("sslv2", "sslv3", "tlsv1", "tlsv1.0", "tlsv1.1")


class PolicyError(ValueError):
    """A policy setting OpenSSL (or we) would not accept; str() says what and how to fix it.

    `unknown` holds the list elements at fault when the fault is names OpenSSL does not know, so a
    caller with a YAML list can point at each one.
    """

    def __init__(self, message: str, unknown: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.unknown = tuple(unknown)


def apply_policy(context: SSL.Context, policy: TlsPolicy) -> None:
    """Set versions, ciphers, TLS 1.3 suites and groups on `context` (ALPN: proxy/contexts.py)."""
    context.set_min_proto_version(_PROTOCOL_CONSTANTS[policy.min_version])
    context.set_max_proto_version(_PROTOCOL_CONSTANTS[policy.max_version])
    context.set_cipher_list(policy.ciphers.encode("ascii"))
    if not lib.SSL_CTX_set_ciphersuites(context._context, policy.ciphersuites.encode("ascii")):
        raise SSL.Error(f"no TLS 1.3 suite in {policy.ciphersuites!r}")
    libssl.set_groups(context, policy.curves)


def _elements(text: str) -> list[str]:
    return [element for element in _SEPARATORS.split(text.strip()) if element]


def _ascii(text: str, what: str) -> None:
    if not text.isascii():
        raise PolicyError(f"{what} {text!r} is not ASCII (OpenSSL names are plain ASCII)")


def check_version(text: str) -> TlsVersion:
    version = _VERSIONS.get(text.strip().lower())
    if version is not None:
        return version
    if text.strip().lower() in _OLD_VERSIONS:
        raise PolicyError(f"{text!r} is not supported: TLS 1.1 and older are deprecated (RFC 8996) (use TLSv1.2 or TLSv1.3)")
    raise PolicyError(f"{text!r} is not a TLS version (use TLSv1.2 or TLSv1.3)")


def check_protocols(text: str) -> tuple[TlsVersion, TlsVersion]:
    """ingress-nginx's `ssl-protocols` ("TLSv1.2 TLSv1.3") → (min, max); the versions must be adjacent."""
    words = text.split()
    if not words:
        raise PolicyError("the list is empty (write TLSv1.2 TLSv1.3)")
    problems, versions = [], []
    for word in words:
        try:
            versions.append(check_version(word))
        except PolicyError as error:
            problems.append(str(error))
    if problems:
        raise PolicyError("; ".join(problems))
    order = list(TlsVersion)
    return min(versions, key=order.index), max(versions, key=order.index)


@functools.lru_cache(maxsize=64)  # pure, and both sources re-check unchanged text on every load
def check_ciphers(text: str, ciphersuites_setting: str) -> str:
    """An OpenSSL TLS 1.2 cipher string; each name, alias or `A+B` combination must select something."""
    elements = _elements(text)
    if not elements:
        raise PolicyError("the cipher list is empty (name at least one, e.g. ECDHE-RSA-AES128-GCM-SHA256)")
    unknown: list[str] = []
    probe = SSL.Context(SSL.TLS_SERVER_METHOD)
    for element in elements:
        _ascii(element, "cipher")
        if _CIPHER_DIRECTIVE.fullmatch(element):
            continue
        name = element.lstrip("!+-")
        try:
            probe.set_cipher_list(name.encode("ascii"))
        except SSL.Error:
            unknown.append(element)
    suites = [element for element in unknown if element.startswith("TLS_")]
    if suites:
        kind = "is a TLS 1.3 suite" if len(suites) == 1 else "are TLS 1.3 suites"
        raise PolicyError(f"{', '.join(suites)} {kind} (list TLS 1.3 suites under {ciphersuites_setting})", suites)
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        raise PolicyError(f"unknown cipher {names} (OpenSSL's names are listed by `openssl ciphers -v ALL`)", unknown)
    joined = ":".join(elements)
    try:
        probe.set_cipher_list(joined.encode("ascii"))
    except SSL.Error:
        raise PolicyError(f"{joined!r} leaves no TLS 1.2 cipher enabled (remove the exclusions that remove everything)") from None
    return joined


@functools.lru_cache(maxsize=64)  # pure, and both sources re-check unchanged text on every load
def check_ciphersuites(text: str) -> str:
    """TLS 1.3 suite names (exact, case-sensitive, as in `openssl ciphers -s -tls1_3`)."""
    elements = _elements(text)
    if not elements:
        raise PolicyError("the TLS 1.3 suite list is empty (e.g. TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384)")
    probe = SSL.Context(SSL.TLS_SERVER_METHOD)
    unknown = []
    for element in elements:
        _ascii(element, "TLS 1.3 suite")
        if not lib.SSL_CTX_set_ciphersuites(probe._context, element.encode("ascii")):
            unknown.append(element)
    lib.ERR_clear_error()
    if unknown:
        known = "TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256, TLS_AES_128_CCM_SHA256"
        raise PolicyError(f"unknown TLS 1.3 suite {', '.join(repr(name) for name in unknown)} (use some of {known})", unknown)
    return ":".join(elements)


@functools.lru_cache(maxsize=64)  # pure, and both sources re-check unchanged text on every load
def check_curves(text: str) -> str:
    """Key-exchange groups by OpenSSL name (X25519, P-256 = prime256v1, P-384 = secp384r1, ...)."""
    elements = _elements(text)
    if not elements:
        raise PolicyError("the curve list is empty (e.g. X25519:P-256:P-384)")
    probe = SSL.Context(SSL.TLS_SERVER_METHOD)
    unknown = []
    for element in elements:
        _ascii(element, "curve")
        try:
            libssl.set_groups(probe, element)
        except SSL.Error:
            unknown.append(element)
    lib.ERR_clear_error()
    if unknown:
        raise PolicyError(f"unknown curve {', '.join(repr(name) for name in unknown)} (use names like X25519, P-256, P-384)", unknown)
    return ":".join(elements)


SPOKEN_PROTOCOLS = ("h2", "http/1.1")  # what the data plane can serve after the handshake


def check_alpn(names: Sequence[str]) -> tuple[str, ...]:
    """Protocol names we offer, in our order of preference: only ones we speak."""
    if not names:
        raise PolicyError("the ALPN list is empty (write [h2, http/1.1], or [http/1.1] to turn HTTP/2 off)")
    for name in names:
        if name not in SPOKEN_PROTOCOLS:
            raise PolicyError(f"ALPN name {name!r} is not a protocol we speak (use {', '.join(SPOKEN_PROTOCOLS)})")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise PolicyError(f"{', '.join(duplicates)} listed twice (keep one)")
    return tuple(names)


def check_policy(policy: TlsPolicy, versions_setting: str) -> None:
    """Cross-field rule: the version range must not be empty."""
    order = list(TlsVersion)
    if order.index(policy.min_version) > order.index(policy.max_version):
        raise PolicyError(f"the minimum version {policy.min_version.value} is above the maximum {policy.max_version.value} (fix {versions_setting})")
