"""Opaque Secrets are watched for backend CA bundles only (ingress_watch/watch.py `ca_bundle_only`)."""

from __future__ import annotations

import pytest

from ingress_watch.cache import Kind
from ingress_watch.watch import ca_bundle_only, watch_targets

METADATA = {"namespace": "shop", "name": "s", "resourceVersion": "7", "uid": "u", "labels": {"a": "b"}, "managedFields": [{}]}


@pytest.mark.parametrize(
    ("case", "secret", "expected"),
    [
        ("a password Secret is not kept at all", {"metadata": METADATA, "type": "Opaque", "data": {"password": "aHVudGVyMg=="}}, None),
        ("no data", {"metadata": METADATA, "type": "Opaque"}, None),
        (
            "a CA Secret keeps its CA and nothing else",
            {"metadata": METADATA, "type": "Opaque", "data": {"ca.crt": "Q0E=", "token": "c2VjcmV0"}},
            {"metadata": {"namespace": "shop", "name": "s", "resourceVersion": "7"}, "type": "Opaque", "data": {"ca.crt": "Q0E="}},
        ),
        (
            "the client certificate and key beside it are kept (proxy-ssl-secret)",
            {"metadata": METADATA, "type": "Opaque", "data": {"ca.crt": "Q0E=", "tls.crt": "Qw==", "tls.key": "Sw=="}},
            {
                "metadata": {"namespace": "shop", "name": "s", "resourceVersion": "7"},
                "type": "Opaque",
                "data": {"ca.crt": "Q0E=", "tls.crt": "Qw==", "tls.key": "Sw=="},
            },
        ),
    ],
)
def test_ca_bundle_only(case: str, secret: dict, expected: dict | None) -> None:
    assert ca_bundle_only(secret) == expected, case


def test_opaque_secrets_are_watched_narrowed_beside_tls_secrets() -> None:
    secrets = [target for target in watch_targets(None, None) if target.list_method.endswith("_secret_for_all_namespaces")]
    assert [(target.kind, target.field_selector, target.narrow) for target in secrets] == [
        (Kind.SECRET, "type=kubernetes.io/tls", None),
        (Kind.CA_SECRET, "type=Opaque", ca_bundle_only),
    ]
