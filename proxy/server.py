"""The data plane's lifecycle: publish configurations, open listeners, serve, drain.

`ProxyServer` is the `ConfigurationSink` both route sources feed. `publish` builds everything a
configuration needs — crypto runtime (only when crypto settings changed), TLS contexts, router,
backend pools — and then swaps `self.generation` in one assignment. Requests read the current
generation when they start and keep it until they end; nothing per connection touches
configuration objects being built. A generation counter plus an asyncio.Condition let tests and
the admin endpoint wait for "generation N is live" instead of sleeping.

Listeners open only after the first configuration is live (readyz is false before); SIGTERM
closes them, lets requests in flight finish within `timeouts.drain`, and returns.

Listener addresses are exclusive: no SO_REUSEPORT, so a second, unrelated instance on a held
address fails at start with one line naming the address (`ListenerError`, exit status 1) instead
of silently taking half the traffic. SO_REUSEADDR stays on so a restart is not refused while old
connections sit in TIME_WAIT; Linux still refuses a bind next to a listening socket. `--workers`
shares listeners by inheritance instead (proxy/workers.py): the master binds, workers get the
sockets as `inherited`, and a lock (`key_loading`) under which they load keys in turn, so that no
two workers log in to one HSM token at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext

from config.crypto import CryptoRuntime, CryptoSetupError
from config.model import Address, Configuration, Listeners, Problem
from config.source import RouteSource
from proxy import metrics
from proxy.access_log import ACCESS_LOG
from proxy.balancer import Balancer
from proxy.contexts import ContextCache, TlsContexts
from proxy.downstream import ClientConnection
from proxy.tls.libssl import TICKET_KEYS_LENGTH
from proxy.router import Router
from proxy.serving import Generation, Listener
from proxy.upstream_tls import UpstreamContextCache, UpstreamTransport

LOG = logging.getLogger("ingress_proxy")
LISTEN_BACKLOG = 1024


class ListenerError(Exception):
    """A listener address cannot be had; str() is the one line the user sees."""


class ProxyServer:
    def __init__(
        self,
        listeners: Listeners,
        ticket_keys: bytes | None = None,
        inherited: Mapping[str, socket.socket] | None = None,
        key_loading: AbstractContextManager[None] | None = None,
    ) -> None:
        self.listeners = listeners
        self._inherited = dict(inherited or {})  # listener name → socket bound by the --workers master
        self._key_loading = key_loading or nullcontext()  # held while a publish loads keys (proxy/workers.py)
        self.https_port = listeners.https.port
        self.ticket_keys = ticket_keys or os.urandom(TICKET_KEYS_LENGTH)
        self.balancer = Balancer()
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self._generation: Generation | None = None
        self._next_publish = asyncio.Event()  # set (and replaced) by every publish
        self._crypto: CryptoRuntime | None = None
        self._contexts = ContextCache(self.ticket_keys)
        self._upstream_contexts = UpstreamContextCache()  # backend TLS, built at publish like the listeners'
        self._servers: list[asyncio.AbstractServer] = []
        self.bound_ports: dict[str, int] = {}  # listener name → port actually bound (port 0 in tests)

    # -- ConfigurationSink --------------------------------------------------------------------

    @property
    def generation(self) -> Generation:
        assert self._generation is not None, "no configuration published yet"
        return self._generation

    @property
    def ready(self) -> bool:
        """Configured, not draining, and every listener open: a probe passing between the first
        publish and the listeners opening would send traffic to a closed port."""
        listener_count = 1 if self.listeners.http is None else 2
        return self._generation is not None and not self.draining and len(self._servers) == listener_count

    def publish(self, configuration: Configuration) -> tuple[Problem, ...]:
        problems: list[Problem] = []
        # Keys an engine or provider holds (an HSM token) load one --workers worker at a time.
        with self._key_loading if configuration.crypto.reaches_key_stores else nullcontext():
            configuration, tls, transports = self._build_crypto(configuration, problems)
        number = self._generation.number + 1 if self._generation else 1
        self.balancer.set_backends(configuration.routes.backends, transports)
        self._generation = Generation(number, configuration, Router(configuration.routes), tls)
        metrics.CONFIG_GENERATION.set(number)
        published, self._next_publish = self._next_publish, asyncio.Event()
        published.set()
        for problem in problems:
            LOG.warning("%s", problem)
        return tuple(problems)

    def _build_crypto(
        self, configuration: Configuration, problems: list[Problem]
    ) -> tuple[Configuration, TlsContexts, dict[str, UpstreamTransport]]:
        """The crypto runtime (restarted when its settings changed), the listeners' TLS contexts and
        the backends' transports for `configuration`; what fails is appended to `problems`. Returns
        the configuration with the crypto settings actually in force."""
        crypto = self._crypto
        if crypto is None or crypto.settings != configuration.crypto:
            try:
                crypto = CryptoRuntime.start(configuration.crypto)
            except CryptoSetupError as error:
                if crypto is None:
                    raise  # start-up: a required engine that does not load stops the process
                problems.append(Problem("tls.engine", f"{error}; keeping the previous crypto set-up"))
                configuration = dataclasses.replace(configuration, crypto=crypto.settings)
            else:
                self._crypto = crypto
                if configuration.crypto.engine is not None:
                    metrics.ENGINE_UP.labels(configuration.crypto.engine.id).set(crypto.engine_status == "loaded")
        tls = self._contexts.build(configuration, crypto.use_private_key)
        problems.extend(tls.problems)
        transports, transport_problems = self._upstream_contexts.build(configuration.routes.backends, crypto.use_private_key)
        problems.extend(transport_problems)
        return configuration, tls, transports

    def update_endpoints(self, backend: str, endpoints: tuple[Address, ...]) -> None:
        self.balancer.update_endpoints(backend, endpoints)

    async def wait_for_generation(self, number: int) -> Generation:
        while self._generation is None or self._generation.number < number:
            await self._next_publish.wait()
        return self._generation

    # -- lifecycle ----------------------------------------------------------------------------

    async def start_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        plan = [("https", True, self.listeners.https)]
        if self.listeners.http is not None:
            plan.append(("http", False, self.listeners.http))
        for name, tls, address in plan:
            sock = self._inherited.pop(name, None) or bind_listener(name, address)
            host, port = sock.getsockname()[:2]
            listener = Listener(name, tls, f"{host}:{port}".encode())
            try:
                server = await loop.create_server(
                    lambda listener=listener: ClientConnection(self, listener),  # type: ignore[misc]
                    sock=sock,
                    backlog=LISTEN_BACKLOG,
                )
            except OSError as error:  # two instances bound at once: the second listen() fails
                sock.close()
                raise ListenerError(_held_message(name, address, error)) from None
            self._servers.append(server)
            self.bound_ports[name] = server.sockets[0].getsockname()[1]
            if name == "https":
                self.https_port = self.bound_ports[name]
            LOG.info("listening for %s on %s", name, address)

    async def drain(self) -> None:
        """Stop accepting, let requests in flight finish (bounded), then close everything."""
        self.draining = True
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            connection.drain_now()
        deadline = asyncio.get_running_loop().time() + self.generation.configuration.timeouts.drain
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        ACCESS_LOG.flush()
        if self._crypto is not None:
            self._crypto.close()

    async def serve(self, source: RouteSource, stop: asyncio.Event) -> None:
        """Run `source` into this server, open listeners once configured, drain when `stop` is set."""
        source_task = asyncio.create_task(source.run(self))
        first = asyncio.create_task(self.wait_for_generation(1))
        done, _ = await asyncio.wait({source_task, first}, return_when=asyncio.FIRST_COMPLETED)
        if source_task in done:
            first.cancel()
            source_task.result()  # the source failed before publishing: raise its error
            raise RuntimeError("the route source stopped before publishing a configuration")
        try:
            await self.start_listeners()
        except ListenerError:  # nothing was served: close what opened, quietly
            await self._stop(source_task)
            raise
        try:
            await stop.wait()
        finally:
            LOG.info("draining %d connections", len(self.connections))
            await self._stop(source_task)

    async def _stop(self, source_task: asyncio.Task[None]) -> None:
        await self.drain()
        source_task.cancel()
        await asyncio.gather(source_task, return_exceptions=True)


def _held_message(name: str, address: Address, error: OSError) -> str:
    return (
        f"cannot listen for {name} on {address}: {error.strerror or error} "
        "(another process holds this address: stop it, or choose another address)"
    )


def bind_listener(name: str, address: Address) -> socket.socket:
    """A socket bound to `address`, not yet listening, exclusively (no SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address.host, address.port))
    except OSError as error:
        sock.close()
        raise ListenerError(_held_message(name, address, error)) from None
    sock.setblocking(False)
    return sock


