"""The benchmark rows: what each measures, with which settings and tool, and how it checks itself.

A row measures every proxy with the same `ProxySettings` (key type, resumption, worker count) and
turns the generator's `LoadResult` into named metric values plus flags. Throughput metrics also get
a per-CPU figure, value ÷ the proxy's CPU share in the window: on two cores the TLS clients cost
as much CPU per handshake as the servers, so the generator core saturates before a fast proxy's
core does, and the raw rate then understates that proxy (the flag says so).
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import idle, loadgen, slow_readers
from bench.certs import SERVER_NAME, CertSet
from bench.machine import GENERATOR_CPUS, PROXY_CPUS, CpuWindow, thread_cpu_seconds, tree_cpu_seconds, tree_rss_bytes
from bench.servers import (
    GRPC_MESSAGE,
    GRPC_PATH,
    LARGE_PATH,
    SMALL_PATH,
    ProxySettings,
    RunningProxy,
    http10_response_length,
    scrape_metric,
)

KEEP_ALIVE_CONNECTIONS = 50
LARGE_CONNECTIONS = 10
LATENCY_CONNECTIONS = 100
H2_CONNECTIONS = 10  # HTTP/2 row: connections, each with up to H2_STREAMS requests in flight
H2_STREAMS = 32
SATURATED_SHARE = 0.97  # a paced run that achieves less than this share of its target is saturated
CPU_BOUND_PERCENT = 85.0  # below this, a one-core proxy had CPU to spare
GENERATOR_BUSY_PERCENT = 90.0
MIN_RESUMED_SHARE = 0.99
ASYNC_PAUSES_METRIC = "ingress_proxy_tls_async_pauses_total"
FOREIGN_LOAD_PERCENT = 10.0
FOREIGN_LOAD_FLAG = "core 0 also ran other work"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool = True
    per_cpu: bool = False  # also report value ÷ proxy CPU share


@dataclass
class Measurement:
    proxy: str
    values: dict[str, float] = field(default_factory=dict)
    per_cpu: dict[str, float] = field(default_factory=dict)
    command: str = ""
    proxy_cpu_percent: float | None = None  # the proxy's processes, 100 = one core
    proxy_core_percent: float | None = None  # core 0 busy, whoever ran there
    generator_core_percent: float | None = None
    errors: dict[str, int] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unavailable: str | None = None  # why there is no figure
    seconds: float | None = None  # length of the measurement window


@dataclass(frozen=True)
class Budget:
    """How long and how big each measurement is (full run or --quick)."""

    seconds: float
    idle_connections: int
    warm_up: bool
    stalled_readers: int
    memory_return_seconds: float  # slow-readers row: how long after the attack RSS is read again


@dataclass
class RowRun:
    """What a row's measure function gets besides the running proxy."""

    workdir: Path
    certs: CertSet
    budget: Budget
    settings: ProxySettings
    target_rate: float | None = None  # latency row: requests/s to pace at


MeasureFunction = Callable[[RowRun, RunningProxy, Measurement], None]


@dataclass(frozen=True)
class Row:
    name: str  # the --only id
    title: str
    settings: ProxySettings
    metrics: tuple[Metric, ...]
    method: str  # what ran, for the report
    measure: MeasureFunction
    needs_target_rate: bool = False
    not_applicable: tuple[tuple[str, str], ...] = ()  # (proxy, why this row cannot run it)


def _record(
    run: RowRun, measurement: Measurement, result: loadgen.LoadResult, window: CpuWindow
) -> None:
    _flag_foreign_load(run, measurement, window)
    measurement.command = result.command
    measurement.seconds = result.seconds
    measurement.errors.update(result.errors)
    measurement.proxy_cpu_percent = window.proxy_cpu_percent
    measurement.proxy_core_percent = window.proxy_core_percent
    measurement.generator_core_percent = window.generator_core_percent
    if result.error_count:
        measurement.flags.append(f"{result.error_count} errors")


