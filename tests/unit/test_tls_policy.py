"""TLS policy, ALPN and OCSP stapling, in memory: checks as tables, handshakes pumped between
pyOpenSSL peers through memory BIOs (no sockets)."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import pathlib
import textwrap

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from OpenSSL import SSL, crypto

from config.model import Certificate, Configuration, RouteTable, TlsPolicy, TlsVersion
from config.routes_file import RoutesFileError, load_routes_file
from config.tls_policy import (
    PolicyError,
    check_alpn,
    check_ciphers,
    check_ciphersuites,
    check_curves,
    check_protocols,
    check_version,
)
from ingress_watch.snapshot import Snapshot
from ingress_watch.translate import TranslateOptions, translate
from proxy.contexts import ContextCache, choose_protocol, offered_protocols
from proxy.stapling import OcspMismatch, StapledResponse
from proxy.tls import ServerTls, TlsFailure, TlsState
from tests.conftest import certificate_for
from tests.memory_tls import handshake
from tests.unit.test_contexts import install_pem_key

# ---- the checks, as tables ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, accepted",
    [
        ("ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256"),
        ("ECDHE+AESGCM:!aNULL:-RSA:@STRENGTH", "ECDHE+AESGCM:!aNULL:-RSA:@STRENGTH"),
        ("HIGH, !CBC  ECDHE+CHACHA20", "HIGH:!CBC:ECDHE+CHACHA20"),  # OpenSSL's other separators
        ("ECDHE+AESGCM:@SECLEVEL=2", "ECDHE+AESGCM:@SECLEVEL=2"),
    ],
)
def test_cipher_strings_openssl_accepts(text, accepted):
    assert check_ciphers(text, "tls.ciphersuites") == accepted


@pytest.mark.parametrize(
    "text, message",
    [
        ("ECDHE-RSA-AES128-GCM-SHA256:BOGUS", "unknown cipher 'BOGUS'"),  # OpenSSL alone would drop it silently
        ("BOGUS1:ECDHE+AESGCM:!BOGUS2", "unknown cipher 'BOGUS1', '!BOGUS2'"),  # all of them at once
        ("TLS_AES_128_GCM_SHA256", "is a TLS 1.3 suite (list TLS 1.3 suites under tls.ciphersuites)"),
        ("HIGH:!HIGH", "leaves no TLS 1.2 cipher enabled"),
        ("", "the cipher list is empty"),
        ("ECDHE-RSA-AES128-GCM-SHA256:é", "not ASCII"),
    ],
)
def test_cipher_strings_refused_with_the_names_at_fault(text, message):
    with pytest.raises(PolicyError, match=None) as refused:
        check_ciphers(text, "tls.ciphersuites")
    assert message in str(refused.value)


def test_suites_curves_versions_alpn():
    assert check_ciphersuites("TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256") == "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"
    for bad, message in [
        ("TLS_AES_128_GCM_SHA256:TLS_BOGUS", "unknown TLS 1.3 suite 'TLS_BOGUS'"),  # OpenSSL 3.0 would ignore it
        ("tls_aes_128_gcm_sha256", "unknown TLS 1.3 suite"),  # names are case-sensitive
        ("ECDHE-RSA-AES128-GCM-SHA256", "unknown TLS 1.3 suite"),
    ]:
        with pytest.raises(PolicyError, match=message):
            check_ciphersuites(bad)
    assert check_curves("X25519:prime256v1:P-384") == "X25519:prime256v1:P-384"
    with pytest.raises(PolicyError, match="unknown curve 'P-999'"):
        check_curves("X25519:P-999")
    assert check_version("tlsv1.3") is TlsVersion.TLS1_3
    with pytest.raises(PolicyError, match="RFC 8996"):
        check_version("TLSv1.1")
    assert check_protocols("TLSv1.3 TLSv1.2") == (TlsVersion.TLS1_2, TlsVersion.TLS1_3)
    assert check_protocols("TLSv1.3") == (TlsVersion.TLS1_3, TlsVersion.TLS1_3)
    with pytest.raises(PolicyError, match="'SSLv3' is not supported"):
        check_protocols("SSLv3 TLSv1.2")
    assert check_alpn(["h2", "http/1.1"]) == ("h2", "http/1.1")
    for bad in ([], ["http/1.1", "http/1.1"], [""], ["spdy/3"]):  # only protocols we speak
        with pytest.raises(PolicyError):
            check_alpn(bad)


@pytest.mark.parametrize(
    "ours, offered, chosen",
    [
        ((b"http/1.1",), [b"http/1.1"], b"http/1.1"),
        ((b"http/1.1",), [b"h2", b"http/1.1"], b"http/1.1"),
        ((b"h2", b"http/1.1"), [b"http/1.1", b"h2"], b"h2"),  # our preference, not the client's
        ((b"http/1.1",), [b"foo", b"h2"], None),
        ((b"http/1.1",), [], None),
    ],
)
def test_protocol_choice_is_ours_in_our_order(ours, offered, chosen):
    assert choose_protocol(ours, offered) == chosen


def test_offered_protocols_reads_the_wire_list():
    assert offered_protocols(b"\x02h2\x08http/1.1") == {b"h2": 1, b"http/1.1": 4}


# ---- routes file and ConfigMap ------------------------------------------------------------------


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "routes.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_routes_file_policy_is_read(tmp_path):
    path = write(
        tmp_path,
        """\
        listen: {https: 127.0.0.1:8443}
        tls:
          min_version: TLSv1.3
          ciphers: [ECDHE-ECDSA-AES256-GCM-SHA384, ECDHE-RSA-AES256-GCM-SHA384]
          ciphersuites: TLS_AES_256_GCM_SHA384
          curves: X25519:P-384
          alpn: [h2, http/1.1]
        """,
    )
    policy = load_routes_file(path).configuration.tls_policy
    assert policy == TlsPolicy(
        min_version=TlsVersion.TLS1_3,
        ciphers="ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384",
        ciphersuites="TLS_AES_256_GCM_SHA384",
        curves="X25519:P-384",
        alpn=("h2", "http/1.1"),
    )


def test_routes_file_without_policy_gets_mozilla_intermediate(tmp_path):
    assert load_routes_file(write(tmp_path, "listen: {https: 127.0.0.1:8443}\n")).configuration.tls_policy == TlsPolicy()


def test_routes_file_policy_problems_are_located_all_at_once(tmp_path):
    path = write(
        tmp_path,
        """\
        listen: {https: 127.0.0.1:8443}
        tls:
          min_version: TLSv1.1
          ciphers: [ECDHE-RSA-AES128-GCM-SHA256, NOT-A-CIPHER]
          ciphersuites: "TLS_AES_128_GCM_SHA256:TLS_NOPE"
          curves: X25519:P-999
          alpn: [http/1.1, http/1.1]
        """,
    )
    with pytest.raises(RoutesFileError) as error:
        load_routes_file(path)
    assert [str(problem) for problem in error.value.problems] == [
        f"{path}:3:16: tls.min_version: 'TLSv1.1' is not supported: TLS 1.1 and older are deprecated (RFC 8996) (use TLSv1.2 or TLSv1.3)",
        f"{path}:4:42: tls.ciphers[1]: unknown cipher 'NOT-A-CIPHER' (OpenSSL's names are listed by `openssl ciphers -v ALL`)",
        f"{path}:5:17: tls.ciphersuites: unknown TLS 1.3 suite 'TLS_NOPE' (use some of TLS_AES_128_GCM_SHA256, "
        "TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256, TLS_AES_128_CCM_SHA256)",
        f"{path}:6:11: tls.curves: unknown curve 'P-999' (use names like X25519, P-256, P-384)",
        f"{path}:7:9: tls.alpn: http/1.1 listed twice (keep one)",
    ]


def test_routes_file_min_above_max_is_a_problem(tmp_path):
    path = write(tmp_path, "listen: {https: 127.0.0.1:8443}\ntls: {min_version: TLSv1.3, max_version: TLSv1.2}\n")
    with pytest.raises(RoutesFileError, match=r":2:20: tls.min_version: the minimum version TLSv1.3 is above the maximum TLSv1.2"):
        load_routes_file(path)


def configmap(**data: str) -> Snapshot:
    return Snapshot(configmap={"metadata": {"namespace": "ingress", "name": "settings"}, "data": data})


def test_configmap_keys_in_ingress_nginx_spelling():
    translation = translate(
        configmap(
            **{
                "ssl-ciphers": "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256",
                "ssl-ciphersuites": "TLS_AES_128_GCM_SHA256",
                "ssl-protocols": "TLSv1.3",
                "ssl-ecdh-curve": "X25519",
            }
        ),
        TranslateOptions(),
    )
    assert translation.problems == ()
    assert translation.configuration.tls_policy == TlsPolicy(
        min_version=TlsVersion.TLS1_3,
        max_version=TlsVersion.TLS1_3,
        ciphers="ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256",
        ciphersuites="TLS_AES_128_GCM_SHA256",
        curves="X25519",
    )
    assert translate(configmap(**{"ssl-ecdh-curve": "auto"}), TranslateOptions()).configuration.tls_policy == TlsPolicy()


def test_configmap_bad_values_are_problems_and_keep_the_defaults():
    translation = translate(
        configmap(**{"ssl-ciphers": "AES128-SHA:BOGUS", "ssl-protocols": "TLSv1 TLSv1.2", "ssl-ciphersuites": "TLS_X"}),
        TranslateOptions(),
    )
    assert translation.configuration.tls_policy == TlsPolicy()
    messages = sorted(problem.message for problem in translation.problems)
    assert [problem.location for problem in translation.problems] == ["ConfigMap ingress/settings"] * 3
    assert messages[0].startswith("ssl-ciphers: unknown cipher 'BOGUS'") and messages[0].endswith("; using the default")
    assert messages[1].startswith("ssl-ciphersuites: unknown TLS 1.3 suite 'TLS_X'")
    assert messages[2].startswith("ssl-protocols: 'TLSv1' is not supported")


# ---- handshakes against the built contexts ------------------------------------------------------


def new_client(
    *,
    version: int | None = None,
    ciphers: bytes | None = None,
    alpn: list[bytes] | None = None,
    ocsp_seen: list[bytes] | None = None,
    server_name: bytes = b"policy.test",
) -> SSL.Connection:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if version is not None:
        context.set_min_proto_version(version)
        context.set_max_proto_version(version)
        if version < SSL.TLS1_2_VERSION:
            context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")  # let the client even try
    if ciphers is not None:
        context.set_cipher_list(ciphers)
    if alpn is not None:
        context.set_alpn_protos(alpn)
    if ocsp_seen is not None:
        context.set_ocsp_client_callback(lambda _connection, data, _: ocsp_seen.append(data) or True)
    client = SSL.Connection(context, None)
    client.set_connect_state()
    client.set_tlsext_host_name(server_name)
    if ocsp_seen is not None:
        client.request_ocsp()
    return client


def build(ca: trustme.CA, policy: TlsPolicy = TlsPolicy(), *certificates: Certificate) -> SSL.Context:
    certificates = certificates or (certificate_for(ca, "policy.test", key_type=trustme.KeyType.RSA),)
    cache = ContextCache(b"k" * 80)
    configuration = Configuration(routes=RouteTable((), ()), certificates=certificates, tls_policy=policy)
    return cache.build(configuration, install_pem_key).default


@pytest.mark.parametrize(
    "client, refused",
    [
        (dict(version=SSL.TLS1_2_VERSION, ciphers=b"ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA384"), "CBC"),
        (dict(version=SSL.TLS1_2_VERSION, ciphers=b"AES128-GCM-SHA256:AES256-GCM-SHA384"), "static RSA key exchange"),
        (dict(version=SSL.TLS1_2_VERSION, ciphers=b"DHE-RSA-AES128-GCM-SHA256"), "finite-field DHE"),
        (dict(version=SSL.TLS1_1_VERSION), "TLS 1.1"),
        (dict(version=SSL.TLS1_VERSION), "TLS 1.0"),
    ],
)
def test_default_policy_refuses_what_mozilla_intermediate_excludes(ca, client, refused):
    server = ServerTls(build(ca))
    with pytest.raises((TlsFailure, SSL.Error)):
        handshake(server, new_client(**client))
    assert server.state is TlsState.BROKEN, refused


@pytest.mark.parametrize(
    "version, ciphers, negotiated",
    [
        (SSL.TLS1_2_VERSION, b"ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256"),
        (SSL.TLS1_2_VERSION, b"ECDHE-RSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305"),
        (SSL.TLS1_3_VERSION, None, "TLS_AES_128_GCM_SHA256"),  # our order: OP_CIPHER_SERVER_PREFERENCE
    ],
)
def test_default_policy_serves_ecdhe_aead(ca, version, ciphers, negotiated):
    server, client = ServerTls(build(ca)), new_client(version=version, ciphers=ciphers)
    handshake(server, client)
    assert server.connection.get_cipher_name() == negotiated


def test_a_configured_policy_is_what_the_context_offers(ca):
    policy = TlsPolicy(min_version=TlsVersion.TLS1_3, ciphersuites="TLS_CHACHA20_POLY1305_SHA256", curves="P-384")
    server, client = ServerTls(build(ca, policy)), new_client()
    handshake(server, client)
    assert (server.version, server.connection.get_cipher_name()) == ("TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256")
    with pytest.raises((TlsFailure, SSL.Error)):
        handshake(ServerTls(build(ca, policy)), new_client(version=SSL.TLS1_2_VERSION))


def test_a_changed_policy_rebuilds_the_contexts(ca):
    cache = ContextCache(b"k" * 80)
    base = Configuration(routes=RouteTable((), ()), certificates=(certificate_for(ca, "policy.test"),))
    first = cache.build(base, install_pem_key)
    same = cache.build(base, install_pem_key)
    changed = cache.build(dataclasses.replace(base, tls_policy=TlsPolicy(curves="X25519")), install_pem_key)
    assert same.precise["policy.test"] is first.precise["policy.test"]
    assert changed.precise["policy.test"] is not first.precise["policy.test"]


# ---- ALPN (RFC 7301 §3.2) -----------------------------------------------------------------------


def test_alpn_without_overlap_is_the_fatal_no_application_protocol_alert(ca):
    server, client = ServerTls(build(ca)), new_client(alpn=[b"foo", b"spdy/3"])
    with pytest.raises(TlsFailure):
        handshake(server, client)
    assert server.state is TlsState.BROKEN
    with pytest.raises(SSL.Error, match="no application protocol"):  # the alert reached the client
        client.do_handshake()


@pytest.mark.parametrize(
    "ours, offered, negotiated",
    [
        (("http/1.1",), None, b""),  # no ALPN extension at all: still served
        (("http/1.1",), [b"h2", b"http/1.1"], b"http/1.1"),
        (("h2", "http/1.1"), [b"http/1.1", b"h2"], b"h2"),
    ],
)
def test_alpn_selection_over_the_configured_list(ca, ours, offered, negotiated):
    server, client = ServerTls(build(ca, TlsPolicy(alpn=ours))), new_client(alpn=offered)
    handshake(server, client)
    assert server.state is TlsState.OPEN
    assert client.get_alpn_proto_negotiated() == negotiated


# ---- OCSP stapling ------------------------------------------------------------------------------

NOW = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None, microsecond=0)


def ocsp_response(ca: trustme.CA, issued_pem: bytes, this_update: datetime.datetime, next_update: datetime.datetime) -> bytes:
    """A signed OCSP response for the leaf in `issued_pem`, issued by `ca` (cryptography's builder)."""
    leaf = x509.load_pem_x509_certificate(issued_pem)
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    issuer_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=leaf, issuer=issuer, algorithm=hashes.SHA1(), cert_status=ocsp.OCSPCertStatus.GOOD,
            this_update=this_update, next_update=next_update, revocation_time=None, revocation_reason=None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, issuer)
    )
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


