"""Client certificate subject patterns (`client_auth.match_subject`, ingress-nginx
`auth-tls-match-cn`) end to end: `ingress-proxy serve --routes FILE` (the real process), curl
`--cert/--key` over HTTP/1.1 and HTTP/2 and a pyOpenSSL keep-alive client, with a matching and a
non-matching certificate both issued by the trusted CA, to an HTTP/1.1 and an h2c backend.

The answers are ingress-nginx's: `if ($ssl_client_s_dn !~ PATTERN) { return 403 "client
certificate unauthorized"; }` after the 400s of the verify mode."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from OpenSSL import SSL

from tests.e2e.test_client_certificates import Client, _complete, _H2cHeaders, _waiting, certificate_headers, seen
from tests.e2e.test_route_policy import PROTOCOLS, curl
from tests.hostile.proxy_process import LOOPBACK, Ports, ProxyProcess, listen_section, write_certificate

pytestmark = pytest.mark.e2e
TEAM = r"CN=(alice|bob)\.clients\.test"
REFUSED = (403, b"client certificate unauthorized")


def _client(ca: trustme.CA, directory: Path, name: str) -> Client:
    issued = ca.issue_cert(f"{name}@clients.test", common_name=f"{name}.clients.test")
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    return Client(cert, key, issued.cert_chain_pems[0].bytes())


@dataclass
class Setup:
    process: ProxyProcess
    ca_file: str
    alice: Client  # the clients' CA, CN matches TEAM
    carol: Client  # the clients' CA too, CN does not match
    mallory: Client  # a CA nobody trusts

    @property
    def port(self) -> int:
        return self.process.ports.https


@pytest.fixture
async def setup(ca: trustme.CA, start_backend, tmp_path: Path) -> AsyncIterator[Setup]:
    clients, strangers = trustme.CA(organization_name="Clients CA"), trustme.CA()
    clients.cert_pem.write_to_path(str(tmp_path / "clients-ca.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "server-ca.pem"))
    backend = await start_backend("app")
    h2c = await asyncio.get_running_loop().create_server(_H2cHeaders, LOOPBACK, 0)
    names = ("team.test", "team-h2.test", "optional.test", "optional-open.test", "noca.test", "page.test")
    certificate = write_certificate(ca, tmp_path, "site", *names)
    ports = Ports()

    def host(name: str, backend_name: str = "app", **client_auth: object) -> dict:
        return {"host": name, "client_auth": {"ca": "clients-ca.pem", **client_auth}, "paths": [{"path": "/", "backend": backend_name}]}

    document = {
        "listen": listen_section(ports),
        "tls": {"certificates": [certificate.entry()]},
        "routes": [
            host("team.test", match_subject=TEAM, pass_certificate=True),
            host("team-h2.test", "h2c", match_subject=TEAM),
            host("optional.test", verify="optional", match_subject=r"CN=alice\."),
            host("optional-open.test", verify="optional", match_subject=r"^$|CN=alice\."),
            host("noca.test", verify="optional_no_ca", match_subject=r"CN=mallory\."),
            host("page.test", match_subject=TEAM, error_page="https://help.test/certificates"),
        ],
        "backends": {
            "app": {"endpoints": [str(backend.address)]},
            "h2c": {"endpoints": [f"{LOOPBACK}:{h2c.sockets[0].getsockname()[1]}"], "protocol": "h2c"},
        },
    }
    process = await asyncio.to_thread(ProxyProcess, tmp_path, ports, document)
    try:
        yield Setup(
            process, str(tmp_path / "server-ca.pem"),
            _client(clients, tmp_path, "alice"), _client(clients, tmp_path, "carol"), _client(strangers, tmp_path, "mallory"),
        )  # fmt: skip
    finally:
        h2c.close()
        assert await asyncio.to_thread(process.stop) == 0
        assert process.tracebacks() == []


def _openssl_subject(client: Client) -> str:
    """The subject as `openssl x509 -nameopt RFC2253` prints it: nginx's $ssl_client_s_dn."""
    printed = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-nameopt", "RFC2253"], input=client.leaf_pem, capture_output=True, check=True
    )
    return printed.stdout.decode().strip().removeprefix("subject=")


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_matching_subject_is_served_and_another_from_the_same_ca_gets_403(setup: Setup, protocol: str) -> None:
    got = certificate_headers(seen(await curl(setup.port, setup.ca_file, protocol, "team.test", "/", *setup.alice.options())))
    assert got["ssl-client-verify"] == ["SUCCESS"]
    assert got["ssl-client-subject-dn"] == [_openssl_subject(setup.alice)]  # the text the pattern was searched in
    refused = await curl(setup.port, setup.ca_file, protocol, "team.test", "/", *setup.carol.options())
    assert (refused["status"], refused["body"]) == REFUSED
    # the verify mode's answers come first: no or a foreign certificate is still a 400
    assert (await curl(setup.port, setup.ca_file, protocol, "team.test", "/"))["status"] == 400
    assert (await curl(setup.port, setup.ca_file, protocol, "team.test", "/", *setup.mallory.options()))["status"] == 400


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_an_http2_backend_is_guarded_the_same_way(setup: Setup, protocol: str) -> None:
    got = seen(await curl(setup.port, setup.ca_file, protocol, "team-h2.test", "/", *setup.alice.options()))
    assert got["backend"] == "h2c" and got["headers"]["ssl-client-subject-dn"] == _openssl_subject(setup.alice)
    refused = await curl(setup.port, setup.ca_file, protocol, "team-h2.test", "/", *setup.carol.options())
    assert (refused["status"], refused["body"]) == REFUSED


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_optional_modes_match_the_empty_subject_when_there_is_no_certificate(setup: Setup, protocol: str) -> None:
    """ingress-nginx's `if` is at server level: without a certificate $ssl_client_s_dn is empty,
    so `CN=alice\\.` refuses certificate-less clients too, and `^$|...` lets them through."""
    none = await curl(setup.port, setup.ca_file, protocol, "optional.test", "/")
    assert (none["status"], none["body"]) == REFUSED
    assert seen(await curl(setup.port, setup.ca_file, protocol, "optional.test", "/", *setup.alice.options()))["backend"] == "app"
    assert (await curl(setup.port, setup.ca_file, protocol, "optional.test", "/", *setup.carol.options()))["status"] == 403
    let_through = certificate_headers(seen(await curl(setup.port, setup.ca_file, protocol, "optional-open.test", "/")))
    assert let_through == {"ssl-client-verify": ["NONE"]}
    assert (await curl(setup.port, setup.ca_file, protocol, "optional-open.test", "/", *setup.carol.options()))["status"] == 403
    # optional_no_ca: an unknown issuer is let through as FAILED, and its subject is what is matched
    unknown = certificate_headers(seen(await curl(setup.port, setup.ca_file, protocol, "noca.test", "/", *setup.mallory.options())))
    assert unknown["ssl-client-verify"][0].startswith("FAILED:")
    assert (await curl(setup.port, setup.ca_file, protocol, "noca.test", "/", *setup.alice.options()))["status"] == 403


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_the_403_is_not_sent_to_the_error_page(setup: Setup, protocol: str) -> None:
    """nginx's `error_page 495 496` covers the certificate's 400s, not match-cn's 403."""
    missing = await curl(setup.port, setup.ca_file, protocol, "page.test", "/")
    assert (missing["status"], missing["headers"]["location"]) == (302, "https://help.test/certificates")
    refused = await curl(setup.port, setup.ca_file, protocol, "page.test", "/", *setup.carol.options())
    assert (refused["status"], refused["body"]) == REFUSED and "location" not in refused["headers"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_an_acme_http01_path_skips_the_pattern_and_nothing_else_does(setup: Setup, protocol: str) -> None:
    """ingress-nginx (since 1.10.1) lets /.well-known/acme-challenge/ past match-cn so cert-manager
    can renew; a path that only starts like one (`..` kept with --path-as-is) is judged."""
    token = "/.well-known/acme-challenge/LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
    assert seen(await curl(setup.port, setup.ca_file, protocol, "team.test", token, *setup.carol.options()))["path_qs"] == token
    sneaked = await curl(
        setup.port, setup.ca_file, protocol, "team.test", "/.well-known/acme-challenge/../admin", "--path-as-is", *setup.carol.options()
    )
    assert (sneaked["status"], sneaked["body"]) == REFUSED
    assert (await curl(setup.port, setup.ca_file, protocol, "team.test", token))["status"] == 400  # verify on still asks


def _keep_alive(setup: Setup, host: str, client: Client, requests: int) -> list[bytes]:
    """`requests` GETs one after another on one TLS connection (the keep-alive path)."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.load_verify_locations(setup.ca_file)
    context.use_certificate_chain_file(str(client.cert))
    context.use_privatekey_file(str(client.key))
    responses = []
    with socket.create_connection((LOOPBACK, setup.port), timeout=20) as raw:
        connection = SSL.Connection(context, raw)
        connection.set_tlsext_host_name(host.encode())
        connection.set_connect_state()
        _waiting(raw, connection.do_handshake)
        for index in range(requests):
            connection.sendall(b"GET /%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (index, host.encode()))
            response = b""
            while not _complete(response):
                response += _waiting(raw, lambda: connection.recv(65536))
            responses.append(response)
        connection.shutdown()
    return responses


async def test_every_request_of_a_kept_alive_connection_is_judged(setup: Setup) -> None:
    refused = await asyncio.to_thread(_keep_alive, setup, "team.test", setup.carol, 3)
    assert [response.split(b"\r\n", 1)[0] for response in refused] == [b"HTTP/1.1 403 Forbidden"] * 3
    assert all(response.endswith(b"\r\n\r\nclient certificate unauthorized") for response in refused)
    served = await asyncio.to_thread(_keep_alive, setup, "team.test", setup.alice, 3)
    assert [json.loads(response.partition(b"\r\n\r\n")[2])["path_qs"] for response in served] == ["/0", "/1", "/2"]


async def _plain(setup: Setup, host: str, path: str) -> tuple[int, bytes]:
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-H", f"Host: {host}",
        f"http://{LOOPBACK}:{setup.process.ports.http}{path}", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err
    body, _, status = out.rpartition(b"\n")
    return int(status), body


async def test_the_plain_http_listener_judges_the_empty_subject(setup: Setup) -> None:
    """No TLS, no certificate: as `optional` without one (nginx: $ssl_client_s_dn is empty), but
    an ACME HTTP-01 answer (which comes over plain HTTP) passes."""
    assert await _plain(setup, "optional.test", "/") == REFUSED
    challenge = await _plain(setup, "optional.test", "/.well-known/acme-challenge/abc-DEF_123")
    assert challenge[0] == 200 and json.loads(challenge[1])["path_qs"] == "/.well-known/acme-challenge/abc-DEF_123"
