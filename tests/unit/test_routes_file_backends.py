"""The routes file's backend `protocol` and `tls` keys (issue 12): values and located problems."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import pytest

from config.model import Address, Backend, BackendProtocol, ClientCertificate, EngineKey, PemKey, UpstreamTls
from config.routes_file import RoutesFileError, load_routes_file
from tests.unit.test_routes_file import LISTEN, key_material, routes_dir, strip_markers, write_routes  # noqa: F401  (fixtures)

ENDPOINTS = "endpoints: ['127.0.0.1:9443']"


def backends_of(directory: pathlib.Path, text: str) -> tuple[Backend, ...]:
    return load_routes_file(write_routes(directory, LISTEN + text)).configuration.routes.backends


def file_bytes(directory: pathlib.Path, name: str) -> bytes:
    return (directory / "certs" / name).read_bytes()


def secure(tls: UpstreamTls) -> tuple[Backend, ...]:
    return (Backend("b", (Address("127.0.0.1", 9443),), BackendProtocol.HTTPS, tls),)


VALID: dict[str, tuple[str, Callable[[pathlib.Path], tuple[Backend, ...]]]] = {
    "plain-by-default": (f"backends: {{b: {{{ENDPOINTS}}}}}", lambda d: (Backend("b", (Address("127.0.0.1", 9443),)),)),
    "protocol-http-explicit": (f"backends: {{b: {{{ENDPOINTS}, protocol: http}}}}", lambda d: (Backend("b", (Address("127.0.0.1", 9443),)),)),
    "https-without-tls-keys-does-not-verify": (f"backends: {{b: {{{ENDPOINTS}, protocol: https}}}}", lambda d: secure(UpstreamTls())),
    "protocol-is-case-insensitive": (f"backends: {{b: {{{ENDPOINTS}, protocol: HTTPS}}}}", lambda d: secure(UpstreamTls())),
    "a-ca-turns-verification-on": (
        f"backends: {{b: {{{ENDPOINTS}, protocol: https, tls: {{ca: certs/site.pem, server_name: Foo.Example.com}}}}}}",
        lambda d: secure(UpstreamTls(file_bytes(d, "site.pem"), verify=True, server_name="foo.example.com")),
    ),
    "verify-without-ca-uses-the-system-store": (
        f"backends: {{b: {{{ENDPOINTS}, protocol: https, tls: {{verify: true, sni: false}}}}}}",
        lambda d: secure(UpstreamTls(verify=True, send_sni=False)),
    ),
    "an-ip-server-name": (
        f"backends: {{b: {{{ENDPOINTS}, protocol: https, tls: {{ca: certs/site.pem, server_name: 10.0.0.1}}}}}}",
        lambda d: secure(UpstreamTls(file_bytes(d, "site.pem"), verify=True, server_name="10.0.0.1")),
    ),
    "h2c-for-grpc": (f"backends: {{b: {{{ENDPOINTS}, protocol: h2c}}}}", lambda d: (Backend("b", (Address("127.0.0.1", 9443),), BackendProtocol.H2C),)),
    "h2-over-tls-verified": (
        f"backends: {{b: {{{ENDPOINTS}, protocol: h2, tls: {{ca: certs/site.pem}}}}}}",
        lambda d: (Backend("b", (Address("127.0.0.1", 9443),), BackendProtocol.H2, UpstreamTls(file_bytes(d, "site.pem"), verify=True)),),
    ),
    "client-certificate": (
        f"backends: {{b: {{{ENDPOINTS}, protocol: https, tls: {{cert: certs/rsa.pem, key: certs/rsa.key}}}}}}",
        lambda d: secure(UpstreamTls(client_certificate=ClientCertificate(file_bytes(d, "rsa.pem"), PemKey(file_bytes(d, "rsa.key")), "x"))),
    ),
}


def _without_origin(backends: tuple[Backend, ...]) -> tuple[Backend, ...]:
    """Origins carry the file's path and position; the cases compare everything else."""
    out = []
    for backend in backends:
        tls = backend.tls
        if tls is not None and tls.client_certificate is not None:
            tls = dataclasses.replace(tls, client_certificate=dataclasses.replace(tls.client_certificate, origin="x"))
        out.append(dataclasses.replace(backend, tls=tls))
    return tuple(out)


