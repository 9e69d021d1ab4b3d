"""The C fixture engine proves, by its own counters, that keys are routed to an engine by
`algorithms` and that SSL_MODE_ASYNC lets one thread keep many handshakes paused at once."""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable, Iterator

import pytest
import trustme
from OpenSSL import SSL
from OpenSSL._util import lib

from config.crypto import CryptoRuntime
from config.model import CryptoSettings
from proxy.tls import ServerTls, TlsState
from proxy.tls.offload import SSL_MODE_ASYNC
from tests.engine.conftest import FixtureEngineProbe, ServerIdentity, client_context, server_context
from tests.engine.tls_pump import TlsTestServer, pump_handshakes, s_client, signature_type

RuntimeFactory = Callable[[CryptoSettings], CryptoRuntime]


@pytest.fixture
def start_runtime() -> Iterator[RuntimeFactory]:
    """CryptoRuntime.start, closed at teardown so the engine's default methods don't leak into other tests."""
    runtimes: list[CryptoRuntime] = []

    def start(settings: CryptoSettings) -> CryptoRuntime:
        runtimes.append(CryptoRuntime.start(settings))
        return runtimes[-1]

    yield start
    for runtime in runtimes:
        runtime.close()


@pytest.mark.parametrize(
    ("algorithms", "key_name", "counter", "expected_per_handshake"),
    [
        (("RSA",), "rsa", "rsa_priv_enc", 1),
        (("ALL",), "rsa", "rsa_priv_enc", 1),
        (("EC",), "rsa", "operations", 0),
        (("EC",), "ec", "ec_sign", 1),
        (("RSA",), "ec", "operations", 0),
    ],
)
def test_algorithms_route_file_keys_to_the_engine(
    request: pytest.FixtureRequest,
    engine_probe: FixtureEngineProbe,
    start_runtime: RuntimeFactory,
    ca: trustme.CA,
    algorithms: tuple[str, ...],
    key_name: str,
    counter: str,
    expected_per_handshake: int,
) -> None:
    identity: ServerIdentity = request.getfixturevalue(f"software_{key_name}")
    runtime = start_runtime(engine_probe.settings(algorithms=algorithms, async_mode=False))
    context, label = server_context(runtime, identity)
    assert label == "file"
    pump_handshakes(context, client_context(ca), 5)
    assert engine_probe.counters()[counter] == 5 * expected_per_handshake


def test_close_gives_rsa_back_to_software(
    engine_probe: FixtureEngineProbe, ca: trustme.CA, software_rsa: ServerIdentity
) -> None:
    runtime = CryptoRuntime.start(engine_probe.settings(algorithms=("RSA",), async_mode=False))
    runtime.close()
    context, _ = server_context(CryptoRuntime.start(CryptoSettings()), software_rsa)
    pump_handshakes(context, client_context(ca), 2)
    assert engine_probe.counters()["operations"] == 0


def test_32_handshakes_paused_at_once_in_one_thread(
    engine_probe: FixtureEngineProbe, start_runtime: RuntimeFactory, ca: trustme.CA, software_rsa: ServerIdentity
) -> None:
    """With the engine's gate closed no signature can finish, so the pump only completes if all 32
    handshakes are parked on async jobs side by side (a blocking engine call would hang it)."""
    runtime = start_runtime(engine_probe.settings(algorithms=("RSA",)))
    context, _ = server_context(runtime, software_rsa)
    engine_probe.set_gate(False)
    seen_when_stalled: dict[str, int] = {}

    def open_gate() -> None:
        seen_when_stalled.update(engine_probe.counters())
        engine_probe.set_gate(True)

    result = pump_handshakes(context, client_context(ca), 32, when_stalled=open_gate)
    assert seen_when_stalled["in_flight"] == 32
    assert result.peak_paused == 32
    counters = engine_probe.counters()
    assert counters["peak_in_flight"] >= 16
    assert counters["offloaded"] == counters["rsa_priv_enc"] == 32
    assert counters["synchronous"] == 0
    assert counters["in_flight"] == 0
    assert result.want_async >= 32


def test_async_mode_with_a_software_key_never_pauses(
    start_runtime: RuntimeFactory, ca: trustme.CA, software_rsa: ServerIdentity
) -> None:
    runtime = start_runtime(CryptoSettings(async_mode=True))
    context, _ = server_context(runtime, software_rsa)
    assert pump_handshakes(context, client_context(ca), 4).want_async == 0


