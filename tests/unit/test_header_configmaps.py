"""ConfigMaps of headers as tables (ingress_watch.header_configmaps): references, merging, checks."""

from __future__ import annotations

import pytest

from config.model import HeaderEdits, Problem
from config.route_policy import PolicyValueError
from ingress_watch.header_configmaps import MAX_CONFIGMAP_HEADER_BYTES, configmap_headers, configmap_reference, merged_edits
from ingress_watch.objects import ObjectIndex
from ingress_watch.snapshot import Snapshot


@pytest.mark.parametrize(("raw", "reference"), [
    ("shared/headers", ("shared", "headers")),
    ("headers", ("home", "headers")),  # bare: the namespace of the object that names it
    (" shared/web.headers ", ("shared", "web.headers")),
])  # fmt: skip
def test_references(raw: str, reference: tuple[str, str]) -> None:
    assert configmap_reference(raw, "home") == reference


@pytest.mark.parametrize("raw", ["", "shared/", "/headers", "Shared/headers", "a/b/c", "shared/head ers", "x" * 64 + "/h"])
def test_references_refused(raw: str) -> None:
    with pytest.raises(PolicyValueError, match="is not a ConfigMap reference"):
        configmap_reference(raw, "home")


E = HeaderEdits


@pytest.mark.parametrize(("base", "own", "merged"), [
    (None, None, None),
    (E(set=(("X-A", "1"),)), None, E(set=(("X-A", "1"),))),
    (None, E(remove=("X-A",)), E(remove=("X-A",))),
    (E(set=(("X-A", "1"), ("X-B", "2"))), E(set=(("x-a", "own"),)), E(set=(("X-B", "2"), ("x-a", "own")))),  # own wins, any case
    (E(set=(("X-A", "1"),), add=(("X-C", "3"),)), E(remove=("X-A", "X-C")), E(remove=("X-A", "X-C"))),  # own removal wins
    (E(set=(("X-A", "1"),)), E(add=(("X-A", "2"),)), E(set=(("X-A", "1"),), add=(("X-A", "2"),))),  # an add adds
])  # fmt: skip
def test_merged_edits(base: HeaderEdits | None, own: HeaderEdits | None, merged: HeaderEdits | None) -> None:
    assert merged_edits(base, own) == merged


def _index(data: object) -> ObjectIndex:
    return ObjectIndex(Snapshot(named_configmaps=({"metadata": {"namespace": "ns", "name": "h"}, "data": data},)))


def test_bad_keys_are_skipped_one_by_one_with_a_located_problem() -> None:
    problems: list[Problem] = []
    data = {"X-Ok": "yes", "Transfer-Encoding": "chunked", "X-Bad": "a\r\nInjected: 1", "bad name": "v", "X-Also": "fine"}
    pairs = configmap_headers(_index(data), ("ns", "h"), False, "add-headers", "ConfigMap c/c", problems)
    assert pairs == (("X-Also", "fine"), ("X-Ok", "yes"))
    assert [problem.location for problem in problems] == ["ConfigMap c/c"] * 3
    assert all(problem.message.startswith("add-headers: ConfigMap ns/h key ") for problem in problems)


def test_request_headers_we_derive_are_refused_only_on_the_request_side() -> None:
    data = {"X-Forwarded-For": "1.2.3.4"}
    request_problems: list[Problem] = []
    assert configmap_headers(_index(data), ("ns", "h"), True, "proxy-set-headers", "here", request_problems) == ()
    assert request_problems and "cannot be edited" in request_problems[0].message
    assert configmap_headers(_index(data), ("ns", "h"), False, "add-headers", "here", []) == (("X-Forwarded-For", "1.2.3.4"),)


def test_a_configmap_over_the_size_bound_keeps_what_fits() -> None:
    value = "v" * (MAX_CONFIGMAP_HEADER_BYTES // 2)
    problems: list[Problem] = []
    pairs = configmap_headers(_index({"X-1": value, "X-2": value, "X-3": "small"}), ("ns", "h"), False, "add-headers", "here", problems)
    assert [name for name, _ in pairs] == ["X-1"] and "over 16384 bytes" in problems[0].message


def test_missing_configmaps_are_problems_and_every_lookup_is_remembered() -> None:
    index, problems = _index({}), []
    assert configmap_headers(index, ("ns", "gone"), False, "annotation custom-headers", "Ingress a/b", problems) == ()
    assert "ConfigMap ns/gone not found" in problems[0].message
    configmap_headers(index, ("ns", "h"), False, "x", "y", [])
    assert index.named_configmaps == {("ns", "gone"), ("ns", "h")}
