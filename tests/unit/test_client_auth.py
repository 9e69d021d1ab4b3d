"""Client certificates per host: the verdict table, the ClientHello parse, the headers, and real
handshakes in memory through `ContextCache` (which context asks, what a resumed session carries,
and that sessions never cross between hosts with different client auth)."""

from __future__ import annotations

import re
import urllib.parse

import pytest
import trustme
from OpenSSL import SSL, crypto
from OpenSSL._util import lib

from config.model import ClientAuth, ClientVerify, Configuration, PathRule, PathType, RouteTable, VirtualHost
from proxy import client_auth
from proxy.client_auth import (
    CERTIFICATE_ERROR,
    MISDIRECTED,
    NO_CERTIFICATE,
    SUBJECT_MISMATCH,
    subject_matches,
    verdict,
    verification_of,
)
from proxy.contexts import ContextCache
from proxy.tls import ServerTls, TlsState
from tests.conftest import certificate_for
from tests.memory_tls import handshake, pending
from tests.unit.test_contexts import install_pem_key

ON, OPTIONAL, NO_CA = ClientVerify.ON, ClientVerify.OPTIONAL, ClientVerify.OPTIONAL_NO_CA
OK = lib.X509_V_OK
UNKNOWN_ISSUER = lib.X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
TOO_LONG = lib.X509_V_ERR_CERT_CHAIN_TOO_LONG
EXPIRED = lib.X509_V_ERR_CERT_HAS_EXPIRED


@pytest.mark.parametrize(
    ("verify", "has_certificate", "error", "expected"),
    [
        (ON, False, OK, NO_CERTIFICATE),
        (ON, True, OK, "SUCCESS"),
        (ON, True, UNKNOWN_ISSUER, CERTIFICATE_ERROR),
        (ON, True, TOO_LONG, CERTIFICATE_ERROR),
        (OPTIONAL, False, OK, "NONE"),
        (OPTIONAL, True, OK, "SUCCESS"),
        (OPTIONAL, True, UNKNOWN_ISSUER, CERTIFICATE_ERROR),
        (NO_CA, False, OK, "NONE"),
        (NO_CA, True, OK, "SUCCESS"),
        (NO_CA, True, UNKNOWN_ISSUER, "FAILED:unable to verify the first certificate"),
        (NO_CA, True, EXPIRED, CERTIFICATE_ERROR),  # only an unknown issuer is optional (nginx)
        (NO_CA, True, TOO_LONG, CERTIFICATE_ERROR),
    ],
)
def test_verdict_follows_nginx(verify, has_certificate, error, expected):
    assert verdict(verify, has_certificate, error) == expected


def _server_name_extension(*entries: tuple[int, bytes]) -> bytes:
    body = b"".join(bytes([kind]) + len(name).to_bytes(2, "big") + name for kind, name in entries)
    return len(body).to_bytes(2, "big") + body


@pytest.mark.parametrize(
    ("extension", "expected"),
    [
        (_server_name_extension((0, b"a.test")), b"a.test"),
        (_server_name_extension((7, b"x"), (0, b"b.test")), b"b.test"),
        (_server_name_extension((7, b"x")), None),
        (_server_name_extension((0, b"a.test"))[:-1], None),  # truncated
        (b"\x00\x0a\x00\x00\x06a.test", None),  # the list length disagrees
        (b"", None),
    ],
)
def test_server_name_from_the_client_hello(extension, expected):
    assert client_auth.server_name(extension) == expected


def test_certificate_headers_as_ingress_nginx_sends_them():
    ca = trustme.CA(organization_name="Test CA")
    leaf_pem = ca.issue_cert("alice@example.test", common_name="alice").cert_chain_pems[0].bytes()
    leaf = client_auth.presented(_x509(leaf_pem))
    headers = dict(client_auth.certificate_headers("SUCCESS", leaf, pass_certificate=True))
    assert headers[b"ssl-client-verify"] == b"SUCCESS"
    assert headers[b"ssl-client-subject-dn"].startswith(b"CN=alice")
    assert b"O=Test CA" in headers[b"ssl-client-issuer-dn"]
    assert urllib.parse.unquote(headers[b"ssl-client-cert"].decode()).encode() == leaf_pem
    assert b"\n" not in headers[b"ssl-client-cert"] and b" " not in headers[b"ssl-client-cert"]
    without = dict(client_auth.certificate_headers("SUCCESS", leaf, pass_certificate=False))
    assert b"ssl-client-cert" not in without and b"ssl-client-subject-dn" in without
    assert client_auth.certificate_headers("NONE", None, pass_certificate=True) == ((b"ssl-client-verify", b"NONE"),)