def _flag_generator_bound(run: RowRun, measurement: Measurement) -> None:
    """The proxy had CPU to spare on its core while the generator's core was full."""
    cpu, core, generator = (
        measurement.proxy_cpu_percent,
        measurement.proxy_core_percent,
        measurement.generator_core_percent,
    )
    if run.settings.workers != 1 or cpu is None or core is None or generator is None:
        return
    if cpu < CPU_BOUND_PERCENT and core < CPU_BOUND_PERCENT and generator >= GENERATOR_BUSY_PERCENT:
        measurement.flags.append(
            f"generator-bound (proxy CPU {cpu:.0f} %, generator core {generator:.0f} %)"
        )


def _flag_foreign_load(run: RowRun, measurement: Measurement, window: CpuWindow) -> None:
    """Work on the proxy's core that is not the proxy's (other jobs on a shared machine)."""
    if run.settings.workers != 1:
        return
    foreign = window.proxy_core_percent - window.proxy_cpu_percent
    if foreign > FOREIGN_LOAD_PERCENT:
        measurement.flags.append(f"{FOREIGN_LOAD_FLAG} ({foreign:.0f} % of it)")


def _add_throughput(
    run: RowRun, measurement: Measurement, metric_key: str, value: float
) -> None:
    measurement.values[metric_key] = value
    cpu = measurement.proxy_cpu_percent
    if cpu:
        measurement.per_cpu[metric_key] = value / (cpu / 100)
    _flag_generator_bound(run, measurement)


def _warm_up(run: RowRun, proxy: RunningProxy, path: str) -> None:
    if run.budget.warm_up:
        loadgen.run_wrk(run.workdir, proxy.port, path, KEEP_ALIVE_CONNECTIONS, 1)


def measure_keep_alive(run: RowRun, proxy: RunningProxy, measurement: Measurement) -> None:
    _warm_up(run, proxy, SMALL_PATH)
    with CpuWindow(proxy.pid) as window:
        result = loadgen.run_wrk(
            run.workdir, proxy.port, SMALL_PATH, KEEP_ALIVE_CONNECTIONS, run.budget.seconds
        )
    _record(run, measurement, result, window)
    _add_throughput(run, measurement, "requests_per_second", result.rate)


def measure_http2(run: RowRun, proxy: RunningProxy, measurement: Measurement) -> None:
    with CpuWindow(proxy.pid) as window:
        result = loadgen.run_h2load(proxy.port, SMALL_PATH, H2_CONNECTIONS, H2_STREAMS, run.budget.seconds)
    _record(run, measurement, result, window)
    _add_throughput(run, measurement, "requests_per_second", result.rate)


def measure_grpc_unary(run: RowRun, proxy: RunningProxy, measurement: Measurement) -> None:
    request = run.workdir / "grpc-request.bin"
    request.write_bytes(GRPC_MESSAGE)
    headers = ("content-type: application/grpc", "te: trailers")
    with CpuWindow(proxy.pid) as window:
        result = loadgen.run_h2load(proxy.port, GRPC_PATH, H2_CONNECTIONS, H2_STREAMS, run.budget.seconds, request, headers)
    _record(run, measurement, result, window)
    _add_throughput(run, measurement, "requests_per_second", result.rate)


def measure_large(run: RowRun, proxy: RunningProxy, measurement: Measurement) -> None:
    _warm_up(run, proxy, LARGE_PATH)
    with CpuWindow(proxy.pid) as window:
        result = loadgen.run_wrk(
            run.workdir, proxy.port, LARGE_PATH, LARGE_CONNECTIONS, run.budget.seconds
        )
    _record(run, measurement, result, window)
    _add_throughput(run, measurement, "megabytes_per_second", result.bytes_received / result.seconds / 1e6)


def _measure_handshakes(
    run: RowRun, proxy: RunningProxy, measurement: Measurement, mode: str
) -> None:
    expected_bytes = http10_response_length(proxy.port, run.certs.ca)
    with CpuWindow(proxy.pid) as window:
        result = loadgen.run_s_time(proxy.port, mode, run.budget.seconds, expected_bytes)
    _record(run, measurement, result, window)
    _add_throughput(run, measurement, "handshakes_per_second", result.rate)
    full, resumed = result.full_handshakes or 0, result.resumed_handshakes or 0
    measurement.notes.append(f"{full} full + {resumed} resumed handshakes")
    if mode == "new" and resumed:
        measurement.flags.append(f"{resumed} handshakes were resumed in a full-handshake row")
    if mode == "reuse" and resumed < MIN_RESUMED_SHARE * max(full + resumed, 1):
        measurement.flags.append(f"only {resumed} of {full + resumed} handshakes resumed")


