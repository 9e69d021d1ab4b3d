"""ConfigMaps of headers → header edits: the `custom-headers` annotation and the controller
ConfigMap's `add-headers` and `proxy-set-headers` keys (ingress-nginx's spellings).

Part of `ingress_watch.translate` (its theory of operation states the rules); pure, no I/O.

Each names a ConfigMap as `namespace/name` (a bare `name`: the namespace of the object that names
it) whose data are header names and values, each one *set* on the message (nginx's
more_set_headers / proxy_set_header: the value replaces what the message had under that name):
`custom-headers` on every response of the Ingress's paths, `add-headers` on every response and
`proxy-set-headers` on every request of every Ingress path. An Ingress's own header annotations
win over `custom-headers`, which win over the controller ConfigMap's (`merged_edits`).

A ConfigMap that does not exist, and each key that is not a header we may set (the checks of
`config.route_policy.check_header_edit`, as for the routes file's `request_headers` /
`response_headers`), is a Problem located on the object that named it; the other keys still
apply. The translation reports every ConfigMap it looked up (`ObjectIndex.named_configmaps`),
so the watch keeps only those (`ingress_watch.watch.NamedConfigMaps`): the cluster's other
ConfigMaps never reach the cache.
"""

from __future__ import annotations

import re

from config.model import HeaderEdits, Problem
from config.route_policy import PolicyValueError, check_header_edit
from ingress_watch.objects import ObjectIndex

# The sum of names and values one ConfigMap may add to a message: more than this and the head
# outgrows what peers accept (nginx reads request heads in 8 KiB buffers, 4 of them by default).
MAX_CONFIGMAP_HEADER_BYTES = 16 * 1024
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a DNS label, as Kubernetes requires
_NAME = re.compile(r"[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?")  # a DNS subdomain


def configmap_reference(raw: str, namespace: str) -> tuple[str, str]:
    """`namespace/name`, or a bare `name` in `namespace`, → (namespace, name)."""
    text = str(raw).strip()
    written_namespace, slash, name = text.rpartition("/")
    referenced = written_namespace if slash else namespace
    if not _NAMESPACE.fullmatch(referenced) or not _NAME.fullmatch(name):
        raise PolicyValueError(f"{raw!r} is not a ConfigMap reference", "write namespace/name, e.g. default/custom-headers")
    return referenced, name


def configmap_headers(
    index: ObjectIndex, reference: tuple[str, str], request: bool, what: str, location: str, problems: list[Problem]
) -> tuple[tuple[str, str], ...]:
    """The (name, value) pairs to set from the ConfigMap `reference`, in key order; what cannot be
    used is a problem at `location` (`what`: the key that named it, for the message)."""
    namespace, name = reference
    configmap = index.named_configmap(reference)
    if configmap is None:
        problems.append(Problem(location, (
            f"{what}: ConfigMap {namespace}/{name} not found; create it (in a namespace the controller watches) "
            "or fix the reference; no headers from it"
        )))  # fmt: skip
        return ()
    data = configmap.get("data") or {}
    if not isinstance(data, dict):
        data = {}
    pairs: list[tuple[str, str]] = []
    size = 0
    for key in sorted(data):
        value = str(data[key])
        try:
            check_header_edit(key, value, request)
        except PolicyValueError as error:
            problems.append(Problem(location, f"{what}: ConfigMap {namespace}/{name} key {key!r}: {error.problem}; header skipped ({error.fix})"))
            continue
        size += len(key) + len(value)
        if size > MAX_CONFIGMAP_HEADER_BYTES:
            problems.append(Problem(location, (
                f"{what}: ConfigMap {namespace}/{name} holds over {MAX_CONFIGMAP_HEADER_BYTES} bytes of headers; "
                f"{key!r} and the keys after it are skipped (split the headers or shorten them)"
            )))  # fmt: skip
            break
        pairs.append((key, value))
    return tuple(pairs)


def merged_edits(base: HeaderEdits | None, own: HeaderEdits | None) -> HeaderEdits | None:
    """`own` over `base`: a name `own` sets or removes drops whatever `base` did with it."""
    if base is None or own is None:
        return own if base is None else base
    owned = {name.lower() for name, _ in own.set} | {name.lower() for name in own.remove}
    return HeaderEdits(
        set=(*(pair for pair in base.set if pair[0].lower() not in owned), *own.set),
        add=(*(pair for pair in base.add if pair[0].lower() not in owned), *own.add),
        remove=(*(name for name in base.remove if name.lower() not in owned), *own.remove),
    )


def set_edits(pairs: tuple[tuple[str, str], ...]) -> HeaderEdits | None:
    return HeaderEdits(set=pairs) if pairs else None
