"""What every connection serves from, in a module that both the lifecycle and the shells import.

`server.ProxyServer` publishes `Generation`s and owns the listeners; the protocol shells
(`downstream` for HTTP/1.1, `http2_session` for HTTP/2) and the `exchange` read the current
generation and the balancer through the `ServingState` protocol. Neither side imports the other,
so there is no import circle and a shell can be driven by any object with these members.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from config.model import Configuration
from proxy.balancer import Balancer
from proxy.contexts import TlsContexts
from proxy.router import Router


@dataclass(frozen=True)
class Listener:
    name: str  # "https" or "http": metrics label and X-Forwarded-Proto
    tls: bool
    address: bytes  # "host:port" as bound: the Host for HTTP/1.0 requests that carry none


@dataclass(frozen=True)
class Generation:
    number: int
    configuration: Configuration
    router: Router
    tls: TlsContexts


class ServingState(Protocol):
    balancer: Balancer
    connections: set[Any]  # open client connections (drain closes them)
    draining: bool
    https_port: int  # where plain-HTTP requests are redirected to

    @property
    def generation(self) -> Generation: ...