def measure_full_handshakes(run: RowRun, proxy: RunningProxy, measurement: Measurement) -> None:
    _measure_handshakes(run, proxy, measurement, "new")


def measure_async_engine_handshakes(
    run: RowRun, proxy: RunningProxy, measurement: Measurement
) -> None:
    """As the full-handshake rows; ingress-proxy's async-pause counter shows the engine is in the path."""
    assert proxy.admin_port is not None
    before = scrape_metric(proxy.admin_port, ASYNC_PAUSES_METRIC)
    _measure_handshakes(run, proxy, measurement, "new")
    after = scrape_metric(proxy.admin_port, ASYNC_PAUSES_METRIC)
    if before is None or after is None:
        measurement.flags.append(f"no {ASYNC_PAUSES_METRIC} in /metrics: offload not proven")
        return
    handshakes = measurement.values["handshakes_per_second"] * (measurement.seconds or 0)
    pauses = after - before
    measurement.notes.append(
        f"{pauses:.0f} async-job pauses for ~{handshakes:.0f} handshakes (an operation the engine's "
        "worker finishes before the job looks does not pause; the workers share core 0)"
    )
    if pauses == 0:
        measurement.flags.append("the engine never paused a handshake: async offload not in effect")


# Event-loop µs per handshake of this run's software offload rows, by key type: the engine and
# provider rows (which run after them) report their gain, ceiling and bookkeeping against it.
_offload_software_microseconds: dict[str, float] = {}
_sign_microseconds: dict[str, float | None] = {}
# `openssl speed -mr` lines: "+F2:<n>:<bits>:<signs/s>:<verifies/s>" (RSA), "+F4:..." (ECDSA).
_SPEED_ALGORITHMS = {"rsa": ("rsa2048", "+F2:"), "rsa4096": ("rsa4096", "+F2:"), "ecdsa": ("ecdsap256", "+F4:")}


