"""`proxy.metrics.RequestCounts` (plain integers folded at scrape time) exposes exactly what
prometheus-client's Counter and Histogram would for the same requests: names, labels, values."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from proxy.metrics import DURATION_BUCKETS, RequestCounts

REQUESTS = [
    ("a.test", "app", 200, "http/1.1", 0.0004),
    ("a.test", "app", 200, "http/1.1", 0.001),  # on a bound: counted in that bucket (le)
    ("a.test", "app", 502, "h2", 0.2),
    ("*", "other", 404, "http/1.1", 45.0),  # beyond the last bound: +Inf only
    ("-", "-", 404, "http/1.1", 0.0),
]


def exposition(registry: CollectorRegistry) -> list[str]:
    """The exposition lines, with the `_created` timestamps' values cut off (they differ)."""
    lines = generate_latest(registry).decode().splitlines()
    return [line.rsplit(" ", 1)[0] if "_created{" in line else line for line in lines]


def test_folded_counts_expose_what_client_objects_would():
    reference = CollectorRegistry()
    requests = Counter("ingress_proxy_requests", "Requests answered", ["host", "backend", "status", "protocol"], registry=reference)
    durations = Histogram(
        "ingress_proxy_request_duration_seconds", "Time from request head to the end of the response", ["backend"],
        buckets=DURATION_BUCKETS, registry=reference,
    )  # fmt: skip
    folded = RequestCounts()
    ours = CollectorRegistry()
    ours.register(folded)
    for host, backend, status, protocol, seconds in REQUESTS:
        requests.labels(host, backend, str(status), protocol).inc()
        durations.labels(backend).observe(seconds)
        folded.record(host, backend, status, protocol, seconds)
    assert exposition(ours) == exposition(reference)
    assert ours.get_sample_value("ingress_proxy_requests_total", {"host": "a.test", "backend": "app", "status": "200", "protocol": "http/1.1"}) == 2
    assert ours.get_sample_value("ingress_proxy_request_duration_seconds_bucket", {"backend": "other", "le": "30.0"}) == 0
