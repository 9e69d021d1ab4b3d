"""Async offload through an OpenSSL 3 provider: the C fixture provider (tests/engine/async_provider)
holds the keys and signs on worker threads, pausing handshakes with ASYNC_pause_job; its counters
and gate prove that handshakes really wait in ASYNC_PAUSED side by side and all complete."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator

import pytest
import trustme
from prometheus_client import REGISTRY

from config.crypto import CryptoRuntime
from config.model import Certificate, PathType, Timeouts
from proxy.doctor import run_doctor
from tests.conftest import simple_configuration
from tests.e2e.helpers import open_raw, read_response
from tests.engine.conftest import FixtureProviderProbe, ServerIdentity, client_context, server_context
from tests.engine.tls_pump import TlsTestServer, pump_handshakes, s_client, signature_type


@pytest.fixture
def provider_runtime(provider_probe: FixtureProviderProbe) -> Iterator[CryptoRuntime]:
    runtime = CryptoRuntime.start(provider_probe.settings())
    yield runtime
    runtime.close()


@pytest.mark.parametrize(
    ("key_name", "options", "counter", "signature"),
    [
        ("rsa", ("-tls1_3",), "rsa_sign", "RSA-PSS"),
        ("rsa", ("-tls1_2", "-sigalgs", "RSA+SHA256"), "rsa_sign", "RSA"),  # PKCS#1 v1.5
        ("rsa", ("-tls1_2",), "rsa_sign", "RSA-PSS"),
        ("ec", ("-tls1_3",), "ec_sign", "ECDSA"),
        ("ec", ("-tls1_2",), "ec_sign", "ECDSA"),
    ],
)
async def test_provider_keys_sign_every_handshake_kind_in_async_mode(
    provider_runtime: CryptoRuntime,
    provider_probe: FixtureProviderProbe,
    provider_identities: dict[str, ServerIdentity],
    ca_file: str,
    key_name: str,
    options: tuple[str, ...],
    counter: str,
    signature: str,
) -> None:
    context, label = server_context(provider_runtime, provider_identities[key_name])
    assert label == "provider:testoffload"
    async with TlsTestServer(context) as server:
        output = await s_client(server.port, ca_file, *options)
    assert signature_type(output) == signature and "Verification: OK" in output
    counters = provider_probe.counters()
    assert counters[counter] == counters["signatures"] == counters["offloaded"] == 1
    assert counters["synchronous"] == 0
    assert server.handshakes == 1  # (a worker may finish before the job pauses: no want_async then)


def test_32_handshakes_paused_at_once_in_one_thread(
    provider_runtime: CryptoRuntime, provider_probe: FixtureProviderProbe,
    provider_identities: dict[str, ServerIdentity], ca: trustme.CA,
) -> None:
    """Gate closed: no signature can finish, so the pump completes only if all 32 handshakes sit in
    ASYNC_PAUSED side by side (a blocking provider call would hang this one thread)."""
    context, _ = server_context(provider_runtime, provider_identities["rsa"])
    provider_probe.set_gate(False)
    seen_when_stalled: dict[str, int] = {}

    def open_gate() -> None:
        seen_when_stalled.update(provider_probe.counters())
        provider_probe.set_gate(True)

    result = pump_handshakes(context, client_context(ca), 32, when_stalled=open_gate)
    assert seen_when_stalled["in_flight"] == 32
    assert result.peak_paused == 32 and len(result.servers) == 32
    counters = provider_probe.counters()
    assert counters["offloaded"] == counters["rsa_sign"] == 32
    assert counters["synchronous"] == 0 and counters["in_flight"] == 0


def test_without_async_mode_the_provider_signs_synchronously(
    provider_probe: FixtureProviderProbe, provider_identities: dict[str, ServerIdentity], ca: trustme.CA
) -> None:
    runtime = CryptoRuntime.start(provider_probe.settings(async_mode=False))
    try:
        context, _ = server_context(runtime, provider_identities["ec"])
        assert pump_handshakes(context, client_context(ca), 4).want_async == 0
    finally:
        runtime.close()
    counters = provider_probe.counters()
    assert counters["synchronous"] == counters["ec_sign"] == 4 and counters["offloaded"] == 0


def test_a_key_is_taken_from_the_provider_once_per_runtime(
    provider_runtime: CryptoRuntime, provider_probe: FixtureProviderProbe, provider_identities: dict[str, ServerIdentity]
) -> None:
    for _ in range(3):
        server_context(provider_runtime, provider_identities["rsa"])
    assert provider_probe.counters()["keys_loaded"] == 1


def test_doctor_signs_through_the_fixture_provider(
    provider_probe: FixtureProviderProbe, provider_identities: dict[str, ServerIdentity]
) -> None:
    keys = [provider_identities["rsa"].key, provider_identities["ec"].key]
    lines, ok = run_doctor(provider_probe.settings(), keys)
    assert ok, lines
    text = "\n".join(lines)
    assert f"provider testoffload: active, from {provider_probe.library_path}" in text
    assert "rsa.pem: test signature OK via provider testoffload (RSA-2048" in text
    assert "ec.pem: test signature OK via provider testoffload (EC-256" in text
    assert provider_probe.counters()["synchronous"] == 2  # doctor signs outside an async job


@pytest.mark.e2e
async def test_proxy_parks_16_handshakes_on_the_async_provider(
    start_proxy, start_backend, provider_probe: FixtureProviderProbe,
    provider_identities: dict[str, ServerIdentity], ca: trustme.CA,
) -> None:
    """The real proxy: with the gate closed 16 clients' handshakes are all in flight at once (parked
    on the event loop), opening it lets every request through; metrics name the provider."""
    clients = 16
    backend = await start_backend("app")
    identity = provider_identities["rsa"]
    configuration = simple_configuration(
        {"app": [backend.address]},
        {"": [("/", PathType.PREFIX, "app")]},
        certificates=(Certificate(identity.chain_pem, identity.key, ("localhost",), "test:provider"),),
        crypto=provider_probe.settings(),
    )
    proxy = await start_proxy(configuration)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    labels = {"version": "TLSv1.3", "key_source": "provider:testoffload", "resumed": "no"}
    before = REGISTRY.get_sample_value("ingress_proxy_tls_handshakes_total", labels) or 0.0
    pauses_before = REGISTRY.get_sample_value("ingress_proxy_tls_async_pauses_total") or 0.0

    async def one_request() -> int:
        reader, writer = await open_raw(proxy.https_port, client_tls, "localhost")
        writer.write(b"GET /parked HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        status, _, _ = await read_response(reader)
        writer.close()
        return status

    provider_probe.set_gate(False)
    requests = [asyncio.create_task(one_request()) for _ in range(clients)]
    try:
        async with asyncio.timeout(30):
            while provider_probe.counters()["in_flight"] < clients:
                await asyncio.sleep(0.01)
    finally:
        provider_probe.set_gate(True)
    assert await asyncio.gather(*requests) == [200] * clients
    counters = provider_probe.counters()
    assert counters["peak_in_flight"] == clients and counters["offloaded"] == clients
    assert (REGISTRY.get_sample_value("ingress_proxy_tls_handshakes_total", labels) or 0.0) - before == clients
    assert (REGISTRY.get_sample_value("ingress_proxy_tls_async_pauses_total") or 0.0) - pauses_before >= clients


@pytest.mark.e2e
async def test_a_handshake_whose_timeout_falls_while_paused_is_dropped_when_the_job_returns(
    start_proxy, provider_probe: FixtureProviderProbe, provider_identities: dict[str, ServerIdentity], ca: trustme.CA,
) -> None:
    """The paused connection is kept while its job runs (OpenSSL owns its stack), then the handshake
    timeout that fell meanwhile applies: the client is dropped, counted as a timeout."""
    identity = provider_identities["rsa"]
    configuration = simple_configuration(
        {}, {}, certificates=(Certificate(identity.chain_pem, identity.key, ("localhost",), "test:provider"),),
        crypto=provider_probe.settings(), timeouts=Timeouts(handshake=0.2, drain=2.0),
    )
    proxy = await start_proxy(configuration)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    timeouts_before = REGISTRY.get_sample_value("ingress_proxy_tls_handshake_failures_total", {"reason": "timeout"}) or 0.0
    provider_probe.set_gate(False)
    try:
        attempt = asyncio.create_task(open_raw(proxy.https_port, client_tls, "localhost"))
        async with asyncio.timeout(15):
            while provider_probe.counters()["in_flight"] < 1:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # well past the 0.2 s handshake timeout, still paused
        assert not attempt.done()
    finally:
        provider_probe.set_gate(True)
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(attempt, 15)
    timeouts = REGISTRY.get_sample_value("ingress_proxy_tls_handshake_failures_total", {"reason": "timeout"}) or 0.0
    assert timeouts - timeouts_before == 1
