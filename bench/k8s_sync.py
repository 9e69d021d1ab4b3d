"""`python -m bench.k8s_sync`: Kubernetes mode at scale — 5,000 Ingresses through the real CLI.

The fake API server (tests/fake_apiserver, in this process) is filled with N Ingresses, each with
its own Service and EndpointSlice (one real aiohttp backend on 127.0.0.2 serves them all), spread
over a few namespaces; optionally some Ingresses carry TLS Secrets (ECDSA, distinct per host).
Then `ingress-proxy serve --kubernetes` starts as a subprocess and we measure:

* initial sync: process start → admin listener up (Python start-up) → /readyz 200, which the proxy
  reports only after every kind was LISTed, translated and published (the first publish);
* Ingress change → served: a new Ingress (or an existing one moved to a new host) is written through
  the API with kubernetes-asyncio, and the new host is polled through the proxy over HTTP until the
  backend answers; each change re-translates all N Ingresses;
* EndpointSlice change → served: one Service's slice is moved to a second endpoint and polled until
  it receives the traffic (the endpoint fast path: no re-translation);
* meanwhile, requests to a host no change touches, every 10 ms: rebuilds run on the event loop
  that serves traffic, so their duration shows up here as the longest request.

Changes are made one at a time, so each latency is one change's own. Figures include the poll
interval (5 ms) and the controller's debounce (50 ms).

Measured 2026-11-25 on the shared 2-core machine (other helpers' tests running; compare within a run):

| 5,000 Ingresses | ready after start | change → served p50 / p99 | EndpointSlice p50 / p99 | longest request meanwhile |
|---|---|---|---|---|
| no TLS | 0.94 s (0.39 s Python start-up) | 254 / 331 ms | 104 / 200 ms | 275 ms |
| each with its own TLS Secret (ECDSA) | 8.1 s | 3.7 / 4.1 s | 115 / 418 ms | 4.1 s |

With TLS nearly all of a change's time is `proxy.contexts.build_contexts` rebuilding every
pyOpenSSL context (~0.8 ms each: key PEM parse, chain parse, SSL_CTX_new) on the serving loop.

`--workers 2` (one watcher feeding two workers, proxy/generation_feed.py), 2026-12-01, same shared
machine, 5,000 Ingresses without TLS, three runs (the first two before the GC fix below) against
two of `--workers 1`: change → served p50 1.1-2.4 s (1 worker: 0.7-1.0 s), EndpointSlice p50
0.38-0.58 s (0.32-0.34 s), requests meanwhile p50 1.3-2.1 ms (9.0 ms), longest 1.0-1.4 s (0.5 s).
A fourth pair: 0.57 s vs 1.36 s. A quieter pair of 12 changes (353 vs 555 ms p50) split by the
controller's own histograms: event → published into the sink 349 ms (1 process) vs 419 ms (the
watcher, up to its write into the feed), so ~70 ms in the watcher and ~130 ms between the feed and
a worker serving. Per change the feed adds, measured in process: encode 17-29 ms in the watcher,
decode 19-20 ms in each worker (with the GC held off; 100-185 ms without), and each worker builds
on its own (15-44 ms without TLS), the two workers and the watcher competing for the two cores
with the load generator. The wider gaps of the noisier runs are not explained yet: profile them on
a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubernetes_asyncio import client, config

from bench.machine import tree_rss_bytes
from tests.fake_apiserver import FakeApiServer
from tests.fake_apiserver.store import RESOURCES

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / ".venv" / "bin" / "ingress-proxy"
RESOURCE = {resource.kind: resource for resource in RESOURCES}
BACKEND_HOST, SECOND_BACKEND_HOST = "127.0.0.2", "127.0.0.3"
POLL_INTERVAL = 0.005
CLASS_NAME = "ingress-proxy"


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _tls_secret(name: str, host: str) -> dict[str, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return {
        "metadata": {"name": name},
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": base64.b64encode(certificate.public_bytes(serialization.Encoding.PEM)).decode(),
            "tls.key": base64.b64encode(pem_key).decode(),
        },
    }


def _ingress(name: str, host: str, service: str, tls_secret: str | None = None) -> dict[str, Any]:
    backend = {"service": {"name": service, "port": {"name": "http"}}}
    spec: dict[str, Any] = {
        "ingressClassName": CLASS_NAME,
        "rules": [{"host": host, "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend}]}}],
    }
    if tls_secret:
        spec["tls"] = [{"hosts": [host], "secretName": tls_secret}]
    return {"metadata": {"name": name}, "spec": spec}


def _endpoint_slice(service: str, addresses: list[str], port: int) -> dict[str, Any]:
    return {
        "metadata": {"name": f"{service}-abcde", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": True}} for address in addresses],
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }


def seed(server: FakeApiServer, ingresses: int, namespaces: int, tls: int, backend_port: int) -> None:
    """Write the objects straight into the store (the API path is not what is measured here)."""
    store = server.store
    store.create(RESOURCE["IngressClass"], "", {"metadata": {"name": CLASS_NAME}, "spec": {"controller": "ingress-proxy.dev/controller"}})
    for index in range(ingresses):
        namespace = f"team-{index % namespaces}"
        name = f"app-{index}"
        service = {"metadata": {"name": name}, "spec": {"ports": [{"name": "http", "port": 80, "targetPort": backend_port}]}}
        store.create(RESOURCE["Service"], namespace, service)
        store.create(RESOURCE["EndpointSlice"], namespace, _endpoint_slice(name, [BACKEND_HOST], backend_port))
        secret = None
        if index < tls:
            secret = f"{name}-tls"
            store.create(RESOURCE["Secret"], namespace, _tls_secret(secret, f"{name}.bench.example"))
        store.create(RESOURCE["Ingress"], namespace, _ingress(name, f"{name}.bench.example", name, secret))


def _existing(change: int, slot: int, namespaces: int) -> tuple[str, str]:
    """A seeded Ingress (= Service) for a change: namespaces in turn, a distinct one per slot."""
    namespace_index = change % namespaces
    return f"team-{namespace_index}", f"app-{slot * namespaces + namespace_index}"


async def _start_backend(host: str, port: int, name: str) -> web.AppRunner:
    async def answer(_: web.Request) -> web.Response:
        return web.Response(text=name)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def _until(probe: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    started = time.perf_counter()
    while not await probe():
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"{what}: not within {timeout}s")
        await asyncio.sleep(POLL_INTERVAL)
    return time.perf_counter() - started


async def _request_latencies(answers: Callable[[str], Awaitable[bool]], host: str, latencies: list[float]) -> None:
    """Until cancelled: one request every 10 ms to a host no change touches, timing each."""
    while True:
        began = time.perf_counter()
        await answers(host)
        latencies.append(time.perf_counter() - began)
        await asyncio.sleep(0.01)


def _rss_mib(pid: int) -> float:
    """The controller's process tree (master, watcher, workers with --workers; forked pages count once per process)."""
    return tree_rss_bytes(pid) / (1 << 20)


