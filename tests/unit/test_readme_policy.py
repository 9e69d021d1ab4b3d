"""The routes-file reference in README ("Per-route policy") shows every policy key with an
example, and the example loads: docs and the loader cannot drift apart."""

from __future__ import annotations

import pathlib

import yaml

from config import routes_file
from config.routes_file import load_routes_file

README = pathlib.Path(__file__).parents[2] / "README.md"
NESTED = {  # policy key → the keys of its mapping (the loader's own tables)
    "canary": routes_file._CANARY_KEYS,
    "cors": routes_file._CORS_KEYS,
    "affinity": routes_file._AFFINITY_KEYS,
    "redirect": routes_file._REDIRECT_KEYS,
    "request_headers": routes_file._HEADER_EDIT_KEYS,
    "response_headers": routes_file._HEADER_EDIT_KEYS,
}


def _example() -> str:
    section = README.read_text().split("### Per-route policy", 1)[1]
    return section.split("```yaml\n", 1)[1].split("```", 1)[0]


def test_the_readme_policy_example_loads(tmp_path: pathlib.Path) -> None:
    text = "listen: {https: 127.0.0.1:8443}\n" + _example()
    text += 'backends: {api: {endpoints: ["127.0.0.1:1"]}, api-v2: {endpoints: ["127.0.0.1:2"]}}\n'
    (tmp_path / "routes.yaml").write_text(text)
    loaded = load_routes_file(tmp_path / "routes.yaml")  # raises with every problem, located
    assert all(rule.policy is not None for host in loaded.configuration.routes.virtual_hosts for rule in host.paths)


def test_the_readme_policy_example_shows_every_key() -> None:
    policies = [route["policy"] for route in yaml.safe_load(_example())["routes"]]
    shown = {key for policy in policies for key in policy}
    assert shown == set(routes_file._POLICY_KEYS)
    for key, nested in NESTED.items():
        written = {name for policy in policies if isinstance(policy.get(key), dict) for name in policy[key]}
        assert written == set(nested), key