def sign_microseconds(key_type: str) -> float | None:
    """What one private-key signature of `key_type` costs core 0 in software (`openssl speed`, 1 s,
    pinned where the proxy runs), measured once per run: the most an offload can take off the core."""
    if key_type not in _sign_microseconds:
        algorithm, prefix = _SPEED_ALGORITHMS[key_type]
        try:
            output = subprocess.run(
                ["taskset", "-c", PROXY_CPUS, "openssl", "speed", "-seconds", "1", "-mr", algorithm],
                capture_output=True, text=True, timeout=60, check=False,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            output = ""
        rates = [float(line.split(":")[3]) for line in output.splitlines() if line.startswith(prefix)]
        _sign_microseconds[key_type] = 1e6 / rates[0] if rates and rates[0] > 0 else None
    return _sign_microseconds[key_type]


def measure_offload_handshakes(run: RowRun, proxy: RunningProxy, measurement: Measurement) -> None:
    """Full handshakes; the figure is what they cost the proxy's event-loop thread (its main
    thread, on core 0): the private-key work of the engine or provider runs on its worker threads,
    pinned to core 1 like an accelerator beside the CPU, and what stays on core 0 is the proxy's
    share, async bookkeeping included.

    What bounds the gain: offloading takes one signature (`sign_microseconds`, software, core 0)
    off the core and adds the async bookkeeping, so gain = software / (software − sign +
    bookkeeping), at most `gain_ceiling` = software / (software − sign) with no bookkeeping at all.
    The engine and provider rows report the bookkeeping that this leaves: their µs − (software µs −
    sign µs). Their worker threads' CPU per handshake shows the signature did move."""
    assert proxy.admin_port is not None
    pauses_before = scrape_metric(proxy.admin_port, ASYNC_PAUSES_METRIC) or 0.0
    loop_cpu_before = thread_cpu_seconds(proxy.pid, proxy.pid)
    process_cpu_before = tree_cpu_seconds(proxy.pid)
    _measure_handshakes(run, proxy, measurement, "new")
    loop_cpu = thread_cpu_seconds(proxy.pid, proxy.pid) - loop_cpu_before
    other_threads_cpu = tree_cpu_seconds(proxy.pid) - process_cpu_before - loop_cpu
    pauses = (scrape_metric(proxy.admin_port, ASYNC_PAUSES_METRIC) or 0.0) - pauses_before
    handshakes = measurement.values.pop("handshakes_per_second") * (measurement.seconds or 0)
    measurement.per_cpu.pop("handshakes_per_second", None)
    if not handshakes or not loop_cpu:
        measurement.flags.append("no handshakes or no event-loop CPU measured")
        return
    microseconds = loop_cpu / handshakes * 1e6
    measurement.values["handshakes_per_proxy_core_second"] = handshakes / loop_cpu
    measurement.values["proxy_core_microseconds_per_handshake"] = microseconds
    measurement.values["other_threads_microseconds_per_handshake"] = max(other_threads_cpu, 0.0) / handshakes * 1e6
    key_type = run.settings.key_type
    sign = sign_microseconds(key_type)
    if sign is not None:
        measurement.values["sign_microseconds"] = sign
    offload = run.settings.offload
    measurement.notes.append(f"{handshakes:.0f} handshakes, {loop_cpu:.2f} s of event-loop CPU, {pauses:.0f} async pauses")
    if offload is None:
        _offload_software_microseconds[key_type] = microseconds
        if sign is not None and sign < microseconds:
            measurement.values["gain_ceiling"] = microseconds / (microseconds - sign)
        return
    if pauses == 0:
        measurement.flags.append(f"the {offload} never paused a handshake: async offload not in effect")
    software = _offload_software_microseconds.get(key_type)
    if software:
        measurement.values["gain_over_software"] = software / microseconds
        if sign is not None and sign < software:
            measurement.values["gain_ceiling"] = software / (software - sign)
            measurement.values["bookkeeping_microseconds"] = microseconds - (software - sign)


def measure_resumed_handshakes(run: RowRun, proxy: RunningProxy, measurement: Measurement) -> None:
    _measure_handshakes(run, proxy, measurement, "reuse")


def measure_latency(run: RowRun, proxy: RunningProxy, measurement: Measurement) -> None:
    assert run.target_rate is not None
    _warm_up(run, proxy, SMALL_PATH)
    with CpuWindow(proxy.pid) as window:
        result = loadgen.run_wrk(
            run.workdir, proxy.port, SMALL_PATH, LATENCY_CONNECTIONS, run.budget.seconds,
            rate_per_second=run.target_rate,
        )
    _record(run, measurement, result, window)
    measurement.notes.append(f"achieved {result.rate:,.0f} of {run.target_rate:,.0f} req/s")
    if result.rate < SATURATED_SHARE * run.target_rate:
        measurement.flags.append(
            f"saturated: kept only {result.rate:,.0f} of {run.target_rate:,.0f} req/s, "
            "latency is queueing time"
        )
    measurement.values.update(
        {"latency_p50_ms": result.latency_ms["p50"], "latency_p99_ms": result.latency_ms["p99"]}
    )


def measure_split_writes_latency(run: RowRun, proxy: RunningProxy, measurement: Measurement) -> None:
    """One request at a time on one keep-alive connection: the latency a delayed ACK would add."""
    with CpuWindow(proxy.pid) as window:
        result = loadgen.run_wrk(run.workdir, proxy.port, SMALL_PATH, 1, run.budget.seconds)
    _record(run, measurement, result, window)
    measurement.values.update({"latency_p50_ms": result.latency_ms["p50"], "latency_p99_ms": result.latency_ms["p99"]})


def measure_idle_memory(run: RowRun, proxy: RunningProxy, measurement: Measurement) -> None:
    count = run.budget.idle_connections
    result = idle.measure_idle_rss(proxy.port, run.certs.ca, proxy.pid, count)
    measurement.command = (
        f"asyncio client: {count} TLS connections, handshake only, held idle; "
        "proxy process-tree RSS delta / connections held"
    )
    measurement.values["kib_per_idle_connection"] = result.bytes_per_connection / 1024
    measurement.notes.append(
        f"RSS {result.rss_before / 2**20:.1f} → {result.rss_after / 2**20:.1f} MiB "
        f"with {result.held} connections held"
    )
    for kind, count_of_kind in (("failed handshakes", result.failed), ("dropped by proxy", result.dropped)):
        if count_of_kind:
            measurement.errors[kind] = count_of_kind
            measurement.flags.append(f"{count_of_kind} {kind}")


def measure_slow_readers(run: RowRun, proxy: RunningProxy, measurement: Measurement) -> None:
    count = run.budget.stalled_readers
    context = ssl.create_default_context(cafile=str(run.certs.ca))
    result = asyncio.run(
        slow_readers.attack(
            proxy.port, context, SERVER_NAME, LARGE_PATH, SMALL_PATH, count,
            lambda: tree_rss_bytes(proxy.pid), run.budget.memory_return_seconds,
        )
    )
    measurement.command = (
        f"asyncio client: {count} TLS connections each pipeline {slow_readers.PIPELINED} x GET "
        f"{LARGE_PATH} (1 MiB) with a {slow_readers.CLIENT_RECEIVE_BUFFER}-byte receive buffer and "
        "never read; proxy process-tree RSS rise / readers held; one honest client meanwhile"
    )
    measurement.values["kib_per_stalled_reader"] = result.bytes_per_reader / 1024
    measurement.values["honest_p95_ms"] = result.honest_p95_ms
    returned = result.rss_after - result.rss_before
    measurement.notes.append(
        f"RSS {result.rss_before / 2**20:.1f} → {result.rss_held / 2**20:.1f} MiB with {result.held} "
        f"readers held; {result.rss_after / 2**20:.1f} MiB ({returned / 2**20:+.1f}) "
        f"{run.budget.memory_return_seconds:.0f} s after they left; "
        f"{len(result.honest_latencies)} honest requests"
    )
    for kind, count_of_kind in (("failed connections", result.failed),
                                ("honest requests failed", len(result.honest_failures))):
        if count_of_kind:
            measurement.errors[kind] = count_of_kind
            measurement.flags.append(f"{count_of_kind} {kind}")


_RSA = ProxySettings(key_type="rsa", resumption=True, workers=1)
_RSA_NO_RESUMPTION = ProxySettings(key_type="rsa", resumption=False, workers=1)
_REQUESTS = Metric("requests_per_second", "req/s", "req/s", per_cpu=True)
_HANDSHAKES = Metric("handshakes_per_second", "handshakes/s", "handshakes/s", per_cpu=True)
_S_TIME = (
    f"{loadgen.S_TIME_PROCESSES} x `openssl s_time -{{mode}} -www /` side by side: a new TCP+TLS "
    "connection per `GET / HTTP/1.0`"
)

_OFFLOAD_METRICS = (
    Metric("handshakes_per_proxy_core_second", "hs/proxy-core-s", "handshakes per event-loop CPU-second"),
    Metric("proxy_core_microseconds_per_handshake", "µs/hs", "µs of event-loop CPU per handshake", higher_is_better=False),
    Metric("gain_over_software", "× software", "× the software row of this run"),
    Metric("gain_ceiling", "ceiling ×", "× software if the async path cost nothing: software µs / (software µs − sign µs)"),
    Metric("sign_microseconds", "sign µs", "one software signature on core 0 (openssl speed)", higher_is_better=False),
    Metric("bookkeeping_microseconds", "async µs/hs", "event-loop µs left by offloading: µs − (software µs − sign µs)", higher_is_better=False),
    Metric("other_threads_microseconds_per_handshake", "µs/hs other threads", "CPU of the proxy's other threads (the workers, core 1)", higher_is_better=False),
)
_OFFLOAD_NOT_APPLICABLE = (
    ("haproxy", "measures ingress-proxy's offload paths against each other (Debian's HAProxy has no engine support)"),
    ("nginx", "measures ingress-proxy's offload paths against each other (nginx has no async mode)"),
)

ROWS: tuple[Row, ...] = (
    Row(
        "keepalive", "Keep-alive HTTPS, 2-byte body", _RSA, (_REQUESTS,),
        f"wrk -t1 -c{KEEP_ALIVE_CONNECTIONS}, TLS 1.3, RSA-2048 certificate", measure_keep_alive,
    ),
    Row(
        "keepalive-policy", "Keep-alive HTTPS, 2-byte body, route policy", ProxySettings("rsa", True, 1, route_policy=True),
        (_REQUESTS,),
        f"as keepalive, with per-route work in every proxy: source allowlist, regex rewrite /(.*) → /$1, one header set "
        f"(ingress-proxy `policy:`, HAProxy http-request deny/replace-path/set-header, nginx allow/rewrite/proxy_set_header)",
        measure_keep_alive,
    ),
    Row(
        "h2", "HTTP/2, 2-byte body, many streams per connection", _RSA, (_REQUESTS,),
        f"h2load -c{H2_CONNECTIONS} -m{H2_STREAMS} -t1, TLS 1.3, RSA-2048; backends spoken to in HTTP/1.1 "
        "(HAProxy `alpn h2,http/1.1`, nginx `listen ... ssl http2`)",
        measure_http2,
    ),
    Row(
        "keepalive-tls-backend", "Keep-alive HTTPS, backend over verified TLS",
        ProxySettings(key_type="rsa", resumption=True, workers=1, upstream="https"), (_REQUESTS,),
        f"as keepalive; the backend nginx over TLS (ECDSA P-256, SNI {SERVER_NAME}), verified against the "
        "bench CA by name, pooled keep-alive connections, sessions reused (HAProxy `ssl verify required "
        "ca-file sni`, nginx `proxy_ssl_verify on` + `proxy_ssl_session_reuse on`, ingress-proxy "
        "`protocol: https` with `tls: {ca, server_name}`)",
        measure_keep_alive,
    ),
    Row(
        "grpc-unary", "gRPC unary over HTTP/2, h2c backend",
        ProxySettings(key_type="rsa", resumption=True, workers=1, upstream="grpc"), (_REQUESTS,),
        f"h2load -c{H2_CONNECTIONS} -m{H2_STREAMS} -t1 POSTing one gRPC message to {GRPC_PATH} "
        "(content-type application/grpc, te: trailers), TLS 1.3; the backend nginx over h2c answers one "
        "message + trailer grpc-status 0 (HAProxy `proto h2`, nginx `grpc_pass`, ingress-proxy `protocol: h2c`)",
        measure_grpc_unary,
    ),
    Row(
        "large", "Keep-alive HTTPS, 1 MiB body", _RSA,
        (Metric("megabytes_per_second", "MB/s", "MB/s (10^6 bytes)", per_cpu=True),),
        f"wrk -t1 -c{LARGE_CONNECTIONS}, TLS 1.3, RSA-2048", measure_large,
    ),
    Row(
        "handshake-rsa", "Full handshakes, RSA-2048", _RSA_NO_RESUMPTION, (_HANDSHAKES,),
        _S_TIME.format(mode="new") + "; no session offered; server cache/tickets off (HAProxy, nginx)",
        measure_full_handshakes,
    ),
    Row(
        "handshake-ecdsa", "Full handshakes, ECDSA P-256",
        ProxySettings(key_type="ecdsa", resumption=False, workers=1), (_HANDSHAKES,),
        _S_TIME.format(mode="new") + "; no session offered; server cache/tickets off (HAProxy, nginx)",
        measure_full_handshakes,
    ),
    Row(
        "resumed", "Resumed handshakes (RSA-2048 certificate)", _RSA, (_HANDSHAKES,),
        _S_TIME.format(mode="reuse") + "; every connection offers the first one's session",
        measure_resumed_handshakes,
    ),
    Row(
        "latency", "Latency at half of HAProxy's keep-alive max", _RSA,
        (
            Metric("latency_p50_ms", "p50 ms", "ms", higher_is_better=False),
            Metric("latency_p99_ms", "p99 ms", "ms", higher_is_better=False),
        ),
        f"wrk -t1 -c{LATENCY_CONNECTIONS} paced by a Lua delay() schedule (1 ms batches) at half "
        "of HAProxy's keep-alive req/s from this run",
        measure_latency, needs_target_rate=True,
    ),
    Row(
        "latency-split", "Latency, backend writing head and body apart (Nagle on)",
        ProxySettings(key_type="rsa", resumption=True, workers=1, upstream="split-writes"),
        (
            Metric("latency_p50_ms", "p50 ms", "ms", higher_is_better=False),
            Metric("latency_p99_ms", "p99 ms", "ms", higher_is_better=False),
        ),
        "wrk -t1 -c1 (one request at a time) to bench/split_writes_backend.py (Python http.server's "
        "two sends per response): a proxy that delays its ACK of the head adds up to 40 ms",
        measure_split_writes_latency,
    ),
    Row(
        "idle-rss", "Memory per idle TLS connection", _RSA,
        (Metric("kib_per_idle_connection", "KiB/conn", "KiB", higher_is_better=False),),
        "asyncio client holds N handshaken, idle connections; proxy process-tree RSS delta / N",
        measure_idle_memory,
    ),
    Row(
        "slow-readers", "Memory per stalled reader (3 x 1 MiB pipelined, never read)", _RSA,
        (
            Metric("kib_per_stalled_reader", "KiB/reader", "KiB", higher_is_better=False),
            Metric("honest_p95_ms", "honest p95 ms", "ms", higher_is_better=False),
        ),
        f"asyncio client holds N TLS connections that each pipeline {slow_readers.PIPELINED} "
        "requests for 1 MiB and read nothing (4 KiB receive buffer); proxy process-tree RSS rise / N; "
        "an honest client sends small requests on new connections meanwhile",
        measure_slow_readers,
    ),
    Row(
        "handshake-async-engine", "Full handshakes RSA-2048, async fixture engine",
        ProxySettings(key_type="rsa", resumption=False, workers=1, offload="engine"), (_HANDSHAKES,),
        "as handshake-rsa; ingress-proxy with `tls.engine` = the test suite's async fixture engine "
        "(tests/engine/async_engine, RSA+EC on 2 worker threads) and `tls.async: true`. The engine's "
        "threads inherit the proxy's pinning to core 0, so this shows the async path's cost on one "
        "core, not an offload device's gain; compare with ingress-proxy's handshake-rsa figure. "
        f"Checked: `{ASYNC_PAUSES_METRIC}` rises during the measurement",
        measure_async_engine_handshakes,
        not_applicable=(
            ("haproxy", "Debian's HAProxy is built without engine support (`haproxy -vv`: -ENGINE)"),
            ("nginx", "nginx has no async mode (its `ssl_engine` would run the engine synchronously)"),
        ),
    ),
    *(
        Row(
            f"offload-{key_label}-{offload or 'software'}",
            f"Offload {title}: {offload_title}",
            ProxySettings(
                key_type=key_type, resumption=False, workers=1, offload=offload,
                accelerator_cpus=GENERATOR_CPUS if offload else None,
            ),
            _OFFLOAD_METRICS,
            _S_TIME.format(mode="new") + f"; ingress-proxy {offload_how}. Figure: handshakes per CPU-second of "
            "the proxy's event-loop thread (core 0); the fixture's 2 worker threads are pinned to core 1, "
            "beside s_time, as an accelerator sits beside the CPU",
            measure_offload_handshakes,
            not_applicable=_OFFLOAD_NOT_APPLICABLE,
        )
        for key_type, key_label, title in (
            ("rsa", "rsa", "RSA-2048"), ("ecdsa", "ecdsa", "ECDSA P-256"), ("rsa4096", "rsa4096", "RSA-4096"),
        )
        for offload, offload_title, offload_how in (
            (None, "software", "with the key in software"),
            ("engine", "async fixture engine", "with `tls.engine` = tests/engine/async_engine and `tls.async: true`"),
            ("provider", "async fixture provider",
             "with `tls.providers` = tests/engine/async_provider (the key held by it, `key: testoffload:FILE`) "
             "and `tls.async: true`"),
        )
    ),
    Row(
        "keepalive-w2", "Keep-alive HTTPS, 2 workers",
        ProxySettings(key_type="rsa", resumption=True, workers=2), (_REQUESTS,),
        f"as keepalive; proxy on both cores (nbthread 2 / worker_processes 2 / --workers 2), "
        "sharing core 1 with wrk and the backend",
        measure_keep_alive,
    ),
    Row(
        "handshake-rsa-w2", "Full handshakes RSA-2048, 2 workers",
        ProxySettings(key_type="rsa", resumption=False, workers=2), (_HANDSHAKES,),
        "as handshake-rsa; proxy on both cores, sharing core 1 with s_time and the backend",
        measure_full_handshakes,
    ),
)
