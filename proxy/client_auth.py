"""Client certificates per host (ingress-nginx auth-tls-*): TLS set-up, the verdict, the headers.

Theory of operation
-------------------
A host with `config.model.ClientAuth` gets SNI-selected contexts of its own (proxy/contexts.py):
their certificate store holds the host's CA bundle and their client CA list names it in the
CertificateRequest. The SNI callback that switches a connection to such a context also sets the
connection's verify mode and depth (OpenSSL's `SSL_set_SSL_CTX` copies neither), with a verify
callback that accepts every chain: the handshake never fails for a bad client certificate.
OpenSSL keeps the verification result (`SSL_get_verify_result`, the last error found) and the
peer certificate, and the exchange answers like nginx does after the handshake (`verdict`):

    verify          no certificate                   a certificate that fails
    on              400 No required SSL certificate  400 The SSL certificate error
    optional        passes, ssl-client-verify: NONE  400 The SSL certificate error
    optional_no_ca  passes, NONE                     an unknown issuer passes (FAILED:reason); else 400

nginx logs these as its internal codes 496 and 495 and sends 400 with those texts; so do we.

A host with a subject pattern (`ClientAuth.match_subject`, ingress-nginx `auth-tls-match-cn`)
then searches it in the certificate's subject DN, as ingress-nginx's server-level
`if ($ssl_client_s_dn !~ PATTERN) { return 403 "client certificate unauthorized"; }` does: after
the verdict (a 400 stays a 400), on whatever certificate the verdict let through (optional_no_ca's
unknown issuer too), and on "" when there is none (optional, optional_no_ca, plaintext), which a
pattern like `CN=alice` does not match: 403. The 403 is not sent to the error page (nginx's
`error_page` covers 495/496 only). The DN is OpenSSL's RFC 2253 print (proxy.tls.libssl), the
same bytes as the ssl-client-subject-dn header and as nginx's variable; one longer than
`MAX_REGEX_SUBJECT` matches no pattern (the bound `check_regex` assumes). Decided once per
connection, as the headers are. One exemption, ingress-nginx's since 1.10.1 (its PR 11062): an ACME
HTTP-01 answer (`/.well-known/acme-challenge/TOKEN`) is not judged by the pattern, so cert-manager
can renew the host's certificate; only a path of exactly that shape (TOKEN in base64url, RFC 8555
§8.3) is exempt, so `..`, `%2e` or `//` cannot carry another path past the check to a backend
that would normalise it.

Session resumption keeps working on these hosts, safely. OpenSSL stores the peer certificate and
the verification result in the session, so a resumed connection carries the identity verified by
its full handshake. What must not happen is a session from one host resumed on another whose rules
differ (a session from a host without client auth has no certificate, one from another CA's host
a certificate that CA vouched for). OpenSSL refuses to resume a session whose *session ID
context* differs from the connection's, but it looks the session up before the SNI callback runs,
with the initial context's value. So a ClientHello callback, which runs before the lookup, reads
the SNI and sets the connection's session ID context to a digest of the host's client-auth
settings (`session_id_context`): sessions resume only on hosts with the same CA, mode and depth,
and a changed CA bundle starts afresh. Hosts without client auth keep the shared "ingress-proxy"
context and behave exactly as before.

The SNI that chose the context may differ from the Host a request names (one connection, many
hosts: HTTP/2 coalescing, or a client that lies). A request for a host with client auth on a
connection not verified by that host's settings is answered 421 Misdirected Request, as nginx
does; on a plaintext listener it is judged as a connection without a certificate.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from OpenSSL import SSL, crypto
from OpenSSL._util import ffi, lib

from config.model import ClientAuth, ClientVerify
from config.route_policy import MAX_REGEX_SUBJECT
from config.tls_material import PEM_CERTIFICATE_BLOCK
from proxy.tls.libssl import LIBSSL, address, name_rfc2253

_SID_CTX_LENGTH = 32  # SSL_MAX_SID_CTX_LENGTH
_TLSEXT_TYPE_SERVER_NAME = 0
_SSL_CLIENT_HELLO_SUCCESS = 1
CLIENT_HELLO_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)

LIBSSL.SSL_CTX_set_client_hello_cb.argtypes = (ctypes.c_void_p, CLIENT_HELLO_CALLBACK, ctypes.c_void_p)
LIBSSL.SSL_CTX_set_client_hello_cb.restype = None
LIBSSL.SSL_client_hello_get0_ext.argtypes = (
    ctypes.c_void_p, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)
)
LIBSSL.SSL_client_hello_get0_ext.restype = ctypes.c_int
LIBSSL.SSL_set_session_id_context.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint)
LIBSSL.SSL_set_session_id_context.restype = ctypes.c_int
LIBSSL.SSL_set_verify_depth.argtypes = (ctypes.c_void_p, ctypes.c_int)
LIBSSL.SSL_set_verify_depth.restype = None


# -- the verdict, pure ------------------------------------------------------------------------

# The errors optional_no_ca lets through: an issuer we cannot vouch for (nginx's
# `ngx_ssl_verify_error_optional` list, plus UNABLE_TO_GET_ISSUER_CERT_LOCALLY, which is what a
# client that sends its intermediate from an unknown CA gets); anything else (expired, bad
# signature, chain too long) is refused as in optional.
UNKNOWN_ISSUER_ERRORS = frozenset(
    (
        lib.X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
        lib.X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN,
        lib.X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT,
        lib.X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
        lib.X509_V_ERR_CERT_UNTRUSTED,
        lib.X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE,
    )
)
NO_CERTIFICATE_TEXT = b"400 Bad Request: No required SSL certificate was sent\n"  # nginx 496
CERTIFICATE_ERROR_TEXT = b"400 Bad Request: The SSL certificate error\n"  # nginx 495
MISDIRECTED_TEXT = b"421 Misdirected Request: this host needs a connection made for it (send its name as SNI)\n"
SUBJECT_MISMATCH_TEXT = b"client certificate unauthorized"  # ingress-nginx's `return 403` text, as it sends it


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    body: bytes
    extra: bytes = b""  # header lines: the error page's Location


NO_CERTIFICATE = Refusal(400, NO_CERTIFICATE_TEXT)
CERTIFICATE_ERROR = Refusal(400, CERTIFICATE_ERROR_TEXT)
MISDIRECTED = Refusal(421, MISDIRECTED_TEXT)
SUBJECT_MISMATCH = Refusal(403, SUBJECT_MISMATCH_TEXT)
_ACME_CHALLENGE = re.compile(r"/\.well-known/acme-challenge/[A-Za-z0-9_-]+")  # RFC 8555 §8.3: token is base64url


def is_acme_challenge(path: str) -> bool:
    """An HTTP-01 answer's path, exactly: what the subject pattern lets through (see the theory)."""
    return _ACME_CHALLENGE.fullmatch(path) is not None


