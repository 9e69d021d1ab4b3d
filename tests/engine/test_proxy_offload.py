"""Engine offload through the real proxy (ProxyServer, proxy/tls.py, proxy/downstream.py)."""

from __future__ import annotations

import asyncio
import logging
import ssl

import pytest
import trustme
from prometheus_client import REGISTRY

from config.crypto import CryptoSetupError
from config.model import Address, Certificate, Configuration, CryptoSettings, EngineSettings, Listeners, PathType
from proxy.downstream import HANDSHAKE_ABANDONED
from proxy.server import ProxyServer
from tests.conftest import simple_configuration
from tests.e2e.helpers import open_raw, read_response
from tests.engine.conftest import FixtureEngineProbe, ServerIdentity, SoftHsmToken

pytestmark = pytest.mark.e2e


def _handshakes(key_source: str, version: str = "TLSv1.3") -> float:
    labels = {"version": version, "key_source": key_source, "resumed": "no"}
    return REGISTRY.get_sample_value("ingress_proxy_tls_handshakes_total", labels) or 0.0


def _async_pauses() -> float:
    return REGISTRY.get_sample_value("ingress_proxy_tls_async_pauses_total") or 0.0


def _handshake_failures(reason: str) -> float:
    return REGISTRY.get_sample_value("ingress_proxy_tls_handshake_failures_total", {"reason": reason}) or 0.0


def _certificate(identity: ServerIdentity, host: str) -> Certificate:
    return Certificate(identity.chain_pem, identity.key, (host,), f"test:{host}")


async def test_curl_through_the_proxy_with_token_keys(
    start_proxy, start_backend, softhsm_token: SoftHsmToken, ca_file: str
) -> None:
    backend = await start_backend("app")
    configuration = simple_configuration(
        {"app": [backend.address]},
        {"": [("/", PathType.PREFIX, "app")]},
        certificates=(_certificate(softhsm_token.rsa, "rsakey.test"), _certificate(softhsm_token.ec, "eckey.test")),
        crypto=softhsm_token.settings(),
    )
    proxy = await start_proxy(configuration)
    before = _handshakes("engine:pkcs11")
    for host in ("rsakey.test", "eckey.test"):
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--fail", "--tlsv1.3", "--cacert", ca_file,
            "--resolve", f"{host}:{proxy.https_port}:127.0.0.1", f"https://{host}:{proxy.https_port}/via-token",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        output, errors = await asyncio.wait_for(curl.communicate(), 20)
        assert curl.returncode == 0, errors.decode()
        assert b'"path_qs": "/via-token"' in output
    assert _handshakes("engine:pkcs11") - before == 2
    assert REGISTRY.get_sample_value("ingress_proxy_engine_up", {"engine": "pkcs11"}) == 1