def _x509(pem: bytes) -> crypto.X509:
    return crypto.load_certificate(crypto.FILETYPE_PEM, pem)


def _leaf_with_subject(subject: str) -> bytes:
    """A self-signed certificate whose subject is `openssl req -subj` text (e.g. /CN=a/O=b)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name.from_rfc4514_string(subject)
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )  # fmt: skip
    return certificate.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("rfc4514", "nginx_form"),
    [
        ("CN=alice,O=Acme\\, Inc.,C=DE", b"CN=alice,O=Acme\\, Inc.,C=DE"),  # most specific first, "," escaped
        # short names where RFC 4514 printers (cryptography's) write the OID: the case that differed
        ("1.2.840.113549.1.9.1=a@example.test,CN=alice", b"emailAddress=a@example.test,CN=alice"),
        ("CN=b+UID=7,O=x", b"UID=7+CN=b,O=x"),  # a multi-valued RDN joined with "+", in OpenSSL's order
        ("CN=J\u00fcrgen", b"CN=J\\C3\\BCrgen"),  # non-ASCII: UTF-8 bytes escaped, as nginx sends them
    ],
)
def test_the_subject_dn_is_printed_as_nginx_prints_ssl_client_s_dn(rfc4514, nginx_form):
    """OpenSSL's XN_FLAG_RFC2253 print, the one nginx uses for $ssl_client_s_dn (and `openssl x509
    -nameopt RFC2253`): the header value and the text the subject pattern is searched in."""
    leaf = client_auth.presented(_x509(_leaf_with_subject(rfc4514)))
    assert leaf.subject_dn == nginx_form and leaf.issuer_dn == nginx_form  # self-signed


@pytest.mark.parametrize(
    ("pattern", "subject_dn", "matches"),
    [
        ("CN=(alice|bob)\\.example", b"CN=bob.example,O=Acme", True),
        ("CN=(alice|bob)\\.example", b"CN=carol.example,O=Acme", False),
        ("CN=alice", b"OU=x,CN=alice2,O=y", True),  # searched, not anchored (nginx ~)
        ("^CN=alice,", b"OU=x,CN=alice,O=y", False),  # anchors are the user's
        ("CN=alice", b"CN=ALICE", False),  # case-sensitive (nginx ~, not ~*)
        ("(?i)CN=alice", b"CN=ALICE", True),
        ("CN=alice", b"", False),  # no certificate: the empty DN
        ("^$|CN=alice", b"", True),  # a pattern may let "no certificate" through, as in nginx
        ("CN=a", b"CN=a," + b"O=x," * 600, False),  # over MAX_REGEX_SUBJECT: matches no pattern
    ],
)
def test_subject_pattern_table(pattern, subject_dn, matches):
    assert subject_matches(re.compile(pattern), subject_dn) is matches


def test_a_subject_pattern_is_judged_after_the_verdict_and_never_redirected():
    ca = trustme.CA()
    ca_pem = ca.cert_pem.bytes()
    alice = _x509(ca.issue_cert("alice.test", common_name="alice").cert_chain_pems[0].bytes())
    only_bob = ClientAuth(ca_pem, ON, match_subject=re.compile("CN=bob"), error_page="https://example.test/help")
    only_alice = ClientAuth(ca_pem, OPTIONAL, match_subject=re.compile("CN=alice"))
    assert client_auth.ClientVerification(only_bob, OK, alice).answer(only_bob, "/") is SUBJECT_MISMATCH  # 403, no 302
    assert SUBJECT_MISMATCH.status == 403 and SUBJECT_MISMATCH.body == b"client certificate unauthorized"
    # the verdict first: a missing or bad certificate keeps its 400 (here the error page's 302)
    assert client_auth.ClientVerification(only_bob, OK, None).answer(only_bob, "/").status == 302
    assert client_auth.ClientVerification(only_bob, EXPIRED, alice).answer(only_bob, "/").status == 302
    headers = dict(client_auth.ClientVerification(only_alice, OK, alice).answer(only_alice, "/"))
    assert headers[b"ssl-client-verify"] == b"SUCCESS" and headers[b"ssl-client-subject-dn"].startswith(b"CN=alice")
    # optional without a certificate: the empty DN does not match, so 403 (nginx's server-level if)
    assert client_auth.ClientVerification(only_alice, OK, None).answer(only_alice, "/") is SUBJECT_MISMATCH
    assert client_auth.plaintext_answer(only_alice, "/") is SUBJECT_MISMATCH
    # optional_no_ca lets an unknown issuer through: its (unverified) subject is what is matched
    no_ca = ClientAuth(ca_pem, NO_CA, match_subject=re.compile("CN=alice"))
    unknown = dict(client_auth.ClientVerification(no_ca, UNKNOWN_ISSUER, alice).answer(no_ca, "/"))
    assert unknown[b"ssl-client-verify"].startswith(b"FAILED:")


@pytest.mark.parametrize(
    ("path", "exempt"),
    [
        ("/.well-known/acme-challenge/LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0", True),
        ("/.well-known/acme-challenge/abc_-9", True),
        ("/.well-known/acme-challenge/", False),  # no token
        ("/.well-known/acme-challenge/../admin", False),  # a backend would normalise it to /admin
        ("/.well-known/acme-challenge/%2e%2e/admin", False),
        ("/.well-known/acme-challenge/a/b", False),
        ("//.well-known/acme-challenge/a", False),
        ("/.well-known/acme-challenge/a.b", False),  # "." is not base64url
        ("/admin/.well-known/acme-challenge/a", False),
        ("http://team.test/.well-known/acme-challenge/a", False),  # absolute form: judged
    ],
)
def test_only_an_acme_http01_path_of_exactly_that_shape_skips_the_subject_pattern(path, exempt):
    ca = trustme.CA()
    carol = _x509(ca.issue_cert("carol.test", common_name="carol").cert_chain_pems[0].bytes())
    only_alice = ClientAuth(ca.cert_pem.bytes(), OPTIONAL, match_subject=re.compile("CN=alice"))
    assert client_auth.is_acme_challenge(path) is exempt
    verification = client_auth.ClientVerification(only_alice, OK, carol)
    answered = verification.answer(only_alice, path)
    assert (answered is SUBJECT_MISMATCH) is not exempt
    assert verification.answer(only_alice, "/") is SUBJECT_MISMATCH  # the connection's other requests stay judged
    assert (client_auth.plaintext_answer(only_alice, path) is SUBJECT_MISMATCH) is not exempt
    # only the pattern is skipped: the verify mode's 400s still apply to a challenge path
    required = ClientAuth(ca.cert_pem.bytes(), ON, match_subject=re.compile("CN=alice"))
    assert client_auth.plaintext_answer(required, path) is NO_CERTIFICATE


def test_an_error_page_turns_the_certificate_refusals_into_a_redirect():
    ca_pem = trustme.CA().cert_pem.bytes()
    paged = ClientAuth(ca_pem, ON, error_page="https://example.test/cert-help")
    missing = client_auth.ClientVerification(paged, lib.X509_V_OK, None).answer(paged, "/")
    assert missing == client_auth.Refusal(302, b"", b"Location: https://example.test/cert-help\r\n")
    assert client_auth.plaintext_answer(paged, "/") == missing
    plain = ClientAuth(ca_pem, ON)
    assert client_auth.ClientVerification(plain, lib.X509_V_OK, None).answer(plain, "/") is NO_CERTIFICATE
    assert client_auth.ClientVerification(paged, lib.X509_V_OK, None).answer(plain, "/") is MISDIRECTED  # never redirected


def test_a_bundle_that_does_not_parse_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="no PEM certificate"):
        client_auth.ca_certificates(b"not a certificate")
    with pytest.raises(ValueError, match="does not parse"):
        client_auth.ca_certificates(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


# -- real handshakes in memory ----------------------------------------------------------------


@pytest.fixture(scope="module")
def cas() -> dict[str, trustme.CA]:
    return {"server": trustme.CA(), "one": trustme.CA(), "two": trustme.CA()}


def _configuration(cas: dict[str, trustme.CA], auth_b: ClientAuth, auth_c: ClientAuth | None = None) -> Configuration:
    hosts = [VirtualHost("a.test", (PathRule("/", PathType.PREFIX, "app"),))]
    hosts.append(VirtualHost("b.test", (PathRule("/", PathType.PREFIX, "app"),), client_auth=auth_b))
    if auth_c is not None:
        hosts.append(VirtualHost("c.test", (PathRule("/", PathType.PREFIX, "app"),), client_auth=auth_c))
    # one certificate for all three names: only client auth tells their contexts apart
    certificate = certificate_for(cas["server"], "a.test", "b.test", "c.test")
    return Configuration(routes=RouteTable(tuple(hosts), ()), certificates=(certificate,))


def _auth(ca: trustme.CA, verify: ClientVerify = ON, depth: int = 1) -> ClientAuth:
    return ClientAuth(ca.cert_pem.bytes(), verify, depth)


def _client(name: bytes, version: int, issued: trustme.LeafCert | None, session: SSL.Session | None = None) -> SSL.Connection:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(version)
    context.set_max_proto_version(version)
    if issued is not None:
        chain = issued.cert_chain_pems
        context.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, chain[0].bytes()))
        for intermediate in chain[1:]:
            context.add_extra_chain_cert(crypto.load_certificate(crypto.FILETYPE_PEM, intermediate.bytes()))
        context.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, issued.private_key_pem.bytes()))
    client = SSL.Connection(context, None)
    client.set_connect_state()
    client.set_tlsext_host_name(name)
    if session is not None:
        client.set_session(session)
    return client


def _connect(cache: ContextCache, name: bytes, version: int, issued=None, session=None) -> tuple[ServerTls, SSL.Connection]:
    """A full exchange: handshake, then one byte each way (so a TLS 1.3 client has its tickets)."""
    assert cache.current is not None
    server, client = ServerTls(cache.current.default), _client(name, version, issued, session)
    handshake(server, client)
    assert server.state is TlsState.OPEN
    server.send(b"x")
    client.bio_write(server.outgoing())
    assert client.recv(1) == b"x"
    return server, client


VERSIONS = pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION], ids=["tls1.2", "tls1.3"])


@VERSIONS
def test_only_a_client_auth_host_asks_and_its_verdict_is_recorded(cas, version):
    cache = ContextCache(b"k" * 80)
    cache.build(_configuration(cas, _auth(cas["one"])), install_pem_key)
    alice = cas["one"].issue_cert("alice")
    server, _ = _connect(cache, b"a.test", version, alice)
    assert verification_of(server.connection) is None  # no CertificateRequest: the client sent none
    assert server.connection.get_peer_certificate() is None
    server, _ = _connect(cache, b"b.test", version, alice)
    verification = verification_of(server.connection)
    assert verification is not None and verification.error == lib.X509_V_OK and verification.leaf is not None
    server, _ = _connect(cache, b"b.test", version, cas["two"].issue_cert("mallory"))
    verification = verification_of(server.connection)
    assert verification is not None and verification.answer(_auth(cas["one"]), "/") is CERTIFICATE_ERROR
    server, _ = _connect(cache, b"b.test", version)
    verification = verification_of(server.connection)
    assert verification is not None and verification.answer(_auth(cas["one"]), "/") is NO_CERTIFICATE
    assert verification.answer(_auth(cas["two"]), "/") is MISDIRECTED  # verified for other settings


@VERSIONS
def test_depth_counts_the_intermediates_between_the_client_and_a_bundle_ca(cas, version):
    """OpenSSL 3's verify depth (nginx passes ssl_verify_depth through): the trust anchor is not
    counted, so depth 1 (the default) allows one intermediate and depth 0 none."""
    root = trustme.CA()
    intermediate = root.create_child_ca()
    bob = intermediate.issue_cert("bob")  # chain: bob, intermediate (sent by the client), root (trusted)
    answers = {}
    for depth in (0, 1, 2):
        cache = ContextCache(b"k" * 80)
        cache.build(_configuration(cas, _auth(root, depth=depth)), install_pem_key)
        server, _ = _connect(cache, b"b.test", version, bob)
        verification = verification_of(server.connection)
        assert verification is not None
        answer = verification.answer(_auth(root, depth=depth), "/")
        answers[depth] = answer if isinstance(answer, client_auth.Refusal) else dict(answer)[b"ssl-client-verify"]
    assert answers == {0: CERTIFICATE_ERROR, 1: b"SUCCESS", 2: b"SUCCESS"}


@VERSIONS
def test_a_resumed_session_carries_the_verified_identity_and_never_crosses_hosts(cas, version):
    cache = ContextCache(b"k" * 80)
    cache.build(_configuration(cas, _auth(cas["one"]), _auth(cas["two"])), install_pem_key)
    alice = cas["one"].issue_cert("alice")
    server, client = _connect(cache, b"b.test", version, alice)
    assert not server.resumed
    from_b = client.get_session()

    again, _ = _connect(cache, b"b.test", version, session=from_b)  # no certificate offered this time
    assert again.resumed
    verification = verification_of(again.connection)
    assert verification is not None and verification.leaf is not None and verification.error == lib.X509_V_OK

    on_c, _ = _connect(cache, b"c.test", version, session=from_b)  # another CA's host: full handshake
    assert not on_c.resumed
    verification = verification_of(on_c.connection)
    assert verification is not None and verification.leaf is None

    on_a, _ = _connect(cache, b"a.test", version, session=from_b)
    assert not on_a.resumed

    server, client = _connect(cache, b"a.test", version)
    from_a = client.get_session()
    assert _connect(cache, b"a.test", version, session=from_a)[0].resumed  # as before client auth existed
    on_b, _ = _connect(cache, b"b.test", version, alice, session=from_a)
    assert not on_b.resumed
    verification = verification_of(on_b.connection)
    assert verification is not None and verification.leaf is not None  # asked afresh


def test_hosts_without_client_auth_keep_their_contexts(cas):
    cache = ContextCache(b"k" * 80)
    plain = Configuration(
        routes=RouteTable((VirtualHost("a.test", (PathRule("/", PathType.PREFIX, "app"),)),), ()),
        certificates=(certificate_for(cas["server"], "a.test", "b.test"),),
    )
    first = cache.build(plain, install_pem_key)
    assert first.precise["a.test"].get_verify_mode() == SSL.VERIFY_NONE
    with_auth = Configuration(
        routes=RouteTable(plain.routes.virtual_hosts + _configuration(cas, _auth(cas["one"])).routes.virtual_hosts[1:], ()),
        certificates=plain.certificates,
    )
    second = cache.build(with_auth, install_pem_key)
    assert second.precise["a.test"] is first.precise["a.test"]
    assert second.default is first.default
    assert second.precise["b.test"] is not first.precise["b.test"]
    assert client_auth.client_auth_of(second.precise["b.test"]) == _auth(cas["one"])
    assert client_auth.client_auth_of(second.precise["a.test"]) is None


def test_a_host_without_a_certificate_of_its_own_gets_a_client_auth_context(cas):
    cache = ContextCache(b"k" * 80)
    wildcard = certificate_for(cas["server"], "*.w.test")
    hosts = (
        VirtualHost("pay.w.test", (PathRule("/", PathType.PREFIX, "app"),), client_auth=_auth(cas["one"])),
        VirtualHost("*.api.test", (PathRule("/", PathType.PREFIX, "app"),), client_auth=_auth(cas["two"])),
    )
    contexts = cache.build(Configuration(routes=RouteTable(hosts, ()), certificates=(wildcard,)), install_pem_key)
    assert client_auth.client_auth_of(contexts.for_server_name(b"pay.w.test")) == _auth(cas["one"])
    assert client_auth.client_auth_of(contexts.for_server_name(b"other.w.test")) is None
    assert client_auth.client_auth_of(contexts.for_server_name(b"x.api.test")) == _auth(cas["two"])  # default certificate
