"""One proxy subprocess for the whole folder, in front of a recording backend and faulty ones.

Timeouts are short so that every "closed within the configured timeout" claim is checked in
seconds. At teardown the proxy's stderr must hold no traceback: a hostile
client may cost its own connection, never a stack trace in the log.

Hypothesis profiles: "default" (bounded, for `make test`) and "fuzz" (`make fuzz`), chosen by
HYPOTHESIS_PROFILE.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator

import pytest
import trustme
from hypothesis import HealthCheck, settings

from tests.hostile.backends import BackendZoo
from tests.hostile.clients import SERVER_NAME
from tests.hostile.proxy_process import LOOPBACK, Ports, ProxyProcess, routes_document, write_certificate
from tests.ports import free_port

settings.register_profile("default", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

TIMEOUTS = {"connect": 1.0, "handshake": 2.0, "header_read": 1.0, "idle": 2.0, "backend_response": 1.0, "drain": 2.0}


@pytest.fixture(scope="package")
def zoo() -> Iterator[BackendZoo]:
    backends = BackendZoo()
    yield backends
    backends.close()


@pytest.fixture(scope="package")
def hostile_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="package")
def hostile_proxy(
    zoo: BackendZoo, hostile_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    directory = tmp_path_factory.mktemp("hostile-proxy")
    certificate = write_certificate(hostile_ca, directory, "hostile", SERVER_NAME)
    backends = {"app": [str(zoo.app.address)], "mixed": [str(zoo.faulty["reset"].address), str(zoo.app.address)]}
    backends["refused"] = [f"{LOOPBACK}:{free_port()}"]
    paths = [("/", "app"), ("/mixed", "mixed"), ("/refused", "refused")]
    for name, backend in zoo.faulty.items():
        backends[name] = [str(backend.address)]
        paths.append((f"/fault/{name}", name))
    ports = Ports()  # the proxy may move to others (ProxyProcess): tests use hostile_proxy.ports
    proxy = ProxyProcess(directory, ports, routes_document(ports, backends, paths, [certificate.entry()], TIMEOUTS))
    yield proxy
    exit_code = proxy.stop()
    assert exit_code == 0, proxy.stderr()[-3000:]
    assert proxy.tracebacks() == [], proxy.stderr()[-5000:]


@pytest.fixture
def app_requests(zoo: BackendZoo) -> list[dict]:
    """What the recording backend received during this test (emptied at its start)."""
    zoo.app.received.clear()
    return zoo.app.received


@pytest.fixture
def trusted_client(hostile_ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    hostile_ca.configure_trust(context)
    return context
