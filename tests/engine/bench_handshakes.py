"""Full-handshake rates: software keys vs the pkcs11 engine (SoftHSM2) vs the async fixture engine.

    .venv/bin/python -m tests.engine.bench_handshakes [--seconds 1] [--rounds 5] [--concurrency 64]

One thread runs both ends over memory BIOs (tests/engine/tls_pump.py), TLS 1.3, no resumption, so
the client's share (X25519, certificate verification) is in every figure: compare rows of one run,
not absolute numbers across machines. The async fixture engine signs on 2 worker threads while the
pump thread keeps up to `concurrency` handshakes parked.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import trustme

from config.crypto import CryptoRuntime
from config.model import CryptoSettings, PemKey
from tests.engine.conftest import (
    FixtureEngineProbe,
    ServerIdentity,
    build_fixture_engine,
    client_context,
    create_softhsm_token,
    server_context,
)
from tests.engine.tls_pump import pump_handshakes


def _rate(runtime: CryptoRuntime, identity: ServerIdentity, ca: trustme.CA, seconds: float, concurrency: int) -> float:
    context, _ = server_context(runtime, identity)
    client = client_context(ca)
    pump_handshakes(context, client, min(concurrency, 8))  # warm-up: engine threads, token session
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        pump_handshakes(context, client, concurrency)
        done += concurrency
    return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=64)
    arguments = parser.parse_args()

    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    software = {
        kind: ServerIdentity(
            b"".join(blob.bytes() for blob in leaf.cert_chain_pems), PemKey(leaf.private_key_pem.bytes()), kind
        )
        for kind, leaf in (
            ("rsa", ca.issue_cert("localhost", key_type=trustme.KeyType.RSA)),
            ("ec", ca.issue_cert("localhost", key_type=trustme.KeyType.ECDSA)),
        )
    }
    probe = FixtureEngineProbe(build_fixture_engine())
    with tempfile.TemporaryDirectory() as directory:
        token = create_softhsm_token(ca, Path(directory))
        os.environ["SOFTHSM2_CONF"] = token.env["SOFTHSM2_CONF"]
        cases = [
            ("software RSA-2048", CryptoSettings(), software["rsa"]),
            ("pkcs11 (SoftHSM2) RSA-2048", token.settings(), token.rsa),
            ("asyncfixture RSA-2048, async mode", probe.settings(algorithms=("RSA",)), software["rsa"]),
            ("asyncfixture RSA-2048, no async mode", probe.settings(algorithms=("RSA",), async_mode=False), software["rsa"]),
            ("software ECDSA P-256", CryptoSettings(), software["ec"]),
            ("pkcs11 (SoftHSM2) ECDSA P-256", token.settings(), token.ec),
        ]
        rates: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        for _ in range(arguments.rounds):  # interleaved, so load from elsewhere hits every case alike
            for name, settings, identity in cases:
                runtime = CryptoRuntime.start(settings)
                try:
                    rates[name].append(_rate(runtime, identity, ca, arguments.seconds, arguments.concurrency))
                finally:
                    runtime.close()
        print(
            f"TLS 1.3 full handshakes/s, {arguments.concurrency} concurrent, median of {arguments.rounds} "
            f"rounds of {arguments.seconds:g} s (min-max)"
        )
        for name, values in rates.items():
            print(f"  {name:40s} {statistics.median(values):6.0f}/s  ({min(values):.0f}-{max(values):.0f})")
        counters = probe.counters()
        print(f"asyncfixture: {counters['offloaded']} offloaded, peak {counters['peak_in_flight']} in flight")


if __name__ == "__main__":
    main()