def leaf_and_chain(certificate: Certificate, ca: trustme.CA) -> tuple[bytes, list[x509.Certificate]]:
    leaf_pem = certificate.chain_pem.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
    chain = [x509.load_pem_x509_certificate(leaf_pem), x509.load_pem_x509_certificate(ca.cert_pem.bytes())]
    return leaf_pem, chain


DAY = datetime.timedelta(days=1)


@pytest.mark.parametrize(
    "window, stapled",
    [((NOW - DAY, NOW + DAY), True), ((NOW - 2 * DAY, NOW - DAY), False), ((NOW + DAY, NOW + 2 * DAY), False)],
    ids=["valid", "expired", "not-yet-valid"],
)
def test_a_response_is_stapled_only_inside_its_window(ca, caplog, window, stapled):
    certificate = certificate_for(ca, "policy.test")
    leaf_pem, chain = leaf_and_chain(certificate, ca)
    response = StapledResponse.prepare(ocsp_response(ca, leaf_pem, *window), chain, certificate.origin)
    with caplog.at_level(logging.WARNING, "ingress_proxy.stapling"):
        results = [response.for_handshake() for _ in range(3)]
    assert results == [response.der if stapled else b""] * 3
    assert len(caplog.records) == (0 if stapled else 1), "an unusable response is logged once"


