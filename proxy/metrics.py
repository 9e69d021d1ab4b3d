"""Prometheus metrics of the data plane (default registry, served by the admin listener).

Label values are bounded: hosts are the configured virtual-host patterns, never the raw Host
header, so hostile clients cannot blow up cardinality.
"""

import bisect
import functools
import math
import os
import time
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_REQUESTS_DOC = "Requests answered"
_DURATION_DOC = "Time from request head to the end of the response"
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class RequestCounts(Collector):
    """`ingress_proxy_requests` and `ingress_proxy_request_duration_seconds` as plain integers per
    series, folded into Prometheus samples at scrape time (`collect`): recording a request is two
    dict lookups and three additions instead of two locked client objects. Same names, labels and
    samples (with `_created`) as prometheus-client's Counter and Histogram would give
    (tests/unit/test_metrics.py compares them). The event loop is the only writer and `collect`
    runs on it too (the admin listener), so no lock is needed.

    With `--workers` (prometheus-client's multiprocess mode) each worker's figures must reach the
    files the admin listener adds up, so there `record` goes through the client's own objects."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, int, str], list[float]] = {}  # → [count, created]
        self._durations: dict[str, list[float]] = {}  # backend → [bucket counts..., +Inf, sum, created]

    def record(self, host: str, backend: str, status: int, protocol: str, seconds: float) -> None:
        key = (host, backend, status, protocol)
        count = self._counts.get(key)
        if count is None:
            count = self._counts[key] = [0, time.time()]
        count[0] += 1
        durations = self._durations.get(backend)
        if durations is None:
            durations = self._durations[backend] = [0] * (len(DURATION_BUCKETS) + 1) + [0.0, time.time()]
        durations[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1  # the first bucket whose bound >= seconds
        durations[-2] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("ingress_proxy_requests", _REQUESTS_DOC, labels=("host", "backend", "status", "protocol"))
        for (host, backend, status, protocol), (count, created) in self._counts.items():
            requests.add_metric((host, backend, str(status), protocol), count, created=created)
        yield requests
        durations = Metric("ingress_proxy_request_duration_seconds", _DURATION_DOC, "histogram")
        name = durations.name
        for backend, values in self._durations.items():
            cumulative = 0.0
            for bound, count in zip((*DURATION_BUCKETS, math.inf), values):
                cumulative += count
                durations.add_sample(name + "_bucket", {"backend": backend, "le": floatToGoString(bound)}, cumulative)
            durations.add_sample(name + "_count", {"backend": backend}, cumulative)
            durations.add_sample(name + "_sum", {"backend": backend}, values[-2])
            durations.add_sample(name + "_created", {"backend": backend}, values[-1])
        yield durations


class FastPathCounts(Collector):
    """How many requests the fast path (`proxy.fast_path`) took, by outcome: plain integers,
    exposed as `ingress_proxy_fast_path_requests_total{outcome}` at scrape time. Not kept with
    `--workers` (a worker's plain integers never reach the admin listener's process)."""

    __slots__ = ("served", "handed_over", "routed_general")

    def __init__(self) -> None:
        self.served = 0  # answered wholly by the fast path
        self.handed_over = 0  # sent by the fast path, answered by the general path
        self.routed_general = 0  # routed by the fast path, sent by the general path (no idle pooled connection)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "ingress_proxy_fast_path_requests", "Requests the keep-alive fast path took, by outcome", labels=("outcome",)
        )
        for outcome in self.__slots__:
            family.add_metric((outcome,), getattr(self, outcome))
        yield family


class _MultiprocessRequestCounts:
    """`RequestCounts.record` through prometheus-client's objects, for its multiprocess mode."""

    def __init__(self) -> None:
        self._requests = Counter("ingress_proxy_requests", _REQUESTS_DOC, ["host", "backend", "status", "protocol"])
        self._durations = Histogram("ingress_proxy_request_duration_seconds", _DURATION_DOC, ["backend"], buckets=DURATION_BUCKETS)

    def record(self, host: str, backend: str, status: int, protocol: str, seconds: float) -> None:
        requests, durations = self._series(host, backend, status, protocol)
        requests.inc()
        durations.observe(seconds)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (one instance, for the process's life)
    def _series(self, host: str, backend: str, status: int, protocol: str) -> tuple[Counter, Histogram]:
        return self._requests.labels(host, backend, str(status), protocol), self._durations.labels(backend)


REQUESTS: RequestCounts | _MultiprocessRequestCounts
if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
    REQUESTS = _MultiprocessRequestCounts()
else:
    REQUESTS = RequestCounts()
    REGISTRY.register(REQUESTS)
FAST_PATH = FastPathCounts()
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    REGISTRY.register(FAST_PATH)
OPEN_CONNECTIONS = Gauge("ingress_proxy_open_connections", "Client connections open", ["listener"])
TLS_HANDSHAKES = Counter(
    "ingress_proxy_tls_handshakes", "Completed TLS handshakes", ["version", "key_source", "resumed"]
)
TLS_HANDSHAKE_FAILURES = Counter("ingress_proxy_tls_handshake_failures", "Failed TLS handshakes", ["reason"])
TLS_ASYNC_PAUSES = Counter("ingress_proxy_tls_async_pauses", "Handshakes paused by an async engine job")
PROXY_HEADER_REFUSALS = Counter(
    "ingress_proxy_proxy_header_refusals", "Connections closed for a missing or bad PROXY protocol header", ["listener"]
)
POLICY_ANSWERS = Counter("ingress_proxy_policy_answers", "Requests a route policy answered locally", ["status"])
UPSTREAM_ERRORS = Counter("ingress_proxy_upstream_errors", "Backend failures", ["backend", "kind"])
CONFIG_GENERATION = Gauge("ingress_proxy_config_generation", "Generation of the configuration being served")
ENGINE_UP = Gauge("ingress_proxy_engine_up", "1 if the configured OpenSSL engine is loaded", ["engine"])


@functools.lru_cache(maxsize=64)
def open_connections(listener: str) -> Gauge:
    """The open-connections child of one listener: looked up once, not twice per connection."""
    return OPEN_CONNECTIONS.labels(listener)


@functools.lru_cache(maxsize=256)
def handshake_series(version: str, key_source: str, resumed: bool) -> Counter:
    return TLS_HANDSHAKES.labels(version, key_source, "yes" if resumed else "no")
