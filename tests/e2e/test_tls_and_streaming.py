"""TLS behaviour (SNI, versions, key types, resumption) and bounded-memory streaming, end to end."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess

import aiohttp
import pytest
import trustme

from config.model import PathType
from tests.conftest import certificate_for, simple_configuration
from tests.e2e.helpers import closed_by_peer, open_raw, read_response, rss_bytes, tls_client_context

P = PathType.PREFIX
MiB = 1024 * 1024


@pytest.fixture
async def tls_proxy(ca, start_proxy, start_backend):
    backend = await start_backend("app")
    certificates = (
        certificate_for(ca, "ec.test", "both.test", key_type=trustme.KeyType.ECDSA),
        certificate_for(ca, "rsa.test", "both.test", key_type=trustme.KeyType.RSA),
        certificate_for(ca, "*.wild.test"),
    )
    configuration = simple_configuration({"app": [backend.address]}, {"": [("/", P, "app")]}, certificates=certificates)
    return await start_proxy(configuration), backend


def _handshake(port: int, context: ssl.SSLContext, server_name: str, session=None) -> tuple[dict, str, bool, object, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_name, session=session) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % server_name.encode())
            while tls.recv(65536):
                pass
            cipher = tls.cipher()
            return tls.getpeercert(), tls.version(), tls.session_reused, tls.session, cipher[0]


def _names(certificate: dict) -> set[str]:
    return {value for kind, value in certificate["subjectAltName"]}


@pytest.mark.parametrize("server_name, expected", [("ec.test", "ec.test"), ("rsa.test", "rsa.test"), ("a.wild.test", "*.wild.test")])
async def test_sni_selects_the_certificate(ca, tls_proxy, server_name, expected):
    proxy, _ = tls_proxy
    certificate, *_ = await asyncio.to_thread(_handshake, proxy.https_port, tls_client_context(ca), server_name)
    assert expected in _names(certificate)


async def test_unknown_sni_gets_the_generated_default_certificate(tls_proxy):
    proxy, _ = tls_proxy
    reader, writer = await open_raw(proxy.https_port, tls_client_context(), "unknown.test")
    certificate = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    from cryptography import x509

    subject = x509.load_der_x509_certificate(certificate).subject.rfc4514_string()
    assert "ingress-proxy default certificate" in subject
    writer.close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_tls12_and_tls13_with_resumption(ca, tls_proxy, version):
    proxy, _ = tls_proxy
    context = tls_client_context(ca, minimum_version=version, maximum_version=version)
    _, negotiated, reused, session, _ = await asyncio.to_thread(_handshake, proxy.https_port, context, "ec.test")
    assert negotiated == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    assert not reused
    for _ in range(3):  # quiet shutdown keeps the session resumable again and again
        _, _, reused, session, _ = await asyncio.to_thread(_handshake, proxy.https_port, context, "ec.test", session)
        assert reused


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_session_resumption_can_be_switched_off(ca, start_proxy, start_backend, version):
    backend = await start_backend("app")
    configuration = simple_configuration(
        {"app": [backend.address]}, {"": [("/", P, "app")]},
        certificates=(certificate_for(ca, "ec.test"),), session_resumption=False,
    )
    proxy = await start_proxy(configuration)
    context = tls_client_context(ca, minimum_version=version, maximum_version=version)
    _, _, _, session, _ = await asyncio.to_thread(_handshake, proxy.https_port, context, "ec.test")
    _, _, reused, _, _ = await asyncio.to_thread(_handshake, proxy.https_port, context, "ec.test", session)
    assert not reused


async def test_ecdsa_preferred_rsa_for_clients_without_ecdsa(ca, tls_proxy):
    proxy, _ = tls_proxy
    context = tls_client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2)
    _, _, _, _, cipher = await asyncio.to_thread(_handshake, proxy.https_port, context, "both.test")
    assert "ECDSA" in cipher
    context.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    _, _, _, _, cipher = await asyncio.to_thread(_handshake, proxy.https_port, context, "both.test")
    assert cipher == "ECDHE-RSA-AES128-GCM-SHA256"



async def test_real_clients_openssl_and_curl(ca, tls_proxy, tmp_path):
    proxy, _ = tls_proxy
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    s_client = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"127.0.0.1:{proxy.https_port}", "-servername", "rsa.test",
        "-CAfile", str(ca_file), "-verify_return_error", "-alpn", "http/1.1",  # h2 is preferred when offered: test_http2
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    output = (await asyncio.wait_for(s_client.communicate(), 10))[0].decode()
    assert "Verify return code: 0 (ok)" in output and "ALPN protocol: http/1.1" in output
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--cacert", str(ca_file), "--resolve", f"ec.test:{proxy.https_port}:127.0.0.1",
        f"https://ec.test:{proxy.https_port}/via-curl", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(curl.communicate(), 10)
    assert curl.returncode == 0, err
    assert b'"path_qs": "/via-curl"' in out


async def test_garbage_and_stalled_handshakes_are_closed(tls_proxy):
    proxy, _ = tls_proxy
    reader, writer = await open_raw(proxy.https_port)
    writer.write(b"\x16\x03\x01\x00\x05hello")  # a handshake record that is no ClientHello
    assert await closed_by_peer(reader)
    reader, writer = await open_raw(proxy.https_port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP to the TLS port
    assert await closed_by_peer(reader)
    reader, writer = await open_raw(proxy.https_port, tls_client_context(), "ec.test")
    writer.write(b"GET / HTTP/1.1\r\nHost: ec.test\r\n\r\n")  # and the proxy still serves others
    status, _, _ = await read_response(reader)
    assert status == 200


async def test_stalled_handshake_is_cut_at_the_handshake_timeout(start_proxy, start_backend):
    from config.model import Timeouts

    backend = await start_backend("app")
    configuration = simple_configuration(
        {"app": [backend.address]}, {"": [("/", P, "app")]}, timeouts=Timeouts(handshake=0.5, drain=1)
    )
    proxy = await start_proxy(configuration)
    reader, writer = await open_raw(proxy.https_port)
    writer.write(b"\x16\x03\x01\x02\x00" + b"\x01" * 100)  # half a ClientHello, then silence
    started = asyncio.get_running_loop().time()
    assert await closed_by_peer(reader, timeout=5)
    assert asyncio.get_running_loop().time() - started < 2


async def test_100_mib_each_way_streams_with_bounded_memory(ca, tls_proxy):
    proxy, _ = tls_proxy
    size = 100 * MiB
    before = rss_bytes()
    connector = aiohttp.TCPConnector(ssl=tls_client_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"https://127.0.0.1:{proxy.https_port}/stream/{size}") as response:
            received = 0
            async for chunk in response.content.iter_chunked(256 * 1024):
                received += len(chunk)
        assert received == size

        async def upload():
            piece = b"y" * MiB
            for _ in range(100):
                yield piece

        async with session.post(f"https://127.0.0.1:{proxy.https_port}/sink", data=upload()) as response:
            assert (await response.json())["received"] == size
    growth = rss_bytes() - before
    assert growth < 40 * MiB, f"RSS grew {growth / MiB:.0f} MiB while streaming 200 MiB"


async def test_client_that_never_reads_does_not_grow_memory(tls_proxy):
    proxy, _ = tls_proxy
    before = rss_bytes()
    reader, writer = await open_raw(proxy.http_port)
    writer.write(b"GET /stream/%d HTTP/1.1\r\nHost: x\r\n\r\n" % (200 * MiB))
    await asyncio.sleep(1.5)  # the backend would send 200 MiB in far less if nothing held it back
    growth = rss_bytes() - before
    writer.close()
    assert growth < 30 * MiB, f"RSS grew {growth / MiB:.0f} MiB for a client that does not read"
