"""Round-robin over each backend's endpoints, with one keep-alive pool per endpoint.

Backends are replaced whole on every published configuration, or one at a time by the endpoint
fast path; pools are keyed by endpoint address, so connections survive both as long as their
endpoint is still in use, and are closed when it is not.
"""

from __future__ import annotations

from config.model import Address, Backend
from proxy.upstream import EndpointPool, UpstreamConnection


class Balancer:
    def __init__(self) -> None:
        self._endpoints: dict[str, tuple[Address, ...]] = {}
        self._cursor: dict[str, int] = {}
        self._pools: dict[Address, EndpointPool] = {}

    def set_backends(self, backends: tuple[Backend, ...]) -> None:
        self._endpoints = {backend.name: backend.endpoints for backend in backends}
        self._close_unused_pools()

    def update_endpoints(self, backend: str, endpoints: tuple[Address, ...]) -> None:
        self._endpoints = {**self._endpoints, backend: endpoints}
        self._close_unused_pools()

    def candidates(self, backend: str) -> list[Address]:
        """All endpoints, starting at the next one in round-robin order (retries walk on)."""
        endpoints = self._endpoints.get(backend, ())
        if not endpoints:
            return []
        start = self._cursor.get(backend, 0) % len(endpoints)
        self._cursor[backend] = start + 1
        return [*endpoints[start:], *endpoints[:start]]

    def pool(self, address: Address) -> EndpointPool:
        pool = self._pools.get(address)
        if pool is None:
            pool = self._pools[address] = EndpointPool(address)
        return pool

    def release(self, connection: UpstreamConnection) -> None:
        """A request finished: keep the connection for reuse if its endpoint is still in use."""
        pool = self._pools.get(connection.address)
        if pool is None:
            connection.close()  # the endpoint was removed while this request ran
        else:
            pool.give_back(connection)

    def _close_unused_pools(self) -> None:
        in_use = {address for endpoints in self._endpoints.values() for address in endpoints}
        for address in [address for address in self._pools if address not in in_use]:
            self._pools.pop(address).close_all()
