"""Round-robin over each backend's endpoints, with one keep-alive pool per endpoint and transport.

Backends are replaced whole on every published configuration, or one at a time by the endpoint
fast path; pools are keyed by (endpoint address, transport) — the transport being the backend's
prebuilt TLS set-up, or None for plain TCP — so connections survive both as long as their endpoint
is still used the same way, and a plaintext connection is never handed to a TLS backend (or one
TLS set-up's connection to another) that shares its address.
"""

from __future__ import annotations

from collections.abc import Mapping

from config.model import Address, Backend, BackendProtocol
from proxy.upstream import EndpointPool, PoolKey, UpstreamConnection
from proxy.upstream_http2 import Http2Pool
from proxy.upstream_tls import UpstreamTransport


class Balancer:
    def __init__(self) -> None:
        self._endpoints: dict[str, tuple[Address, ...]] = {}
        self._transports: Mapping[str, UpstreamTransport] = {}
        self._cursor: dict[str, int] = {}
        self._pools: dict[PoolKey, EndpointPool] = {}
        self._protocols: dict[str, BackendProtocol] = {}
        self._http2_pools: dict[PoolKey, Http2Pool] = {}  # HTTP/2 backends: connections carry many streams

    def set_backends(self, backends: tuple[Backend, ...], transports: Mapping[str, UpstreamTransport] | None = None) -> None:
        """`transports`: backend name → TLS set-up, for the backends whose protocol uses TLS."""
        self._endpoints = {backend.name: backend.endpoints for backend in backends}
        self._protocols = {backend.name: backend.protocol for backend in backends}
        self._transports = transports or {}
        self._close_unused_pools()

    def protocol(self, backend: str) -> BackendProtocol:
        return self._protocols.get(backend, BackendProtocol.HTTP)

    def http2_pool(self, address: Address, transport: UpstreamTransport | None) -> Http2Pool:
        key = (address, transport)
        pool = self._http2_pools.get(key)
        if pool is None:
            pool = self._http2_pools[key] = Http2Pool(address, transport)
        return pool

    def update_endpoints(self, backend: str, endpoints: tuple[Address, ...]) -> None:
        self._endpoints = {**self._endpoints, backend: endpoints}
        self._close_unused_pools()

    def has_endpoints(self, backend: str) -> bool:
        """Whether `candidates` would name any (without moving the round-robin cursor)."""
        return bool(self._endpoints.get(backend))

    def candidates(self, backend: str) -> list[Address]:
        """All endpoints, starting at the next one in round-robin order (retries walk on)."""
        endpoints = self._endpoints.get(backend, ())
        if not endpoints:
            return []
        start = self._cursor.get(backend, 0) % len(endpoints)
        self._cursor[backend] = start + 1
        return [*endpoints[start:], *endpoints[:start]]

    def transport(self, backend: str) -> UpstreamTransport | None:
        """The backend's TLS set-up; None for a plain-HTTP backend."""
        return self._transports.get(backend)

    def pool(self, address: Address, transport: UpstreamTransport | None = None) -> EndpointPool:
        key = (address, transport)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = EndpointPool(key)
        return pool

    def release(self, connection: UpstreamConnection) -> None:
        """A request finished: keep the connection for reuse if its endpoint is still in use."""
        pool = self._pools.get(connection.pool_key)
        if pool is None:
            connection.close()  # the endpoint was removed while this request ran
        else:
            pool.give_back(connection)

    def _close_unused_pools(self) -> None:
        in_use = {
            (address, self._transports.get(name)) for name, endpoints in self._endpoints.items() for address in endpoints
        }
        for key in [key for key in self._pools if key not in in_use]:
            self._pools.pop(key).close_all()
        for key in [key for key in self._http2_pools if key not in in_use]:
            self._http2_pools.pop(key).close_all()