async def test_proxy_parks_16_handshakes_on_the_async_engine(
    start_proxy, start_backend, engine_probe: FixtureEngineProbe, ca: trustme.CA, software_rsa: ServerIdentity
) -> None:
    """Gate closed: 16 clients' handshakes can only all be in flight if the proxy's event loop
    parked them on async jobs; opening the gate lets every request through."""
    clients = 16
    backend = await start_backend("app")
    settings: CryptoSettings = engine_probe.settings(algorithms=("RSA",))
    configuration = simple_configuration(
        {"app": [backend.address]},
        {"": [("/", PathType.PREFIX, "app")]},
        certificates=(_certificate(software_rsa, "localhost"),),
        crypto=settings,
    )
    proxy = await start_proxy(configuration)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    pauses_before = _async_pauses()

    async def one_request() -> int:
        reader, writer = await open_raw(proxy.https_port, client_tls, "localhost")
        writer.write(b"GET /parked HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        status, _, _ = await read_response(reader)
        writer.close()
        return status

    engine_probe.set_gate(False)
    requests = [asyncio.create_task(one_request()) for _ in range(clients)]
    try:
        async with asyncio.timeout(15):
            while engine_probe.counters()["in_flight"] < clients:
                await asyncio.sleep(0.01)
    finally:
        engine_probe.set_gate(True)
    assert await asyncio.gather(*requests) == [200] * clients
    counters = engine_probe.counters()
    assert counters["peak_in_flight"] == clients and counters["offloaded"] == clients
    assert _async_pauses() - pauses_before >= clients


async def test_a_client_that_closes_while_its_handshake_is_parked_is_let_go_when_the_job_is_back(
    start_proxy, engine_probe: FixtureEngineProbe, ca: trustme.CA, software_rsa: ServerIdentity
) -> None:
    """The FIN comes while the signature is parked in the engine: the connection waits for the job
    (a paused job must not be dropped), then ends the handshake as closed by the client."""
    configuration = simple_configuration(
        {}, {}, certificates=(_certificate(software_rsa, "localhost"),), crypto=engine_probe.settings(algorithms=("RSA",))
    )
    proxy = await start_proxy(configuration)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    client = client_tls.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    abandoned = _handshake_failures(HANDSHAKE_ABANDONED)
    offloaded = engine_probe.counters()["offloaded"]
    engine_probe.set_gate(False)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.https_port)
        writer.write(outgoing.read())  # the ClientHello: the proxy's signature parks at the gate
        async with asyncio.timeout(15):
            while engine_probe.counters()["in_flight"] < 1:
                await asyncio.sleep(0.01)
            writer.write_eof()
            while not any(connection.read_eof for connection in proxy.server.connections):
                await asyncio.sleep(0.01)
        assert _handshake_failures(HANDSHAKE_ABANDONED) == abandoned  # still waiting for its job
    finally:
        engine_probe.set_gate(True)
    async with asyncio.timeout(15):
        await reader.read()  # the server's flight, if any, then the close
        while proxy.server.connections:
            await asyncio.sleep(0.01)
    writer.close()
    assert _handshake_failures(HANDSHAKE_ABANDONED) == abandoned + 1
    assert engine_probe.counters()["offloaded"] == offloaded + 1 and engine_probe.counters()["in_flight"] == 0


async def test_route_only_reload_keeps_the_engine_and_warns_once(
    start_proxy, start_backend, caplog: pytest.LogCaptureFixture, ca: trustme.CA, software_rsa: ServerIdentity
) -> None:
    """required: false with a missing engine: one warning, software crypto; publishing new routes
    with the same crypto settings starts nothing again (no second warning)."""
    backend = await start_backend("app")
    crypto = CryptoSettings(engine=EngineSettings(id="no-such-engine-xyz"))

    def configuration(path: str) -> Configuration:
        return simple_configuration(
            {"app": [backend.address]},
            {"": [(path, PathType.PREFIX, "app")]},
            certificates=(_certificate(software_rsa, "localhost"),),
            crypto=crypto,
        )

    with caplog.at_level(logging.WARNING, logger="config.crypto"):
        proxy = await start_proxy(configuration("/"))
        proxy.server.publish(configuration("/other"))
        await proxy.server.wait_for_generation(2)
    warnings = [record for record in caplog.records if "no-such-engine-xyz" in record.getMessage()]
    assert len(warnings) == 1
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    reader, writer = await open_raw(proxy.https_port, client_tls, "localhost")
    writer.write(b"GET /other HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    status, _, _ = await read_response(reader)
    writer.close()
    assert status == 200
    assert REGISTRY.get_sample_value("ingress_proxy_engine_up", {"engine": "no-such-engine-xyz"}) == 0


def test_required_engine_that_does_not_load_stops_start_up(software_rsa: ServerIdentity) -> None:
    server = ProxyServer(Listeners(https=Address("127.0.0.1", 0)))
    configuration = simple_configuration(
        {}, {}, certificates=(_certificate(software_rsa, "localhost"),),
        crypto=CryptoSettings(engine=EngineSettings(id="no-such-engine-xyz", required=True)),
    )
    with pytest.raises(CryptoSetupError, match=r"'no-such-engine-xyz' did not load: .*required: false"):
        server.publish(configuration)