@pytest.mark.parametrize(("text", "expected"), VALID.values(), ids=VALID.keys())
def test_valid_backend(routes_dir: pathlib.Path, text: str, expected: Callable[[pathlib.Path], tuple[Backend, ...]]) -> None:
    assert _without_origin(backends_of(routes_dir, text + "\n")) == expected(routes_dir)


def test_a_client_key_in_an_engine(routes_dir: pathlib.Path) -> None:
    text = (
        "tls: {engine: {id: pkcs11}}\n"
        f"backends: {{b: {{{ENDPOINTS}, protocol: https, tls: {{cert: certs/hsm.pem, key: 'engine:pkcs11:object=c'}}}}}}\n"
    )
    (backend,) = backends_of(routes_dir, text)
    assert backend.tls is not None and backend.tls.client_certificate is not None
    assert backend.tls.client_certificate.key == EngineKey("pkcs11:object=c")


PROBLEMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "unknown-protocol": (f"backends: {{b: {{{ENDPOINTS}, protocol: »grpc}}}}", ("unknown protocol 'grpc' (use http, https, h2c, h2)",)),
    "tls-on-a-plain-backend": (f"backends: {{b: {{{ENDPOINTS}, tls: »{{verify: true}}}}}}", ("speaks http, not TLS (set protocol: https",)),
    "tls-on-an-h2c-backend": (f"backends: {{b: {{{ENDPOINTS}, protocol: h2c, tls: »{{verify: true}}}}}}", ("speaks h2c, not TLS (set protocol: https or h2",)),
    "unknown-tls-key": (f"backends: {{b: {{{ENDPOINTS}, protocol: https, tls: {{»cafile: x}}}}}}", ("unknown key 'cafile'",)),
    "missing-ca-file": (f"backends: {{b: {{{ENDPOINTS}, protocol: https, tls: {{ca: »certs/nope.pem}}}}}}", ("cannot read",)),
    "ca-file-without-certificates": (
        f"backends: {{b: {{{ENDPOINTS}, protocol: https, tls: {{ca: »certs/text.pem}}}}}}", ("holds no PEM certificate",)
    ),
    "verify-false-beside-a-ca": (
        f"backends: {{b: {{{ENDPOINTS}, protocol: https, tls: {{ca: certs/site.pem, verify: »false}}}}}}",
        ("would ignore the ca given beside it",),
    ),
    "verify-not-boolean": (f"backends: {{b: {{{ENDPOINTS}, protocol: https, tls: {{verify: »'yes'}}}}}}", ("expected true or false",)),
    "bad-server-name": (
        f"backends: {{b: {{{ENDPOINTS}, protocol: https, tls: {{server_name: »'a b'}}}}}}", ("is not a DNS name or IP address",)
    ),
    "cert-without-key": (f"backends: {{b: {{{ENDPOINTS}, protocol: https, tls: {{cert: »certs/rsa.pem}}}}}}", ("needs its key",)),
    "key-without-cert": (f"backends: {{b: {{{ENDPOINTS}, protocol: https, tls: {{key: »certs/rsa.key}}}}}}", ("needs its cert",)),
    "key-of-another-certificate": (
        f"backends: {{b: {{{ENDPOINTS}, protocol: https, tls: {{cert: certs/rsa.pem, key: »certs/site.key}}}}}}",
        ("does not match the client certificate",),
    ),
    "engine-client-key-without-engine": (
        f"backends: {{b: {{{ENDPOINTS}, protocol: https, tls: {{cert: certs/hsm.pem, key: »'engine:pkcs11:object=c'}}}}}}",
        ("needs tls.engine",),
    ),
    "pin-without-key": (f"backends: {{b: {{{ENDPOINTS}, protocol: https, tls: {{pin_env: »PIN}}}}}}", ("a PIN needs a client key",)),
}


@pytest.mark.parametrize(("text", "fragments"), PROBLEMS.values(), ids=PROBLEMS.keys())
def test_backend_problem_is_reported_at_its_location(routes_dir: pathlib.Path, text: str, fragments: tuple[str, ...]) -> None:
    plain, positions = strip_markers(LISTEN + text + "\n")
    path = write_routes(routes_dir, plain)
    with pytest.raises(RoutesFileError) as raised:
        load_routes_file(path)
    problems = raised.value.problems
    assert [problem.location for problem in problems] == [f"{path}:{line}:{column}" for line, column in positions], str(raised.value)
    for problem, fragment in zip(problems, fragments):
        assert fragment in problem.message, str(raised.value)
    assert all(problem.message.endswith(")") for problem in problems), "every problem carries a fix"