def judges_subject(auth: ClientAuth, path: str) -> bool:
    """Whether `answer_for` applies the host's subject pattern to a request for `path`: not to an
    ACME challenge. A host without a pattern runs no regex for it."""
    return auth.match_subject is None or not is_acme_challenge(path)


def verdict(verify: ClientVerify, has_certificate: bool, error: int) -> Refusal | str:
    """The answer for a request on a host with client auth: a Refusal, or the ssl-client-verify
    value it goes upstream with (SUCCESS, NONE, FAILED:<reason>). `error`: OpenSSL's verification
    result (0 = X509_V_OK); without a certificate it is 0."""
    if not has_certificate:
        return NO_CERTIFICATE if verify is ClientVerify.ON else "NONE"
    if error == lib.X509_V_OK:
        return "SUCCESS"
    if verify is ClientVerify.OPTIONAL_NO_CA and error in UNKNOWN_ISSUER_ERRORS:
        return "FAILED:" + verify_error_text(error)
    return CERTIFICATE_ERROR


def verify_error_text(error: int) -> str:
    return ffi.string(lib.X509_verify_cert_error_string(error)).decode("ascii", "replace")


@dataclass(frozen=True, slots=True)
class PresentedCertificate:
    """The client's leaf certificate as the answer uses it: its PEM and its DNs printed as nginx's
    `$ssl_client_s_dn` / `$ssl_client_i_dn` (OpenSSL's RFC 2253 form)."""

    pem: bytes
    subject_dn: bytes
    issuer_dn: bytes


def presented(leaf: crypto.X509) -> PresentedCertificate:
    """From the X509 the handshake kept (parsing a PEM again costs ~6× the printing)."""
    pem = crypto.dump_certificate(crypto.FILETYPE_PEM, leaf)
    return PresentedCertificate(pem, name_rfc2253(leaf), name_rfc2253(leaf, issuer=True))


def subject_matches(pattern: re.Pattern[str], subject_dn: bytes) -> bool:
    """nginx `$ssl_client_s_dn ~ PATTERN`: searched, not anchored; b"" without a certificate. The
    printed DN is ASCII (OpenSSL escapes other bytes), so latin-1 decodes it losslessly."""
    return len(subject_dn) <= MAX_REGEX_SUBJECT and pattern.search(subject_dn.decode("latin-1")) is not None