def bind_listeners(listeners: Listeners) -> dict[str, socket.socket]:
    """The data-plane sockets for the --workers master to bind before it forks."""
    sockets = {"https": bind_listener("https", listeners.https)}
    if listeners.http is not None:
        try:
            sockets["http"] = bind_listener("http", listeners.http)
        except ListenerError:
            sockets["https"].close()
            raise
    return sockets


async def run_proxy(
    listeners: Listeners,
    source: RouteSource,
    ticket_keys: bytes | None = None,
    with_admin: bool = True,
    inherited: Mapping[str, socket.socket] | None = None,
    key_loading: AbstractContextManager[None] | None = None,
) -> int:
    """A process's main coroutine: admin listener, route source, data plane, drain on SIGTERM."""
    from proxy.admin import start_admin

    server = ProxyServer(listeners, ticket_keys, inherited, key_loading)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    admin = None
    try:
        if listeners.admin and with_admin:
            try:
                admin = await start_admin(listeners.admin, lambda: server.ready)
            except OSError as error:
                raise ListenerError(_held_message("admin", listeners.admin, error)) from None
        await server.serve(source, stop)
    except (CryptoSetupError, ListenerError) as error:
        LOG.error("%s", error)
        return 1
    finally:
        if admin is not None:
            await admin.cleanup()
    return 0
