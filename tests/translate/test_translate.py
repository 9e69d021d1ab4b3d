"""Kubernetes → routing model, table-driven: one folder per case under cases/ (format: fixtures.py).

Every case is checked three ways: the exact expected output, the same output for shuffled input
(determinism), and `resolve_endpoints` agreeing with the full translation.
"""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest

from config.model import Address, Backend, Problem
from ingress_watch.snapshot import Snapshot
from ingress_watch.translate import TranslateOptions, resolve_endpoints, translate
from tests.translate.fixtures import case_names, expected_claimed, expected_configuration, load_case

CASES = case_names()
SHUFFLED_FIELDS = ("ingresses", "ingress_classes", "services", "endpoint_slices", "secrets", "named_configmaps")


def assert_problems(actual: tuple[Problem, ...], expected: list[dict]) -> None:
    """Same count; each expected (location, message substring) matches a distinct actual problem."""
    unmatched = list(actual)
    for wanted in expected:
        match = next(
            (p for p in unmatched if p.location == wanted["location"] and wanted["message"] in p.message), None
        )
        assert match is not None, f"no problem like {wanted} among:\n" + "\n".join(map(str, unmatched))
        unmatched.remove(match)
    assert not unmatched, "unexpected problems:\n" + "\n".join(map(str, unmatched))


def test_cases_exist() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", CASES)
def test_translation(name: str) -> None:
    case = load_case(name)
    translation = translate(case.snapshot, case.options)
    assert translation.claimed_ingresses == expected_claimed(case)
    assert_problems(translation.problems, case.expected.get("problems") or [])
    assert translation.configuration == expected_configuration(case)
    named = {tuple(reference.split("/")) for reference in case.expected.get("named_configmaps") or []}
    assert translation.named_configmaps == named  # what the watch will keep (watch.NamedConfigMaps)


@pytest.mark.parametrize("name", CASES)
def test_input_order_does_not_change_output(name: str) -> None:
    case = load_case(name)
    baseline = translate(case.snapshot, case.options)
    reorders = [lambda objects: objects[::-1]] + [
        lambda objects, rng=random.Random(seed): tuple(rng.sample(objects, k=len(objects))) for seed in range(3)
    ]
    for reorder in reorders:
        reordered = Snapshot(
            **{field: reorder(getattr(case.snapshot, field)) for field in SHUFFLED_FIELDS},
            configmap=case.snapshot.configmap,
        )
        assert translate(reordered, case.options) == baseline


@pytest.mark.parametrize("name", CASES)
def test_translation_leaves_snapshot_untouched(name: str) -> None:
    case = load_case(name)
    before = copy.deepcopy(case.snapshot)
    translate(case.snapshot, case.options)
    assert case.snapshot == before


@pytest.mark.parametrize("name", CASES)
def test_resolve_endpoints_agrees_with_translation(name: str) -> None:
    case = load_case(name)
    backends = translate(case.snapshot, case.options).configuration.routes.backends
    emptied = tuple(dataclasses.replace(backend, endpoints=()) for backend in backends)  # protocols stay
    assert resolve_endpoints(case.snapshot, emptied) == backends


def _service(name: str, port: int, port_name: str = "http") -> dict:
    return {"metadata": {"namespace": "shop", "name": name}, "spec": {"ports": [{"name": port_name, "port": port}]}}


def _slice(service: str, suffix: str, port: int, *ips: str, ready: bool | None = True) -> dict:
    return {
        "metadata": {
            "namespace": "shop",
            "name": f"{service}-{suffix}",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip in ips],
    }


def test_resolve_endpoints_follows_endpoint_slice_changes() -> None:
    backends = (Backend("shop/cart:80", (Address("10.0.0.9", 8080),)), Backend("shop/api:80", ()))
    snapshot = Snapshot(
        services=(_service("api", 80), _service("cart", 80)),
        endpoint_slices=(
            _slice("cart", "a", 8080, "10.0.0.3", "10.0.0.1"),
            _slice("cart", "b", 8080, "10.0.0.2", ready=False),
            _slice("api", "a", 9000, "10.0.1.1"),
        ),
    )
    assert resolve_endpoints(snapshot, backends) == (
        Backend("shop/cart:80", (Address("10.0.0.1", 8080), Address("10.0.0.3", 8080))),
        Backend("shop/api:80", (Address("10.0.1.1", 9000),)),
    )


def test_resolve_endpoints_empties_backends_whose_service_is_gone() -> None:
    backends = (Backend("shop/cart:80", (Address("10.0.0.9", 8080),)), Backend("shop/cart:metrics", ()))
    snapshot = Snapshot(services=(_service("other", 80),), endpoint_slices=(_slice("cart", "a", 8080, "10.0.0.1"),))
    assert resolve_endpoints(snapshot, backends) == (Backend("shop/cart:80", ()), Backend("shop/cart:metrics", ()))


def test_resolve_endpoints_keeps_backends_it_did_not_name() -> None:
    foreign = (Backend("static-pool", (Address("10.0.0.5", 80),)),)
    assert resolve_endpoints(Snapshot(), foreign) == foreign


def test_translate_of_empty_snapshot_is_an_empty_table() -> None:
    translation = translate(Snapshot(), TranslateOptions())
    assert translation.problems == () and translation.claimed_ingresses == ()
    assert translation.configuration.routes.virtual_hosts == () and translation.configuration.routes.backends == ()
