"""One consistent view of the Kubernetes objects the translator reads.

The watch loops keep a cache of raw objects; when a rebuild is due they freeze the cache into a
`Snapshot` and hand it to `ingress_watch.translate.translate`, which is a pure function of it.
Objects are the JSON dicts exactly as the API server returns them (camelCase keys), in any order:
the translator sorts whatever it needs, so the cache's iteration order never shows in the output.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Snapshot:
    ingresses: tuple[dict, ...] = ()
    ingress_classes: tuple[dict, ...] = ()
    services: tuple[dict, ...] = ()
    endpoint_slices: tuple[dict, ...] = ()
    secrets: tuple[dict, ...] = ()  # type kubernetes.io/tls, and Opaque ones holding a ca.crt (trimmed to it)
    configmap: dict | None = None
    # ConfigMaps of headers (custom-headers, add-headers, proxy-set-headers): the watch keeps only
    # those the last translation named (ingress_watch.header_configmaps), trimmed to metadata and data
    named_configmaps: tuple[dict, ...] = ()