def certificate_headers(
    verify_value: str, leaf: PresentedCertificate | None, pass_certificate: bool
) -> tuple[tuple[bytes, bytes], ...]:
    """The headers a backend gets (ingress-nginx's names and values): ssl-client-verify always;
    the DNs (as nginx's $ssl_client_s_dn and $ssl_client_i_dn) when there is a certificate; the
    URL-escaped PEM ($ssl_client_escaped_cert) with `pass_certificate`."""
    headers = [(b"ssl-client-verify", verify_value.encode("ascii"))]
    if leaf is not None:
        headers.append((b"ssl-client-subject-dn", leaf.subject_dn))
        headers.append((b"ssl-client-issuer-dn", leaf.issuer_dn))
        if pass_certificate:
            headers.append((b"ssl-client-cert", urllib.parse.quote(leaf.pem, safe="").encode("ascii")))
    return tuple(headers)


def answer_for(
    auth: ClientAuth, error: int, leaf: PresentedCertificate | None, judge_subject: bool
) -> Refusal | tuple[tuple[bytes, bytes], ...]:
    """A connection's answer for its own host: the verdict's refusal (to the error page if the host
    has one), the subject pattern's 403 (unless `judge_subject` is False: an ACME challenge), or
    the headers for the backend."""
    decided = verdict(auth.verify, leaf is not None, error)
    if isinstance(decided, Refusal):
        return to_error_page(decided, auth)
    subject_dn = leaf.subject_dn if leaf is not None else b""
    if judge_subject and auth.match_subject is not None and not subject_matches(auth.match_subject, subject_dn):
        return SUBJECT_MISMATCH
    return certificate_headers(decided, leaf, auth.pass_certificate)


def server_name(extension: bytes) -> bytes | None:
    """The host name in a ClientHello server_name extension body (RFC 6066 §3), None if absent or
    malformed (OpenSSL refuses the malformed ones itself, after this callback)."""
    if len(extension) < 5 or int.from_bytes(extension[:2], "big") != len(extension) - 2:
        return None
    position = 2
    while position + 3 <= len(extension):
        kind, length = extension[position], int.from_bytes(extension[position + 1 : position + 3], "big")
        name = extension[position + 3 : position + 3 + length]
        if len(name) != length:
            return None
        if kind == 0:  # host_name
            return name
        position += 3 + length
    return None


def session_id_context(auth: ClientAuth) -> bytes:
    """Sessions resume only where this digest matches: same CA bundle, mode and depth."""
    digest = hashlib.sha256(b"%s\0%s\0%d" % (auth.ca_pem, auth.verify.value.encode(), auth.depth)).digest()
    return digest[:_SID_CTX_LENGTH]


# -- TLS set-up -------------------------------------------------------------------------------


def ca_certificates(ca_pem: bytes) -> list[crypto.X509]:
    """The certificates of a CA bundle; ValueError (with the reason) when there are none or one
    does not parse. The producers check bundles with this, the contexts load them with it."""
    blocks = PEM_CERTIFICATE_BLOCK.findall(ca_pem)
    if not blocks:
        raise ValueError("no PEM certificate found (a CA bundle is one or more '-----BEGIN CERTIFICATE-----' blocks)")
    try:
        return [crypto.load_certificate(crypto.FILETYPE_PEM, block) for block in blocks]
    except crypto.Error as error:
        raise ValueError(f"a certificate does not parse: {error}") from None


def configure_context(context: SSL.Context, auth: ClientAuth) -> None:
    """A context of a host with client auth: its CA bundle as the store and as the names the
    CertificateRequest lists, its own session ID context, and the settings kept on the context for
    the SNI callback and for `verification_of`."""
    certificates = ca_certificates(auth.ca_pem)
    store = context.get_cert_store()
    assert store is not None
    for certificate in certificates:
        store.add_cert(certificate)
    context.set_client_ca_list([certificate.get_subject() for certificate in certificates])
    context.set_session_id(session_id_context(auth))
    context._ingress_client_auth = auth  # type: ignore[attr-defined]


def client_auth_of(context: SSL.Context) -> ClientAuth | None:
    return getattr(context, "_ingress_client_auth", None)


@ffi.callback("int(int, X509_STORE_CTX *)")
def _accept_every_chain(_ok: int, _store: object) -> int:
    return 1  # the handshake goes on; OpenSSL keeps the result for SSL_get_verify_result


