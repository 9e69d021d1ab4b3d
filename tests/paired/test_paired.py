"""One set of route rules for both producers (config/route_rules.py): paired fixtures.

Each folder under cases/ holds `routes.yaml` (the routes file) and `input.yaml` (the equivalent
Kubernetes objects, in tests/translate/fixtures.py's format), written to name their backends the
same way ("namespace/service:port"). `expected.yaml` says `problem: null` (both load without a
problem and must give *equal* route tables: hosts, paths, types, policies, backends, default
backend; and the same real-client-address settings: trusted proxies, PROXY protocol listeners)
or `problem: "<text>"` (both report that text: the routes file refuses itself, the translator
leaves the younger rule out). `files: {name: ns/secret}` in expected.yaml writes that input
Secret's decoded `ca.crt` beside a copy of routes.yaml, so both read the same generated CA.
"""

from __future__ import annotations

import base64
import shutil
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
def test_both_producers_give_the_same_table(name: str, tmp_path: Path) -> None:
    directory = CASES_DIR / name
    expected = yaml.safe_load((directory / "expected.yaml").read_text())
    expected_problem = expected["problem"]
    case = load_case(name, directory)
    translation = translate(case.snapshot, case.options)
    routes_file = tmp_path / "routes.yaml"
    shutil.copy(directory / "routes.yaml", routes_file)
    secrets = {f"{s['metadata'].get('namespace', 'default')}/{s['metadata']['name']}": s for s in case.snapshot.secrets}
    for file_name, secret in (expected.get("files") or {}).items():
        (tmp_path / file_name).write_bytes(base64.b64decode(secrets[secret]["data"]["ca.crt"]))
    if expected_problem is None:
        assert translation.problems == ()
        loaded = load_routes_file(routes_file).configuration
        assert translation.configuration.routes == loaded.routes
        assert (translation.configuration.real_ip, translation.configuration.proxy_protocol) == (loaded.real_ip, loaded.proxy_protocol)
        return
    with pytest.raises(RoutesFileError) as refused:
        load_routes_file(routes_file)
    assert [problem for problem in refused.value.problems if expected_problem in problem.message]
    assert [problem for problem in translation.problems if expected_problem in problem.message]
