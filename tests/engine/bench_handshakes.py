"""Full-handshake rates: software keys vs the pkcs11 engine (SoftHSM2) vs the async fixture engine.

    .venv/bin/python -m tests.engine.bench_handshakes [--seconds 1] [--rounds 5] [--concurrency 64] [--cpu 0]

One thread runs both ends over memory BIOs (tests/engine/tls_pump.py), TLS 1.3, no resumption, so
the client's share (X25519, certificate verification) is in every figure: compare rows of one run,
not absolute numbers across machines. That thread is pinned to one CPU (like a one-core proxy);
the async fixture engine signs on its 2 worker threads, free to use the other CPU (like an
offload device), while the pump keeps up to `concurrency` handshakes in flight.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
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


@dataclass
class Sample:
    handshakes_per_second: float
    pump_thread_cores: float  # CPU time of the thread running both TLS ends / wall time
    process_cores: float  # including the engine's worker threads


def _measure(
    runtime: CryptoRuntime, identity: ServerIdentity, ca: trustme.CA, arguments: argparse.Namespace
) -> Sample:
    context, _ = server_context(runtime, identity)
    client = client_context(ca)
    pump_handshakes(context, client, 8)  # warm-up: engine threads, token session
    every_cpu = os.sched_getaffinity(0)
    if arguments.cpu is not None:
        os.sched_setaffinity(0, {arguments.cpu})  # this thread only: the engine's workers keep every CPU
    try:
        done = 0
        wall, thread, process = time.perf_counter(), time.thread_time(), time.process_time()
        while time.perf_counter() - wall < arguments.seconds:
            chunk = arguments.concurrency * 4
            pump_handshakes(context, client, chunk, concurrency=arguments.concurrency)
            done += chunk
        wall = time.perf_counter() - wall
        return Sample(done / wall, (time.thread_time() - thread) / wall, (time.process_time() - process) / wall)
    finally:
        os.sched_setaffinity(0, every_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cpu", type=int, default=0, help="pin the pump thread to this CPU (-1: don't)")
    parser.add_argument("--concurrency", type=int, default=64)
    arguments = parser.parse_args()
    arguments.cpu = None if arguments.cpu < 0 else arguments.cpu

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
        samples: dict[str, list[Sample]] = {name: [] for name, _, _ in cases}
        for _ in range(arguments.rounds):  # interleaved, so load from elsewhere hits every case alike
            for name, settings, identity in cases:
                runtime = CryptoRuntime.start(settings)
                try:
                    samples[name].append(_measure(runtime, identity, ca, arguments))
                finally:
                    runtime.close()
        pinned = f", pump thread pinned to CPU {arguments.cpu}" if arguments.cpu is not None else ""
        print(
            f"TLS 1.3 full handshakes/s, {arguments.concurrency} in flight, median of {arguments.rounds} "
            f"rounds of {arguments.seconds:g} s{pinned}"
        )
        print(f"  {'':40s} {'median':>8s} {'min-max':>11s}  pump thread / process CPU (cores)")
        for name, runs in samples.items():
            rates = [run.handshakes_per_second for run in runs]
            middle = sorted(runs, key=lambda run: run.handshakes_per_second)[len(runs) // 2]
            print(
                f"  {name:40s} {statistics.median(rates):6.0f}/s {min(rates):5.0f}-{max(rates):<5.0f}"
                f"  {middle.pump_thread_cores:.2f} / {middle.process_cores:.2f}"
            )
        counters = probe.counters()
        print(f"asyncfixture: {counters['offloaded']} offloaded, peak {counters['peak_in_flight']} in flight")


if __name__ == "__main__":
    main()
