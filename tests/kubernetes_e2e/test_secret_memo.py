"""TLS Secret parsing is memoized across translations by content, and only while Secrets are in use
(found by bench/k8s_sync.py: an LRU smaller than the cluster's Secrets re-parsed every key on every
change — 5,000 TLS Ingresses took ~10 s from change to served)."""

from __future__ import annotations

from typing import Any

import pytest
import trustme

from ingress_watch import tls_secrets as tls_secrets_module
from ingress_watch.snapshot import Snapshot
from ingress_watch.translate import TranslateOptions, translate
from tests.kubernetes_e2e.objects import ingress, ingress_class, tls_secret


def _namespaced(obj: dict[str, Any], created: str = "2024-01-01T00:00:00Z") -> dict[str, Any]:
    obj["metadata"].update(namespace="default", creationTimestamp=created)
    return obj


def test_each_secret_content_is_parsed_once_while_in_use(monkeypatch: pytest.MonkeyPatch, ca: trustme.CA) -> None:
    parsed: list[str] = []
    original = tls_secrets_module._parse_tls_data

    def counting(certificate_base64: str, key_base64: str) -> object:
        parsed.append(certificate_base64)
        return original(certificate_base64, key_base64)

    monkeypatch.setattr(tls_secrets_module, "_parse_tls_data", counting)
    hosts = [f"h{index}.example" for index in range(3)]
    secrets = {host: _namespaced(tls_secret(f"s{index}", ca.issue_cert(host))) for index, host in enumerate(hosts)}
    ingresses = tuple(_namespaced(ingress(f"i{index}", host, tls_secret=f"s{index}")) for index, host in enumerate(hosts))

    def run(secret_objects: dict[str, dict[str, Any]]) -> None:
        snapshot = Snapshot(ingresses=ingresses, ingress_classes=(ingress_class(),), secrets=tuple(secret_objects.values()))
        translation = translate(snapshot, TranslateOptions())
        assert len(translation.configuration.certificates) == 3
        assert not [problem for problem in translation.problems if "Secret" in problem.message]

    run(secrets)
    assert len(parsed) == 3
    run(secrets)
    run(secrets)
    assert len(parsed) == 3, "unchanged Secrets are not parsed again"

    first_content = secrets[hosts[0]]["data"]["tls.crt"]
    rotated = {**secrets, hosts[0]: _namespaced(tls_secret("s0", ca.issue_cert(hosts[0])))}
    run(rotated)
    assert len(parsed) == 4, "only the rotated Secret is parsed"
    run(rotated)
    run(secrets)  # two translations without the old content: it was dropped, so it is parsed anew
    assert parsed[4:] == [first_content]
