"""`ingress-proxy migrate`: what this controller would do with a cluster's Ingresses, before cut-over.

Theory of operation. The report is a pure function of a `Snapshot` (the same objects the
controller would watch, listed once, read-only) and the same `TranslateOptions`: it runs the real
translation and sorts what came out per Ingress. For each annotation under our prefixes:

- `honoured`: a supported key whose value was accepted, and that acts as in ingress-nginx;
- `honoured differently`: accepted, with the difference from `DIFFERENCES` (also in README);
- `ignored`: an unsupported key or a refused value, with the translation's own problem text.

Plus the Ingress's other problems, whether it is of our class, and the resulting route table
(every host, path, backend and policy), so an operator sees what will change. `render_text` prints
it for people; the dict is the JSON form.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from config.model import Configuration, RoutePolicy, VirtualHost
from ingress_watch.snapshot import Snapshot
from ingress_watch.annotations import ANNOTATION_PREFIXES, SUPPORTED_ANNOTATIONS
from ingress_watch.translate import TranslateOptions, translate

# README "Real client address": the one difference is use-proxy-protocol and use-forwarded-headers together.
_CLIENT_ADDRESS = (
    "the client address is the PROXY header's source (use-proxy-protocol), the trusted X-Forwarded-For's "
    "(use-forwarded-headers) or the TCP peer's; with both keys, X-Forwarded-For is trusted from PROXY sources in "
    "proxy-real-ip-cidr (ingress-nginx then ignores it)"
)
# Keys that are honoured but not exactly as ingress-nginx does in ordinary use (values it would
# take that we refuse are problems, reported as such); every other supported key acts as it does
# there. README's "Differences from ingress-nginx" table is checked against this one
# (tests/translate/test_annotations.py), row by row.
DIFFERENCES = {
    "ssl-redirect": "only hosts a certificate of ours covers are redirected (ConfigMap default: off)",
    "proxy-body-size": "no default limit (ingress-nginx: 1m); over a chunked body the backend sees a truncated request",
    "use-regex": (
        "applies to this Ingress's paths only, not to every path of the host; patterns that could backtrack without "
        "end (nested repeats, repeated alternations, backreferences, more than two open-ended repeats) are refused"
    ),
    "enable-cors": "preflights get 200 (not 204), a disallowed origin's preflight 403, credentials echo the Origin",
    "limit-rps": "429 instead of 503; per replica and worker",
    "limit-connections": "counts requests in flight; per replica and worker",
    "canary": "the canary Ingress's other annotations are ignored (the main Ingress's policy serves both)",
    "canary-weight": "a whole number from 0 to canary-weight-total (a fraction is refused, not truncated)",
    "affinity": "the cookie value is a digest of the endpoint; affinity-mode and the other session-cookie-* keys are not read",
    "whitelist-source-range": _CLIENT_ADDRESS,
    "allowlist-source-range": _CLIENT_ADDRESS,
    "denylist-source-range": _CLIENT_ADDRESS,
    "custom-headers": "the names need not be in global-allowed-response-headers; the proxy's own answers (404, 503) do not get them",
    **{
        f"{direction}-{verb}-headers": "ingress-proxy's own key: ingress-nginx needs a configuration-snippet for this"
        for direction in ("request", "response")
        for verb in ("set", "add", "remove")
    },
    "auth-tls-secret": "the Secret must be in the Ingress's namespace; a bad one leaves the Ingress's paths out "
    "(not served open); a request whose Host needs a certificate on a connection whose SNI did not get 421",
    "auth-tls-verify-client": "as nginx; a younger Ingress disagreeing on the host's settings has its rules left out",
    "auth-tls-error-page": "302 to it for the 400s (missing or bad certificate); a 421 (SNI and Host disagree) is not redirected",
    "auth-tls-match-cn": "any regex is applied (ingress-nginx ignores a value without CN=); one that does not compile or "
    "could backtrack without end (as use-regex), or one with verify off, leaves the Ingress's paths out; only an exact "
    "/.well-known/acme-challenge/TOKEN path skips the check",
}


def migration_report(snapshot: Snapshot, options: TranslateOptions) -> dict[str, Any]:
    translation = translate(snapshot, options)
    claimed = set(translation.claimed_ingresses)
    ingresses = []
    for ingress in sorted(snapshot.ingresses, key=_reference):
        namespace, name = _reference(ingress)
        location = f"Ingress {namespace}/{name}"
        problems = [problem.message for problem in translation.problems if problem.location == location]
        annotations = []
        for key, value in sorted(((ingress.get("metadata") or {}).get("annotations") or {}).items()):
            prefix = next((prefix for prefix in ANNOTATION_PREFIXES if key.startswith(prefix)), None)
            if prefix is None:
                continue
            annotation = key[len(prefix):]
            about = [message for message in problems if key in message]
            if about or annotation not in SUPPORTED_ANNOTATIONS:
                status, note = "ignored", "; ".join(about) or "not supported"
            elif annotation in DIFFERENCES:
                status, note = "honoured differently", DIFFERENCES[annotation]
            else:
                status, note = "honoured", SUPPORTED_ANNOTATIONS[annotation]
            annotations.append({"key": key, "value": str(value), "status": status, "note": note})
        other_problems = [message for message in problems if not any(entry["key"] in message for entry in annotations)]
        ingresses.append({
            "ingress": f"{namespace}/{name}",
            "ours": (namespace, name) in claimed,
            "annotations": annotations,
            "problems": other_problems,
        })  # fmt: skip
    return {
        "ingresses": ingresses,
        "other_problems": [str(p) for p in translation.problems if not p.location.startswith("Ingress ")],
        "routes": _routes(translation.configuration),
    }


def _reference(ingress: dict) -> tuple[str, str]:
    metadata = ingress.get("metadata") or {}
    return (metadata.get("namespace") or "", metadata.get("name") or "")


def _routes(configuration: Configuration) -> list[dict[str, Any]]:
    return [
        {
            "host": virtual_host.host or "*",
            "redirect_to_https": virtual_host.redirect_to_https,
            "client_certificates": _client_auth_summary(virtual_host),
            "path": rule.path,
            "type": rule.path_type.value,
            "backend": rule.backend,
            "policy": _policy_summary(rule.policy),
        }
        for virtual_host in configuration.routes.virtual_hosts
        for rule in virtual_host.paths
    ]


def _client_auth_summary(virtual_host: VirtualHost) -> str:
    auth = virtual_host.client_auth
    if auth is None:
        return "not asked"
    passed = ", certificate passed upstream" if auth.pass_certificate else ""
    subject = f", subject DN must match {auth.match_subject.pattern!r}" if auth.match_subject is not None else ""
    return f"verify {auth.verify.value}, depth {auth.depth}{passed}{subject}"


def _policy_summary(policy: RoutePolicy | None) -> dict[str, str]:
    """The policy fields that differ from the defaults, as text."""
    if policy is None:
        return {}
    defaults = RoutePolicy()
    return {
        field.name: _text(getattr(policy, field.name))
        for field in dataclasses.fields(policy)
        if getattr(policy, field.name) != getattr(defaults, field.name)
    }


def _text(value: object) -> str:
    if isinstance(value, tuple):
        return ", ".join(map(str, value))
    return str(value)


def render_text(report: dict[str, Any]) -> str:
    lines = []
    for entry in report["ingresses"]:
        lines.append(f"Ingress {entry['ingress']}: {'served by ingress-proxy' if entry['ours'] else 'not of our class: not served'}")
        for annotation in entry["annotations"]:
            lines.append(f"  {annotation['status']:<21} {annotation['key']}={annotation['value']!r}: {annotation['note']}")
        for problem in entry["problems"]:
            lines.append(f"  problem               {problem}")
    for problem in report["other_problems"]:
        lines.append(f"problem: {problem}")
    lines.append("Resulting routes:")
    for route in report["routes"]:
        redirect = " (http → https)" if route["redirect_to_https"] else ""
        if route["client_certificates"] != "not asked":
            redirect += f" (client certificates: {route['client_certificates']})"
        policy = "; ".join(f"{name}={value}" for name, value in route["policy"].items())
        lines.append(
            f"  {route['host']}{route['path']} {route['type']} → {route['backend']}{redirect}" + (f"  [{policy}]" if policy else "")
        )
    return "\n".join(lines)