def test_a_response_for_another_certificate_or_garbage_is_refused(ca):
    mine, other = certificate_for(ca, "policy.test"), certificate_for(ca, "other.test")
    _, chain = leaf_and_chain(mine, ca)
    other_pem, _ = leaf_and_chain(other, ca)
    with pytest.raises(OcspMismatch, match="serial number differs"):
        StapledResponse.prepare(ocsp_response(ca, other_pem, NOW - DAY, NOW + DAY), chain, "test")
    other_ca = trustme.CA()
    with pytest.raises(OcspMismatch, match="issuer"):  # same serial, another issuer
        foreign_chain = [chain[0], x509.load_pem_x509_certificate(other_ca.cert_pem.bytes())]
        StapledResponse.prepare(ocsp_response(ca, leaf_and_chain(mine, ca)[0], NOW - DAY, NOW + DAY), foreign_chain, "test")
    with pytest.raises(OcspMismatch, match="not a DER OCSP response"):
        StapledResponse.prepare(b"not der", chain, "test")


@pytest.mark.parametrize("window, stapled", [((NOW - DAY, NOW + DAY), True), ((NOW - 2 * DAY, NOW - DAY), False)])
def test_the_context_staples_for_clients_that_ask(ca, window, stapled):
    certificate = certificate_for(ca, "policy.test")
    leaf_pem, _ = leaf_and_chain(certificate, ca)
    der = ocsp_response(ca, leaf_pem, *window)
    context = build(ca, TlsPolicy(), dataclasses.replace(certificate, ocsp_response=der))
    seen: list[bytes] = []
    handshake(ServerTls(context), new_client(ocsp_seen=seen))
    assert seen == [der if stapled else b""]


