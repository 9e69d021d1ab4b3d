"""The narrow interface between route sources (routes file, Kubernetes) and the data plane.

A source computes whole `Configuration`s and hands them to a sink; the data plane is the sink.
Standalone and Kubernetes modes differ only in which source runs (null objects, not flags).
"""

from __future__ import annotations

from typing import Protocol

from config.model import Address, Configuration, Problem


class ConfigurationSink(Protocol):
    def publish(self, configuration: Configuration) -> tuple[Problem, ...]:
        """Build TLS contexts and routing for `configuration`, then swap it in atomically.

        Returns problems for parts that could not be built (e.g. a certificate whose key does not
        load); those parts are left out, the rest is served. Never raises for bad input.
        """
        ...

    def update_endpoints(self, backend: str, endpoints: tuple[Address, ...]) -> None:
        """Fast path: replace one backend's endpoints without rebuilding routes or contexts."""
        ...


class RouteSource(Protocol):
    async def run(self, sink: ConfigurationSink) -> None:
        """Publish the first configuration as soon as it is complete, then every change, until cancelled."""
        ...