@pytest.mark.parametrize(
    ("key_name", "options", "counter", "signature"),
    [
        ("rsa", ("-tls1_3",), "rsa_priv_enc", "RSA-PSS"),  # RSA_NO_PADDING (PSS done above the engine)
        ("rsa", ("-tls1_2", "-sigalgs", "RSA+SHA256"), "rsa_priv_enc", "RSA"),  # PKCS#1 v1.5 padding
        ("rsa", ("-tls1_2", "-cipher", "AES128-GCM-SHA256"), "rsa_priv_dec", None),  # RSA key exchange
        ("ec", ("-tls1_3",), "ec_sign", "ECDSA"),
        ("ec", ("-tls1_2",), "ec_sign", "ECDSA"),
    ],
)
async def test_every_private_key_hook_serves_s_client_in_async_mode(
    request: pytest.FixtureRequest,
    engine_probe: FixtureEngineProbe,
    start_runtime: RuntimeFactory,
    ca_file: str,
    key_name: str,
    options: tuple[str, ...],
    counter: str,
    signature: str | None,
) -> None:
    identity: ServerIdentity = request.getfixturevalue(f"software_{key_name}")
    runtime = start_runtime(engine_probe.settings())
    context, _ = server_context(runtime, identity)
    async with TlsTestServer(context) as server:
        output = await s_client(server.port, ca_file, *options)
    if signature is not None:
        assert signature_type(output) == signature
    counters = engine_probe.counters()
    assert counters[counter] == 1
    assert counters["offloaded"] == counters["operations"] == 1
    assert server.handshakes == 1


async def test_asyncio_server_keeps_serving_while_s_clients_are_parked(
    engine_probe: FixtureEngineProbe, start_runtime: RuntimeFactory, ca_file: str, software_rsa: ServerIdentity
) -> None:
    """Real clients on loopback: with the gate closed all 8 handshakes park on the event loop
    (waiting on the engine's eventfds); opening the gate completes every one of them."""
    clients = 8
    runtime = start_runtime(engine_probe.settings(algorithms=("RSA",)))
    context, _ = server_context(runtime, software_rsa)
    engine_probe.set_gate(False)
    async with TlsTestServer(context) as server:
        handshakes = [asyncio.create_task(s_client(server.port, ca_file, "-tls1_3")) for _ in range(clients)]
        try:
            async with asyncio.timeout(15):
                while engine_probe.counters()["in_flight"] < clients:
                    await asyncio.sleep(0.01)
        finally:
            engine_probe.set_gate(True)
        outputs = await asyncio.gather(*handshakes)
    assert all("Verification: OK" in output for output in outputs)
    assert server.handshakes == clients
    assert server.want_async >= clients
    assert engine_probe.counters()["peak_in_flight"] == clients


def test_async_pause_is_a_state_of_the_tls_machine(
    engine_probe: FixtureEngineProbe, start_runtime: RuntimeFactory, ca: trustme.CA, software_rsa: ServerIdentity
) -> None:
    """HANDSHAKING → ASYNC_PAUSED on WANT_ASYNC; while paused, input is buffered and closing is
    refused (OpenSSL owns the job's stack); resume_handshake goes back to HANDSHAKING and on."""
    runtime = start_runtime(engine_probe.settings(algorithms=("RSA",)))
    context, _ = server_context(runtime, software_rsa)
    client = SSL.Connection(client_context(ca), None)
    client.set_connect_state()
    engine_probe.set_gate(False)
    try:
        with pytest.raises(SSL.WantReadError):
            client.do_handshake()
        server = ServerTls(context)
        assert server.receive(client.bio_read(65536)) == b""
        assert server.state is TlsState.ASYNC_PAUSED and server.waiting_for_async
        assert server.receive(b"") == b"" and server.state is TlsState.ASYNC_PAUSED
        with pytest.raises(AssertionError, match="paused async job must not be closed"):
            server.close()
        with pytest.raises(AssertionError, match="ASYNC_PAUSED cannot become OPEN"):
            server._move(TlsState.OPEN)
        fds = server.async_wait_fds()
        assert fds and engine_probe.counters()["in_flight"] == 1
    finally:
        engine_probe.set_gate(True)
    readable, _, _ = select.select(fds, [], [], 10)
    assert readable
    server.resume_handshake()
    assert server.state is TlsState.HANDSHAKING  # TLS 1.3: the client's Finished is still to come
    client.bio_write(server.outgoing())
    client.do_handshake()
    server.receive(client.bio_read(65536))
    assert server.state is TlsState.OPEN
    assert engine_probe.counters()["offloaded"] == 1


def test_a_connection_leaves_async_mode_once_its_handshake_is_done(
    engine_probe: FixtureEngineProbe, start_runtime: RuntimeFactory, ca: trustme.CA, software_rsa: ServerIdentity
) -> None:
    """Only handshakes pause; keeping SSL_MODE_ASYNC would wrap every later read and write in a job."""
    runtime = start_runtime(engine_probe.settings(algorithms=("RSA",)))
    context, _ = server_context(runtime, software_rsa)
    (server,) = pump_handshakes(context, client_context(ca), 1).servers
    assert engine_probe.counters()["offloaded"] == 1
    assert server.state is TlsState.OPEN
    assert not lib.SSL_get_mode(server.connection._ssl) & SSL_MODE_ASYNC
    assert lib.SSL_CTX_get_mode(context._context) & SSL_MODE_ASYNC, "the context keeps it for new handshakes"
