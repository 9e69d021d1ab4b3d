"""One set of route rules for both producers (config/route_rules.py): paired fixtures.

Each folder under cases/ holds `routes.yaml` (the routes file) and `input.yaml` (the equivalent
Kubernetes objects, in tests/translate/fixtures.py's format), written to name their backends the
same way ("namespace/service:port"). `expected.yaml` says `problem: null` (both load without a
problem and must give *equal* route tables: hosts, paths, types, policies, backends, default
backend; and the same real-client-address settings: trusted proxies, PROXY protocol listeners)
or `problem: "<text>"` (both report that text: the routes file refuses itself, the translator
leaves the younger rule out).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from config.routes_file import RoutesFileError, load_routes_file
from ingress_watch.translate import translate
from tests.translate.fixtures import load_case

CASES_DIR = Path(__file__).parent / "cases"
CASES = sorted(path.name for path in CASES_DIR.iterdir() if (path / "routes.yaml").is_file())


def test_cases_exist() -> None:
    assert len(CASES) >= 4


@pytest.mark.parametrize("name", CASES)
def test_both_producers_give_the_same_table(name: str) -> None:
    directory = CASES_DIR / name
    expected_problem = yaml.safe_load((directory / "expected.yaml").read_text())["problem"]
    translation = translate(load_case(name, directory).snapshot, load_case(name, directory).options)
    if expected_problem is None:
        assert translation.problems == ()
        loaded = load_routes_file(directory / "routes.yaml").configuration
        assert translation.configuration.routes == loaded.routes
        assert (translation.configuration.real_ip, translation.configuration.proxy_protocol) == (loaded.real_ip, loaded.proxy_protocol)
        return
    with pytest.raises(RoutesFileError) as refused:
        load_routes_file(directory / "routes.yaml")
    assert [problem for problem in refused.value.problems if expected_problem in problem.message]
    assert [problem for problem in translation.problems if expected_problem in problem.message]
