"""Routes file `client_auth:` under a route entry → VirtualHost.client_auth; every mistake located."""

from __future__ import annotations

import pathlib
import re

import pytest
import trustme

from config.model import ClientAuth, ClientVerify
from config.routes_file import RoutesFileError, load_routes_file
from tests.unit.test_routes_file import strip_markers

HEAD = "listen: {https: 127.0.0.1:8443}\nbackends: {b: {endpoints: ['127.0.0.1:1']}}\nroutes:\n"


@pytest.fixture(scope="module")
def client_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def folder(tmp_path: pathlib.Path, client_ca: trustme.CA) -> pathlib.Path:
    client_ca.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    (tmp_path / "text.pem").write_text("just text\n")
    (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    return tmp_path


def _hosts(folder: pathlib.Path, routes: str) -> dict[str, ClientAuth | None]:
    path = folder / "routes.yaml"
    path.write_text(HEAD + routes)
    return {host.host: host.client_auth for host in load_routes_file(path).configuration.routes.virtual_hosts}


def test_client_auth_settings_and_their_defaults(folder, client_ca):
    hosts = _hosts(folder, (
        "- {host: a.test, client_auth: {ca: clients.pem}, paths: [{path: /, backend: b}]}\n"
        "- {host: b.test, client_auth: {ca: clients.pem, verify: optional_no_ca, depth: 3, pass_certificate: true,"
        " error_page: 'https://help.test/cert'}, paths: [{path: /, backend: b}]}\n"
        "- {host: c.test, client_auth: {ca: clients.pem, verify: off}, paths: [{path: /, backend: b}]}\n"
        "- {host: d.test, client_auth: {ca: clients.pem, verify: 'on'}, paths: [{path: /, backend: b}]}\n"
        "- {host: a.test, paths: [{path: /other, backend: b}]}\n"  # another entry of a.test: no opinion
        "- {host: e.test, paths: [{path: /, backend: b}]}\n"
    ))
    ca_pem = client_ca.cert_pem.bytes()
    assert hosts["a.test"] == ClientAuth(ca_pem, ClientVerify.ON, 1, False)
    assert hosts["b.test"] == ClientAuth(ca_pem, ClientVerify.OPTIONAL_NO_CA, 3, True, "https://help.test/cert")
    assert hosts["c.test"] is None  # verify off: nothing asked
    assert hosts["d.test"] == hosts["a.test"]  # unquoted `on` (a YAML boolean) reads as written
    assert hosts["e.test"] is None


def test_a_subject_pattern_is_compiled_once_at_load(folder, client_ca):
    hosts = _hosts(folder, (
        "- {host: a.test, client_auth: {ca: clients.pem, match_subject: 'CN=(alice|bob)\\.example'}, paths: [{path: /, backend: b}]}\n"
        "- {host: b.test, client_auth: {ca: clients.pem, verify: optional, match_subject: '^CN=ops,'}, paths: [{path: /, backend: b}]}\n"
    ))
    ca_pem = client_ca.cert_pem.bytes()
    assert hosts["a.test"] == ClientAuth(ca_pem, ClientVerify.ON, match_subject=re.compile(r"CN=(alice|bob)\.example"))
    assert hosts["b.test"] == ClientAuth(ca_pem, ClientVerify.OPTIONAL, match_subject=re.compile("^CN=ops,"))
    assert hosts["a.test"].match_subject.search("CN=bob.example,O=Acme")  # a compiled pattern, searched


PROBLEMS = {
    "ca-missing": ("- {host: a.test, client_auth: »{verify: on}, paths: [{path: /, backend: b}]}\n", "missing required key 'ca' (add ca: FILE"),
    "ca-not-pem": ("- {host: a.test, client_auth: {ca: »text.pem}, paths: [{path: /, backend: b}]}\n", "holds no PEM certificate"),
    "ca-does-not-parse": (
        "- {host: a.test, client_auth: {ca: »garbage.pem}, paths: [{path: /, backend: b}]}\n", "does not parse",
    ),
    "ca-unreadable": ("- {host: a.test, client_auth: {ca: »nope.pem}, paths: [{path: /, backend: b}]}\n", "cannot read"),
    "verify-unknown": (
        "- {host: a.test, client_auth: {ca: clients.pem, verify: »required}, paths: [{path: /, backend: b}]}\n",
        "'required' is not a verify mode (use on, optional, optional_no_ca or off)",
    ),
    "depth-negative": (
        "- {host: a.test, client_auth: {ca: clients.pem, depth: »-1}, paths: [{path: /, backend: b}]}\n", "out of range",
    ),
    "depth-fraction": (
        "- {host: a.test, client_auth: {ca: clients.pem, depth: »1.5}, paths: [{path: /, backend: b}]}\n",
        "not a whole number",
    ),
    "pass-not-boolean": (
        "- {host: a.test, client_auth: {ca: clients.pem, pass_certificate: »'yes'}, paths: [{path: /, backend: b}]}\n",
        "expected true or false",
    ),
    "error-page-not-a-url": (
        "- {host: a.test, client_auth: {ca: clients.pem, error_page: »'ftp://help.test/'}, paths: [{path: /, backend: b}]}\n",
        "routes[0].client_auth.error_page: redirect location 'ftp://help.test/' is neither an http(s) URL nor a path",
    ),
    "unknown-key": (
        "- {host: a.test, client_auth: {ca: clients.pem, »verify_depth: 2}, paths: [{path: /, backend: b}]}\n",
        "unknown key 'verify_depth'",
    ),
    "match-subject-backtracks": (
        "- {host: a.test, client_auth: {ca: clients.pem, match_subject: »'CN=(a+)+$'}, paths: [{path: /, backend: b}]}\n",
        "routes[0].client_auth.match_subject: 'CN=(a+)+$' nests a repeat inside a repeat (like (a+)+), which can backtrack "
        "without end (flatten it",
    ),
    "match-subject-does-not-compile": (
        "- {host: a.test, client_auth: {ca: clients.pem, match_subject: »'CN=(alice'}, paths: [{path: /, backend: b}]}\n",
        "'CN=(alice' is not a valid regex",
    ),
    "match-subject-empty": (
        "- {host: a.test, client_auth: {ca: clients.pem, match_subject: »''}, paths: [{path: /, backend: b}]}\n",
        "the pattern is empty (write a regex",
    ),
    "match-subject-not-text": (
        "- {host: a.test, client_auth: {ca: clients.pem, match_subject: »[CN=a]}, paths: [{path: /, backend: b}]}\n",
        "expected a string",
    ),
    "match-subject-with-verify-off": (
        "- {host: a.test, client_auth: {ca: clients.pem, verify: off, match_subject: »CN=a}, paths: [{path: /, backend: b}]}\n",
        "a subject pattern needs verify on, optional or optional_no_ca (off asks for no certificate)",
    ),
    "match-subject-and-other-mistakes-at-once": (
        "- {host: a.test, client_auth: {ca: clients.pem, depth: »-1, match_subject: »'(x*)*'}, paths: [{path: /, backend: b}]}\n",
        "out of range",
    ),
    "hosts-disagree-on-the-subject": (
        "- {host: a.test, client_auth: {ca: clients.pem, match_subject: CN=a}, paths: [{path: /, backend: b}]}\n"
        "- {host: a.test, client_auth: »{ca: clients.pem, match_subject: CN=b}, paths: [{path: /x, backend: b}]}\n",
        "routes[1].client_auth: host 'a.test' already has another client_auth at",
    ),
    "needs-a-host": ("- {client_auth: »{ca: clients.pem}, paths: [{path: /, backend: b}]}\n", "needs a host"),
    "hosts-disagree": (
        "- {host: a.test, client_auth: {ca: clients.pem}, paths: [{path: /, backend: b}]}\n"
        "- {host: a.test, client_auth: »{ca: clients.pem, verify: optional}, paths: [{path: /x, backend: b}]}\n",
        "routes[1].client_auth: host 'a.test' already has another client_auth at",
    ),
}


@pytest.mark.parametrize(("routes", "fragment"), PROBLEMS.values(), ids=PROBLEMS.keys())
def test_a_mistake_is_located_with_its_fix(folder, routes, fragment):
    text, positions = strip_markers(HEAD + routes)
    path = folder / "routes.yaml"
    path.write_text(text)
    with pytest.raises(RoutesFileError) as raised:
        load_routes_file(path)
    problems = raised.value.problems
    assert [problem.location for problem in problems] == [f"{path}:{line}:{column}" for line, column in positions], str(raised.value)
    assert fragment in problems[0].message, str(raised.value)
    assert all(problem.message.endswith(")") for problem in problems), "every problem carries a fix"
