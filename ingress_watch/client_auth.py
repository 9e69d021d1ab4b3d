"""ingress-nginx `auth-tls-*` annotations → the `ClientAuth` of the Ingress's hosts.

Part of `ingress_watch.translate` (its theory of operation states the rules); pure, no I/O.
The values are checked by `config.client_auth`, as the routes file's `client_auth:` is. Any
refused value (a Secret that is missing, in another namespace or without a usable ca.crt, an
unknown verify mode, a bad depth, an `auth-tls-match-cn` regex that does not compile or could
backtrack without end) leaves the Ingress's paths out: serving them without the client
certificate check would open what the user meant to close. (ingress-nginx drops a match-cn value
without "CN=" in it and serves without the check; we use any regex `check_regex` accepts.)
"""

from __future__ import annotations

from dataclasses import dataclass

from config import client_auth as rules
from config.model import ClientAuth, ClientVerify
from config.route_policy import PolicyValueError
from ingress_watch.annotations import ANNOTATION_PREFIXES
from ingress_watch.backend_transport import load_ca_bundle
from ingress_watch.objects import ObjectIndex, Rejected, object_metadata, object_namespace, parse_bool

AUTH_TLS_ANNOTATIONS = (
    "auth-tls-secret", "auth-tls-verify-client", "auth-tls-verify-depth", "auth-tls-pass-certificate-to-upstream",
    "auth-tls-error-page", "auth-tls-match-cn",
)  # fmt: skip


@dataclass(frozen=True)
class ClientAuthAnnotations:
    """What one Ingress says about client certificates on its hosts."""

    said: bool = False  # some auth-tls-* key is present: the Ingress has an opinion on its hosts
    client_auth: ClientAuth | None = None  # None with `said`: verify off
    refusal: str | None = None  # a value that cannot be used: the Ingress's paths are skipped


def read_client_auth(ingress: dict, index: ObjectIndex) -> ClientAuthAnnotations:
    annotations = object_metadata(ingress).get("annotations") or {}
    values: dict[str, str] = {}
    keys: dict[str, str] = {}  # name → the annotation key as written (either prefix), for messages
    for name in AUTH_TLS_ANNOTATIONS:
        for prefix in ANNOTATION_PREFIXES:  # a disagreement between prefixes is read_annotations' problem
            if prefix + name in annotations and name not in values:
                values[name], keys[name] = str(annotations[prefix + name]), prefix + name
    if not values:
        return ClientAuthAnnotations()
    try:
        return ClientAuthAnnotations(True, _client_auth(values, keys, ingress, index))
    except Rejected as error:
        return ClientAuthAnnotations(True, None, f"{error}; the Ingress's paths are not served until it is fixed")


def _client_auth(values: dict[str, str], keys: dict[str, str], ingress: dict, index: ObjectIndex) -> ClientAuth | None:
    def key(name: str) -> str:
        return keys.get(name, ANNOTATION_PREFIXES[0] + name)

    verify = ClientVerify.ON  # ingress-nginx's default once auth-tls-secret is set
    if "auth-tls-verify-client" in values:
        try:
            verify = rules.parse_verify(values["auth-tls-verify-client"])
        except ValueError as error:
            raise Rejected(f"annotation {key('auth-tls-verify-client')}: {error}") from None
    depth = rules.DEFAULT_DEPTH
    if "auth-tls-verify-depth" in values:
        raw = values["auth-tls-verify-depth"].strip()
        try:
            depth = rules.check_depth(int(raw))
        except ValueError as error:
            reason = error if raw.lstrip("-").isdigit() else f"{raw!r} is not a whole number (write 1, 2, ...)"
            raise Rejected(f"annotation {key('auth-tls-verify-depth')}: {reason}") from None
    pass_certificate = False
    if "auth-tls-pass-certificate-to-upstream" in values:
        try:
            pass_certificate = parse_bool(values["auth-tls-pass-certificate-to-upstream"])
        except Rejected as error:
            raise Rejected(f"annotation {key('auth-tls-pass-certificate-to-upstream')}: {error}") from None
    error_page = None
    if "auth-tls-error-page" in values:
        try:
            error_page = rules.check_error_page(values["auth-tls-error-page"])
        except PolicyValueError as error:
            raise Rejected(f"annotation {key('auth-tls-error-page')}: {error}") from None
    match_subject = None
    if "auth-tls-match-cn" in values:
        try:
            match_subject = rules.compile_match_subject(values["auth-tls-match-cn"])
            rules.check_match_subject_with(verify)
        except ValueError as error:
            raise Rejected(f"annotation {key('auth-tls-match-cn')}: {error}") from None
    if "auth-tls-secret" not in values:
        if verify is ClientVerify.OFF:
            return None
        raise Rejected(f"annotation {key('auth-tls-secret')} is missing; name the Secret (namespace/name) holding ca.crt")
    namespace, slash, name = values["auth-tls-secret"].strip().rpartition("/")
    if slash and namespace != object_namespace(ingress):
        raise Rejected(
            f"annotation {key('auth-tls-secret')}: Secret {values['auth-tls-secret']} is in another namespace; "
            f"use a Secret in {object_namespace(ingress)}"
        )
    if not name:
        raise Rejected(f"annotation {key('auth-tls-secret')}: no Secret named; write namespace/name or name")
    ca_pem = load_ca_bundle(index, object_namespace(ingress), name, key("auth-tls-secret"))
    return rules.client_auth(ca_pem, verify, depth, pass_certificate, error_page, match_subject)