async def run(arguments: argparse.Namespace) -> dict[str, Any]:
    backend_port = _free_port(BACKEND_HOST)
    runners = [
        await _start_backend(BACKEND_HOST, backend_port, "first"),
        await _start_backend(SECOND_BACKEND_HOST, backend_port, "second"),
    ]
    workdir = Path(tempfile.mkdtemp(prefix="k8s-sync-"))
    results: dict[str, Any] = {
        "ingresses": arguments.ingresses, "namespaces": arguments.namespaces, "tls_ingresses": arguments.tls,
        "workers": arguments.workers,
    }  # fmt: skip
    async with FakeApiServer(allow_loopback=True, history_limit=100_000, bookmark_interval=30.0) as server:
        started = time.perf_counter()
        seed(server, arguments.ingresses, arguments.namespaces, arguments.tls, backend_port)
        print(f"seeded {arguments.ingresses} Ingresses/Services/EndpointSlices ({arguments.tls} with TLS) "
              f"in {time.perf_counter() - started:.1f}s", flush=True)  # fmt: skip
        kubeconfig = server.write_kubeconfig(workdir / "kubeconfig")
        http_port, https_port, admin_port = _free_port(), _free_port(), _free_port()
        log_path = workdir / "controller.log"
        with log_path.open("wb") as log:
            spawned = time.perf_counter()
            process = await asyncio.create_subprocess_exec(
                str(CLI), "serve", "--kubernetes", "--kubeconfig", str(kubeconfig), "--no-access-log",
                "--https-address", f"127.0.0.1:{https_port}", "--http-address", f"127.0.0.1:{http_port}",
                "--admin-address", f"127.0.0.1:{admin_port}", "--workers", str(arguments.workers),
                stdout=log, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            results.update(await _measure(arguments, server, kubeconfig, session, process, spawned, http_port, admin_port))
        except BaseException:
            print(log_path.read_text()[-4000:], file=sys.stderr)
            raise
        finally:
            await session.close()
            if process.returncode is None:
                process.terminate()
                await process.wait()
    for runner in runners:
        await runner.cleanup()
    return results


async def _measure(
    arguments: argparse.Namespace,
    server: FakeApiServer,
    kubeconfig: Path,
    session: aiohttp.ClientSession,
    process: asyncio.subprocess.Process,
    spawned: float,
    http_port: int,
    admin_port: int,
) -> dict[str, Any]:
    admin = f"http://127.0.0.1:{admin_port}"

    async def readyz(accept: Callable[[int], bool]) -> bool:
        if process.returncode is not None:
            raise RuntimeError(f"the controller exited with {process.returncode}")
        try:
            async with session.get(f"{admin}/readyz") as response:
                return accept(response.status)
        except (aiohttp.ClientError, asyncio.TimeoutError):  # busy: the admin listener shares the loop
            return False

    async def answers(host: str, name: str = "first") -> bool:
        try:
            async with session.get(f"http://127.0.0.1:{http_port}/", headers={"Host": host}) as response:
                return response.status == 200 and await response.text() == name
        except (aiohttp.ClientError, asyncio.TimeoutError):  # busy: the admin listener shares the loop
            return False

    await _until(lambda: readyz(lambda status: status in (200, 503)), 60, "admin listener")
    admin_up = time.perf_counter() - spawned
    await _until(lambda: readyz(lambda status: status == 200), 600, "initial sync")
    ready = time.perf_counter() - spawned
    assert await answers("app-0.bench.example") and await answers(f"app-{arguments.ingresses - 1}.bench.example")
    figures: dict[str, Any] = {
        "startup_to_admin_s": round(admin_up, 3),
        "startup_to_ready_s": round(ready, 3),
        "initial_sync_s": round(ready - admin_up, 3),
        "rss_after_sync_mib": round(_rss_mib(process.pid), 1),
    }
    print(f"initial sync: ready {ready:.2f}s after start ({admin_up:.2f}s of it Python start-up), "
          f"RSS {figures['rss_after_sync_mib']} MiB", flush=True)  # fmt: skip

    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration, persist_config=False)
    async with client.ApiClient(configuration) as api_client:
        networking = client.NetworkingV1Api(api_client)
        discovery = client.DiscoveryV1Api(api_client)
        stalls: list[float] = []
        watcher = asyncio.create_task(_request_latencies(answers, f"app-{arguments.ingresses - 1}.bench.example", stalls))
        ingress_latencies: list[float] = []
        for change in range(arguments.changes):
            namespace, target = _existing(change, change, arguments.namespaces)
            host = f"change-{change}.bench.example"
            began = time.perf_counter()
            if change % 2 == 0:  # a new Ingress for an existing Service
                await networking.create_namespaced_ingress(namespace, _ingress(f"new-{change}", host, target))
            else:  # an existing Ingress moved to a new host
                await networking.patch_namespaced_ingress(target, namespace, _ingress(target, host, target))
            await _until(lambda: answers(host), 30, f"change {change}")
            ingress_latencies.append(time.perf_counter() - began)
        endpoint_latencies: list[float] = []
        for change in range(arguments.endpoint_changes):
            namespace, name = _existing(change, arguments.changes + change, arguments.namespaces)  # Ingresses not moved above
            host = f"{name}.bench.example"
            began = time.perf_counter()
            await discovery.patch_namespaced_endpoint_slice(
                f"{name}-abcde", namespace, {"endpoints": [{"addresses": [SECOND_BACKEND_HOST], "conditions": {"ready": True}}]}
            )
            await _until(lambda: answers(host, "second"), 30, f"endpoint change {change}")
            endpoint_latencies.append(time.perf_counter() - began)
        watcher.cancel()

    for label, values in (("ingress_change", ingress_latencies), ("endpoint_change", endpoint_latencies)):
        if values:
            figures[f"{label}_p50_ms"] = round(statistics.median(values) * 1000, 1)
            figures[f"{label}_p99_ms"] = round(_percentile(values, 0.99) * 1000, 1)
            figures[f"{label}_max_ms"] = round(max(values) * 1000, 1)
            figures[f"{label}_samples"] = len(values)
            print(f"{label} → served: p50 {figures[f'{label}_p50_ms']} ms, p99 {figures[f'{label}_p99_ms']} ms, "
                  f"max {figures[f'{label}_max_ms']} ms over {len(values)} changes", flush=True)  # fmt: skip
    figures["request_during_changes_p50_ms"] = round(statistics.median(stalls) * 1000, 1)
    figures["request_during_changes_max_ms"] = round(max(stalls) * 1000, 1)
    print(f"requests to an unchanged host meanwhile: p50 {figures['request_during_changes_p50_ms']} ms, "
          f"max {figures['request_during_changes_max_ms']} ms (rebuilds run on the serving event loop)", flush=True)  # fmt: skip
    figures["rss_after_changes_mib"] = round(_rss_mib(process.pid), 1)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.k8s_sync", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ingresses", type=int, default=5000)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--tls", type=int, default=0, help="how many of the Ingresses carry their own TLS Secret")
    parser.add_argument("--changes", type=int, default=40, help="Ingress changes to time")
    parser.add_argument("--endpoint-changes", type=int, default=20, help="EndpointSlice changes to time")
    parser.add_argument("--workers", type=int, default=1, help="--workers for the controller (one watcher feeds them)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    arguments = parser.parse_args(argv)
    if (arguments.changes + arguments.endpoint_changes) * arguments.namespaces > arguments.ingresses:
        parser.error("--ingresses must be at least (--changes + --endpoint-changes) * --namespaces")
    results = asyncio.run(run(arguments))
    print(json.dumps(results, indent=2))
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
