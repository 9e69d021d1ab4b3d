"""Which address the status writer publishes, from flags or from the published Service."""

from __future__ import annotations

from typing import Any

import pytest

from ingress_watch.snapshot import Snapshot
from ingress_watch.status import PublishSettings, desired_load_balancer

SERVICE = ("ingress", "proxy")


def _service(spec: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"namespace": "ingress", "name": "proxy"}, "spec": spec, "status": status or {}}


@pytest.mark.parametrize(
    ("settings", "services", "expected"),
    [
        (PublishSettings(addresses=("192.0.2.1", "lb.example")), (), (("ip", "192.0.2.1"), ("hostname", "lb.example"))),
        (PublishSettings(service=SERVICE), (), ()),
        (PublishSettings(service=SERVICE), (_service({"clusterIP": "10.96.0.9"}),), (("ip", "10.96.0.9"),)),
        (PublishSettings(service=SERVICE), (_service({"clusterIP": "None"}),), ()),
        (PublishSettings(service=SERVICE), (_service({"clusterIP": "10.96.0.9", "externalIPs": ["203.0.113.5"]}),),
         (("ip", "203.0.113.5"),)),
        (PublishSettings(service=SERVICE),
         (_service({"clusterIP": "10.96.0.9"}, {"loadBalancer": {"ingress": [{"hostname": "elb.example", "ports": []}]}}),),
         (("hostname", "elb.example"),)),
        (PublishSettings(), (_service({"clusterIP": "10.96.0.9"}),), ()),
    ],
    ids=["flag", "service-missing", "cluster-ip", "headless", "external-ips", "load-balancer", "nothing-configured"],
)
def test_desired_load_balancer(settings: PublishSettings, services: tuple[dict[str, Any], ...], expected: tuple) -> None:
    assert desired_load_balancer(settings, Snapshot(services=services)) == expected
