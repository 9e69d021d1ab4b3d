"""The supported-annotation table and the README's cannot drift apart, and every key is read."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import trustme

from ingress_watch.snapshot import Snapshot
from ingress_watch.annotations import NGINX_PREFIX, SUPPORTED_ANNOTATIONS
from ingress_watch.migration import DIFFERENCES, migration_report
from ingress_watch.translate import TranslateOptions, translate

README = Path(__file__).parents[2] / "README.md"
OPTIONS = TranslateOptions(watch_ingress_without_class=True)


def _readme_table_keys() -> set[str]:
    section = README.read_text().split("### Annotations", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {key for row in rows for key in re.findall(r"`([a-z0-9-]+)`", row.split(" | ")[0])}


def test_readme_lists_exactly_the_supported_annotations() -> None:
    assert _readme_table_keys() == set(SUPPORTED_ANNOTATIONS)


def test_readme_differences_table_is_the_migration_reports_row_by_row() -> None:
    """README "Differences from ingress-nginx": one row per supported key, in the table's order,
    saying what `migrate` says (DIFFERENCES), or that it acts as in ingress-nginx."""
    section = README.read_text().split("### Differences from ingress-nginx", 1)[1].split("\n#", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| `")]
    assert [(key.strip(" `"), text.strip()) for key, text in rows] == [
        (key, DIFFERENCES.get(key, "as ingress-nginx")) for key in SUPPORTED_ANNOTATIONS
    ]
    assert set(DIFFERENCES) <= set(SUPPORTED_ANNOTATIONS)  # no difference for a key we do not read


def _ingress(annotations: dict[str, str]) -> Snapshot:
    ingress = {
        "metadata": {"namespace": "default", "name": "web", "annotations": annotations},
        "spec": {"rules": [{"host": "a.example.com", "http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}}
        ]}}]},
    }  # fmt: skip
    service = {"metadata": {"namespace": "default", "name": "web"}, "spec": {"ports": [{"port": 80}]}}
    return Snapshot(ingresses=(ingress,), services=(service,))


ENABLED_BY = {  # keys that only mean something beside another one (as in ingress-nginx)
    "permanent-redirect-code": "permanent-redirect", "temporal-redirect-code": "temporal-redirect",
    "limit-burst-multiplier": "limit-rps",
    **{key: "enable-cors" for key in SUPPORTED_ANNOTATIONS if key.startswith("cors-")},
    **{key: "canary" for key in SUPPORTED_ANNOTATIONS if key.startswith("canary-") and key != "canary-by-header-value"},
    "canary-by-header-value": "canary",  # (any text is a valid value: checked via the header name below)
    **{key: "affinity" for key in SUPPORTED_ANNOTATIONS if key.startswith("session-cookie-")},
}  # fmt: skip
ENABLING_VALUES = {
    "permanent-redirect": "/x", "temporal-redirect": "/x", "limit-rps": "5", "enable-cors": "true", "canary": "true", "affinity": "cookie",
}  # fmt: skip
FREE_TEXT = {"canary-by-header-value"}  # every value is valid: nothing to refuse


def test_every_supported_key_is_read_and_an_unknown_one_is_reported() -> None:
    """A key listed as supported but never read would give no problem for a nonsense value."""
    options = TranslateOptions(watch_ingress_without_class=True)
    for key in SUPPORTED_ANNOTATIONS:
        annotations = {NGINX_PREFIX + key: "nonsense value \x01"}
        if key in ENABLED_BY:
            annotations[NGINX_PREFIX + ENABLED_BY[key]] = ENABLING_VALUES[ENABLED_BY[key]]
        problems = translate(_ingress(annotations), options).problems
        if key not in FREE_TEXT:
            assert [problem for problem in problems if NGINX_PREFIX + key in problem.message], key
        assert not any("not supported" in problem.message for problem in problems), key
    problems = translate(_ingress({NGINX_PREFIX + "auth-url": "https://auth.example.com"}), options).problems
    assert [problem.message for problem in problems if "auth-url is not supported" in problem.message]


def test_migrate_reports_auth_tls_match_cn_and_the_pattern_a_host_gets() -> None:
    """A good pattern is `honoured differently` (any regex applies) and named in the host's client
    certificate summary; a refused one is `ignored` with the translation's reason."""
    secret = {
        "metadata": {"namespace": "default", "name": "clients"}, "type": "Opaque",
        "data": {"ca.crt": base64.b64encode(trustme.CA().cert_pem.bytes()).decode()},
    }  # fmt: skip
    snapshot = _ingress({NGINX_PREFIX + "auth-tls-secret": "clients", NGINX_PREFIX + "auth-tls-match-cn": r"CN=(alice|bob)\."})
    report = migration_report(Snapshot(ingresses=snapshot.ingresses, services=snapshot.services, secrets=(secret,)), OPTIONS)
    (entry,) = [row for row in report["ingresses"][0]["annotations"] if row["key"].endswith("auth-tls-match-cn")]
    assert (entry["status"], entry["note"]) == ("honoured differently", DIFFERENCES["auth-tls-match-cn"])
    assert report["routes"][0]["client_certificates"] == r"verify on, depth 1, subject DN must match 'CN=(alice|bob)\\.'"

    snapshot = _ingress({NGINX_PREFIX + "auth-tls-secret": "clients", NGINX_PREFIX + "auth-tls-match-cn": "CN=(a|ab)*x"})
    report = migration_report(Snapshot(ingresses=snapshot.ingresses, services=snapshot.services, secrets=(secret,)), OPTIONS)
    (entry,) = [row for row in report["ingresses"][0]["annotations"] if row["key"].endswith("auth-tls-match-cn")]
    assert entry["status"] == "ignored" and "repeats an alternation" in entry["note"]
    assert report["routes"] == []  # the Ingress's paths are left out, not served without the check