def test_another_certificates_response_is_reported_once_and_not_stapled(ca):
    certificate, other = certificate_for(ca, "policy.test"), certificate_for(ca, "other.test")
    der = ocsp_response(ca, leaf_and_chain(other, ca)[0], NOW - DAY, NOW + DAY)
    cache = ContextCache(b"k" * 80)
    configuration = Configuration(
        routes=RouteTable((), ()), certificates=(dataclasses.replace(certificate, ocsp_response=der),)
    )
    first = cache.build(configuration, install_pem_key)
    assert [problem.message for problem in first.problems] == [
        "OCSP response not stapled: the OCSP response is for another certificate (serial number differs)"
    ]
    assert cache.build(configuration, install_pem_key).problems == (), "a kept context is not reported again"
    seen: list[bytes] = []
    handshake(ServerTls(first.precise["policy.test"]), new_client(ocsp_seen=seen))
    assert seen == [b""]


def test_routes_file_reads_the_ocsp_file_beside_the_certificate_or_named(ca, tmp_path):
    issued = ca.issue_cert("policy.test")
    (tmp_path / "site.pem").write_bytes(issued.cert_chain_pems[0].bytes())
    (tmp_path / "site.key").write_bytes(issued.private_key_pem.bytes())
    (tmp_path / "site.pem.ocsp").write_bytes(b"beside")
    (tmp_path / "named.der").write_bytes(b"named")
    head = "listen: {https: 127.0.0.1:8443}\ntls:\n  certificates:\n"
    beside = write(tmp_path, head + "  - {cert: site.pem, key: site.key}\n")
    assert load_routes_file(beside).configuration.certificates[0].ocsp_response == b"beside"
    named = write(tmp_path, head + "  - {cert: site.pem, key: site.key, ocsp: named.der}\n")
    assert load_routes_file(named).configuration.certificates[0].ocsp_response == b"named"
    missing = write(tmp_path, head + "  - {cert: site.pem, key: site.key, ocsp: missing.der}\n")
    with pytest.raises(RoutesFileError, match=r":4:43: tls.certificates\[0\].ocsp: cannot read .*missing.der"):
        load_routes_file(missing)
    (tmp_path / "site.pem.ocsp").unlink()
    beside = write(tmp_path, head + "  - {cert: site.pem, key: site.key}\n")
    assert load_routes_file(beside).configuration.certificates[0].ocsp_response is None


def test_routes_file_cipher_list_with_exclusions_reports_only_the_unknown_items(tmp_path):
    path = write(tmp_path, "listen: {https: 127.0.0.1:8443}\ntls: {ciphers: [ECDHE+AESGCM, '!aNULL', BOGUS, -RSA]}\n")
    with pytest.raises(RoutesFileError) as error:
        load_routes_file(path)
    assert [str(problem) for problem in error.value.problems] == [
        f"{path}:2:41: tls.ciphers[2]: unknown cipher 'BOGUS' (OpenSSL's names are listed by `openssl ciphers -v ALL`)"
    ]
    fine = write(tmp_path, "listen: {https: 127.0.0.1:8443}\ntls: {ciphers: [ECDHE+AESGCM, '!aNULL', -RSA]}\n")
    assert load_routes_file(fine).configuration.tls_policy.ciphers == "ECDHE+AESGCM:!aNULL:-RSA"
    empty = write(tmp_path, "listen: {https: 127.0.0.1:8443}\ntls: {ciphers: [HIGH, '!HIGH']}\n")
    with pytest.raises(RoutesFileError, match=r":2:16: tls.ciphers: 'HIGH:!HIGH' leaves no TLS 1.2 cipher enabled"):
        load_routes_file(empty)
