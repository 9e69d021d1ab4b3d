"""The benchmark rows: what each measures, with which settings and tool, and how it checks itself.

A row measures every proxy with the same `ProxySettings` (key type, resumption, worker count) and
turns the generator's `LoadResult` into named metric values plus flags. Throughput metrics also get
a per-CPU figure, value ÷ the proxy's CPU share in the window: on two cores the TLS clients cost
as much CPU per handshake as the servers, so the generator core saturates before a fast proxy's
core does, and the raw rate then understates that proxy (the flag says so).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import idle, loadgen
from bench.certs import CertSet
from bench.machine import CpuWindow
from bench.servers import (
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


_RSA = ProxySettings(key_type="rsa", resumption=True, workers=1)
_RSA_NO_RESUMPTION = ProxySettings(key_type="rsa", resumption=False, workers=1)
_REQUESTS = Metric("requests_per_second", "req/s", "req/s", per_cpu=True)
_HANDSHAKES = Metric("handshakes_per_second", "handshakes/s", "handshakes/s", per_cpu=True)
_S_TIME = (
    f"{loadgen.S_TIME_PROCESSES} x `openssl s_time -{{mode}} -www /` side by side: a new TCP+TLS "
    "connection per `GET / HTTP/1.0`"
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
        "idle-rss", "Memory per idle TLS connection", _RSA,
        (Metric("kib_per_idle_connection", "KiB/conn", "KiB", higher_is_better=False),),
        "asyncio client holds N handshaken, idle connections; proxy process-tree RSS delta / N",
        measure_idle_memory,
    ),
    Row(
        "handshake-async-engine", "Full handshakes RSA-2048, async fixture engine",
        ProxySettings(key_type="rsa", resumption=False, workers=1, async_engine=True), (_HANDSHAKES,),
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
