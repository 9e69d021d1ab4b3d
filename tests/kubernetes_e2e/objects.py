"""Builders for the Kubernetes objects the end-to-end tests create (plain JSON dicts, as sent on the wire)."""

from __future__ import annotations

import base64
from typing import Any

import trustme

OUR_CLASS = "ingress-proxy"
OUR_CONTROLLER = "ingress-proxy.dev/controller"

JsonObject = dict[str, Any]


def ingress_class(name: str = OUR_CLASS, controller: str = OUR_CONTROLLER, default: bool = False) -> JsonObject:
    annotations = {"ingressclass.kubernetes.io/is-default-class": "true"} if default else {}
    return {"metadata": {"name": name, "annotations": annotations}, "spec": {"controller": controller}}


def ingress(
    name: str,
    host: str,
    service: str = "web",
    port: int | str = 80,
    *,
    class_name: str | None = OUR_CLASS,
    annotations: dict[str, str] | None = None,
    tls_secret: str | None = None,
    path: str = "/",
) -> JsonObject:
    port_ref = {"name": port} if isinstance(port, str) else {"number": port}
    backend = {"service": {"name": service, "port": port_ref}}
    spec: JsonObject = {
        "rules": [{"host": host, "http": {"paths": [{"path": path, "pathType": "Prefix", "backend": backend}]}}],
    }
    if class_name is not None:
        spec["ingressClassName"] = class_name
    if tls_secret is not None:
        spec["tls"] = [{"hosts": [host], "secretName": tls_secret}]
    return {"metadata": {"name": name, "annotations": annotations or {}}, "spec": spec}


def service(name: str, ports: list[tuple[str, int, int | str]] | None = None) -> JsonObject:
    """`ports`: (name, port, targetPort); default one port "http" 80 → 8080."""
    ports = ports or [("http", 80, 8080)]
    return {
        "metadata": {"name": name},
        "spec": {"ports": [{"name": n, "port": p, "targetPort": t} for n, p, t in ports]},
    }


def endpoint_slice(service_name: str, addresses: list[str], ports: list[tuple[str, int]], name: str | None = None) -> JsonObject:
    return {
        "metadata": {"name": name or f"{service_name}-slice", "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": True}} for address in addresses],
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
    }


def tls_secret(name: str, issued: trustme.LeafCert) -> JsonObject:
    chain = b"".join(blob.bytes() for blob in issued.cert_chain_pems)
    return {
        "metadata": {"name": name},
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": base64.b64encode(chain).decode(),
            "tls.key": base64.b64encode(issued.private_key_pem.bytes()).decode(),
        },
    }


def configmap(name: str, data: dict[str, str]) -> JsonObject:
    return {"metadata": {"name": name}, "data": data}
