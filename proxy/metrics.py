"""Prometheus metrics of the data plane (default registry, served by the admin listener).

Label values are bounded: hosts are the configured virtual-host patterns, never the raw Host
header, so hostile clients cannot blow up cardinality.
"""

import functools

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("ingress_proxy_requests", "Requests answered", ["host", "backend", "status", "protocol"])
REQUEST_SECONDS = Histogram(
    "ingress_proxy_request_duration_seconds",
    "Time from request head to the end of the response",
    ["backend"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
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


@functools.lru_cache(maxsize=4096)
def request_series(host: str, backend: str, status: int, protocol: str) -> tuple[Counter, Histogram]:
    """The labelled children for one (host, backend, status, protocol): looked up once, not per request."""
    return REQUESTS.labels(host, backend, str(status), protocol), REQUEST_SECONDS.labels(backend)


@functools.lru_cache(maxsize=64)
def open_connections(listener: str) -> Gauge:
    """The open-connections child of one listener: looked up once, not twice per connection."""
    return OPEN_CONNECTIONS.labels(listener)


@functools.lru_cache(maxsize=256)
def handshake_series(version: str, key_source: str, resumed: bool) -> Counter:
    return TLS_HANDSHAKES.labels(version, key_source, "yes" if resumed else "no")