def request_certificate(connection: SSL.Connection, auth: ClientAuth) -> None:
    """Called from the SNI callback after switching to a client-auth context. Every mode asks
    (VERIFY_PEER) and none requires (no FAIL_IF_NO_PEER_CERT): a missing one is answered in HTTP."""
    lib.SSL_set_verify(connection._ssl, SSL.VERIFY_PEER, _accept_every_chain)  # type: ignore[attr-defined]
    LIBSSL.SSL_set_verify_depth(address(connection._ssl), auth.depth)  # type: ignore[attr-defined]


class SniMapping(Protocol):
    """What the ClientHello callback reads of the newest published contexts (proxy.contexts)."""

    @property
    def client_auth(self) -> bool:
        """Some host asks for client certificates."""

    def for_server_name(self, name: bytes | None) -> SSL.Context: ...


def client_hello_callback(current: Callable[[], SniMapping | None]) -> object:
    """A ClientHello callback that gives a connection bound for a client-auth host that host's
    session ID context before OpenSSL looks up the session (see the theory above). While no host
    of the `current()` mapping has client auth, the ClientHello is not even looked at. The caller
    keeps the callback alive."""

    def on_client_hello(ssl: int, _alert: int, _arg: int) -> int:
        mapping = current()
        if mapping is None or not mapping.client_auth:
            return _SSL_CLIENT_HELLO_SUCCESS
        data, length = ctypes.c_void_p(), ctypes.c_size_t()
        if LIBSSL.SSL_client_hello_get0_ext(ssl, _TLSEXT_TYPE_SERVER_NAME, ctypes.byref(data), ctypes.byref(length)):
            name = server_name(ctypes.string_at(data.value, length.value)) if data.value else None
            auth = client_auth_of(mapping.for_server_name(name)) if name else None
            if auth is not None:
                sid = session_id_context(auth)
                LIBSSL.SSL_set_session_id_context(ssl, sid, len(sid))
        return _SSL_CLIENT_HELLO_SUCCESS

    return CLIENT_HELLO_CALLBACK(on_client_hello)


def install_client_hello_callback(context: SSL.Context, callback: object) -> None:
    context._ingress_client_hello = callback  # type: ignore[attr-defined]  # lives as long as the context
    LIBSSL.SSL_CTX_set_client_hello_cb(address(context._context), callback, None)  # type: ignore[attr-defined]


# -- after the handshake ----------------------------------------------------------------------


class ClientVerification:
    """What the handshake of one connection established, set once on the connection (ClientSide
    `client_verification`) when its context belongs to a host with client auth."""

    __slots__ = ("auth", "error", "leaf", "_answers")

    def __init__(self, auth: ClientAuth, error: int, leaf: crypto.X509 | None) -> None:
        self.auth = auth
        self.error = error
        self.leaf = leaf  # the client's certificate (OpenSSL's peer certificate), None if it sent none
        # [ACME challenge, any other path]: each decided on its first request (the certificate and
        # the host's settings do not change on a connection)
        self._answers: list[Refusal | tuple[tuple[bytes, bytes], ...] | None] = [None, None]

    def answer(self, host_auth: ClientAuth, path: str) -> Refusal | tuple[tuple[bytes, bytes], ...]:
        """A Refusal, or the headers for the backend, for a request for `path` to a host with
        `host_auth`."""
        if host_auth != self.auth:
            return MISDIRECTED
        judge_subject = judges_subject(self.auth, path)
        answer = self._answers[judge_subject]
        if answer is None:
            leaf = presented(self.leaf) if self.leaf is not None else None
            answer = self._answers[judge_subject] = answer_for(self.auth, self.error, leaf, judge_subject)
        return answer


def verification_of(connection: SSL.Connection) -> ClientVerification | None:
    """After the handshake (full or resumed): None when the connection's context asks for no
    client certificate, else what OpenSSL verified (kept in the session when resumed)."""
    auth = client_auth_of(connection.get_context())
    if auth is None:
        return None
    peer = connection.get_peer_certificate()
    return ClientVerification(auth, int(lib.SSL_get_verify_result(connection._ssl)), peer)  # type: ignore[attr-defined]


def plaintext_answer(host_auth: ClientAuth, path: str) -> Refusal | tuple[tuple[bytes, bytes], ...]:
    """A request for a host with client auth on a plaintext listener: as a connection without a
    certificate."""
    return answer_for(host_auth, lib.X509_V_OK, None, judges_subject(host_auth, path))


def to_error_page(refusal: Refusal, auth: ClientAuth) -> Refusal:
    """A 400 for the certificate becomes a 302 to the host's error page when it has one (nginx
    `error_page 495 496 = URL`, as ingress-nginx writes auth-tls-error-page)."""
    if auth.error_page is None:
        return refusal
    return Refusal(302, b"", b"Location: %s\r\n" % auth.error_page.encode())
