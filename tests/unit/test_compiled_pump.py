"""The compiled TLS record pump (proxy/tls/_pump.pyx) against the pure one, byte for byte.

TLS output is random (client and server randoms, key shares, signature salts), so two runs never
match by themselves. These tests install a deterministic RAND_METHOD in libcrypto for the length
of one comparison (`deterministic_openssl`): every run of a scenario then makes the very same
handshake, and any difference in the bytes either side sends, the plaintext it receives, the
exception it raises (type, reason) or the state it ends in is the pump's doing. Session tickets are
off (they carry a timestamp). Each scenario runs once with `PurePump` and once with
`CompiledPump`, swapped in through `proxy.tls.new_pump`, both directions: `ServerTls` against a
pyOpenSSL client, `ClientTls` against a pyOpenSSL server.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL, crypto

import proxy.tls
from proxy import compiled
from proxy.tls import MemoryBioTls, ServerTls, TlsFailure, TlsState, libssl
from proxy.tls import pump as pumps
from proxy.upstream_tls import ClientTls, UpstreamTlsFailure
from tests.memory_tls import pending

ROOT = Path(__file__).resolve().parents[2]
BUILT = sorted(glob.glob(str(ROOT / "proxy" / "tls" / "_pump*.so")))
needs_compiled = pytest.mark.skipif(not BUILT, reason="the compiled pump was not built in this checkout: make install")


def compiled_pump(connection: SSL.Connection) -> pumps.Pump:
    """The extension's pump, also when INGRESS_PROXY_PURE=1 keeps the proxy itself on the pure one."""
    from proxy.tls._pump import CompiledPump

    return CompiledPump(pumps.address(connection._ssl), pumps.address(connection._into_ssl), pumps.address(connection._from_ssl))

# -- a deterministic libcrypto RNG, for the length of one comparison ------------------------------

_LIBCRYPTO = ctypes.CDLL("libcrypto.so.3")
_LIBCRYPTO.RAND_get_rand_method.restype = ctypes.c_void_p
_LIBCRYPTO.RAND_set_rand_method.argtypes = (ctypes.c_void_p,)
_Seed = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_Bytes = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_ubyte), ctypes.c_int)
_Cleanup = ctypes.CFUNCTYPE(None)
_Add = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_double)
_Status = ctypes.CFUNCTYPE(ctypes.c_int)


class _RandMethod(ctypes.Structure):  # struct rand_meth_st, OpenSSL 3.0 include/openssl/rand.h
    _fields_ = [("seed", _Seed), ("bytes", _Bytes), ("cleanup", _Cleanup), ("add", _Add), ("pseudorand", _Bytes), ("status", _Status)]


class _CounterStream:
    def __init__(self) -> None:
        self.counter = 0

    def fill(self, buffer: ctypes.Array, count: int) -> int:
        out = bytearray()
        while len(out) < count:
            self.counter += 1
            out += hashlib.sha256(b"pump-differential" + self.counter.to_bytes(8, "big")).digest()
        ctypes.memmove(buffer, bytes(out[:count]), count)
        return 1


_STREAM = _CounterStream()
_CALLBACKS = (_Seed(lambda data, size: 1), _Bytes(_STREAM.fill), _Cleanup(lambda: None), _Add(lambda data, size, entropy: 1), _Bytes(_STREAM.fill), _Status(lambda: 1))
_METHOD = _RandMethod(*_CALLBACKS)


@contextmanager
def deterministic_openssl() -> Iterator[Callable[[], None]]:
    """Yield `restart()`, which rewinds the RNG: what follows draws the same bytes as last time."""
    original = _LIBCRYPTO.RAND_get_rand_method()
    assert _LIBCRYPTO.RAND_set_rand_method(ctypes.addressof(_METHOD)) == 1
    try:
        yield lambda: setattr(_STREAM, "counter", 0)
    finally:
        _LIBCRYPTO.RAND_set_rand_method(original)


@contextmanager
def pump_kind(factory: Callable[[SSL.Connection], pumps.Pump]) -> Iterator[None]:
    saved = proxy.tls.new_pump
    proxy.tls.new_pump = factory
    try:
        yield
    finally:
        proxy.tls.new_pump = saved


# -- scenarios: a list of steps, run against one of our TLS endpoints and a pyOpenSSL peer ---------

ISSUED = trustme.CA().issue_cert("pump.test", key_type=trustme.KeyType.ECDSA)


def _certified(context: SSL.Context) -> SSL.Context:
    context.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, ISSUED.cert_chain_pems[0].bytes()))
    context.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, ISSUED.private_key_pem.bytes()))
    return context


def _contexts(version: int) -> tuple[SSL.Context, SSL.Context]:
    server = _certified(SSL.Context(SSL.TLS_SERVER_METHOD))
    server.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION)  # as proxy.contexts
    libssl.set_ticket_count(server, 0)  # tickets carry the time: not reproducible
    client = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client.set_options(SSL.OP_NO_TICKET)
    for context in (server, client):
        context.set_min_proto_version(version)
        context.set_max_proto_version(version)
    return server, client


def _peer_recv(peer: SSL.Connection) -> tuple:
    received = b""
    try:
        while True:
            received += peer.recv(1 << 20)
    except SSL.WantReadError:
        return ("peer-got", received)
    except SSL.ZeroReturnError:
        return ("peer-got", received, "close_notify")
    except SSL.Error as error:
        return ("peer-got", received, "error", str(error))


def _ours_call(log: list, call: Callable[[], object]) -> None:
    try:
        log.append(("ok", call()))
    except (TlsFailure, UpstreamTlsFailure) as error:
        log.append(("raised", type(error).__name__, str(error), getattr(error, "kind", None)))


def run_scenario(server_side: bool, version: int, steps: list[tuple], splits: list[int]) -> list:
    """Everything observable, in order: bytes on the wire both ways, results, exceptions, states."""
    server_context, client_context = _contexts(version)
    if server_side:
        ours: MemoryBioTls = ServerTls(server_context)
        peer = SSL.Connection(client_context, None)
        peer.set_connect_state()
    else:
        ours = ClientTls(client_context, "pump.test", True, False, None)
        peer = SSL.Connection(server_context, None)
        peer.set_accept_state()
        ours.start()
    log: list = []

    def deliver(data: bytes) -> None:  # peer → ours, cut at the split offsets that fall inside
        cuts = sorted({cut for cut in splits if 0 < cut < len(data)})
        for start, end in zip([0, *cuts], [*cuts, len(data)]):
            _ours_call(log, lambda piece=data[start:end]: ours.receive(piece))  # type: ignore[misc]
        log.append(("state", ours.state))

    def flush_ours() -> None:  # ours → peer
        ciphertext = ours.outgoing()
        log.append(("wire-out", ciphertext))
        if ciphertext:
            peer.bio_write(ciphertext)

    for _ in range(10):  # the handshake, with the first step's cuts applied to every flight
        try:
            peer.do_handshake()
        except SSL.WantReadError:
            pass
        flush_ours()
        incoming = pending(peer)
        log.append(("wire-in", incoming))
        if incoming:
            deliver(incoming)
        flush_ours()
        if ours.state is not TlsState.HANDSHAKING and not incoming:
            break
    for step in steps:
        kind = step[0]
        if kind == "peer_sends":
            for message in step[1]:
                try:
                    peer.send(message)
                except SSL.Error as error:  # the peer is closed or broken: part of what is compared
                    log.append(("peer-send-error", repr(error)))
            incoming = pending(peer)
            log.append(("wire-in", incoming))
            deliver(incoming)
            flush_ours()
        elif kind == "we_send":
            _ours_call(log, lambda: ours.send(b"".join(step[1])))
            flush_ours()
            log.append(_peer_recv(peer))
        elif kind == "peer_closes":
            try:
                peer.shutdown()
            except SSL.Error as error:
                log.append(("peer-shutdown-error", str(error)))
            deliver(pending(peer))
            flush_ours()
        elif kind == "we_close":
            if ours.state is not TlsState.ASYNC_PAUSED:
                ours.close()
            flush_ours()
            log.append(_peer_recv(peer))
        elif kind == "garbage":
            deliver(step[1])
            flush_ours()
        elif kind == "peer_alerts":  # the peer chokes on a forged record and answers with an alert
            peer.bio_write(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
            log.append(_peer_recv(peer))
            deliver(pending(peer))
            flush_ours()
        elif kind == "renegotiate":  # TLS 1.2 only: the peer asks, OP_NO_RENEGOTIATION refuses
            try:
                peer.renegotiate()
                peer.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error as error:
                log.append(("peer-renegotiate-error", str(error)))
            deliver(pending(peer))
            flush_ours()
            log.append(_peer_recv(peer))
        log.append(("state", ours.state))
    return log


def both_pumps(server_side: bool, version: int, steps: list[tuple], splits: list[int]) -> tuple[list, list]:
    with deterministic_openssl() as restart:
        restart()
        with pump_kind(pumps.pure_pump):
            pure = run_scenario(server_side, version, steps, splits)
        restart()
        with pump_kind(compiled_pump):
            compiled_run = run_scenario(server_side, version, steps, splits)
    return pure, compiled_run


# -- the tests ---------------------------------------------------------------------------------------

def test_the_extension_is_loaded_when_this_checkout_built_it() -> None:
    """`make test` must exercise the compiled path when install built it: no silent fallback."""
    if compiled.pure_forced():
        assert not pumps.COMPILED and "disabled by INGRESS_PROXY_PURE=1" in compiled.hot_path_line()
    elif BUILT:
        assert pumps.COMPILED, compiled.hot_path_line()
        import proxy.http1  # noqa: F401  (registers its twin too)

        assert compiled.compiled_modules() == ["proxy._http1_heads", "proxy.tls._pump"]
        assert compiled.hot_path_line() == "hot path: compiled (proxy._http1_heads, proxy.tls._pump)"
    else:
        pytest.skip("the compiled pump was not built in this checkout (make install says why)")


@pytest.mark.skipif(not BUILT, reason="the compiled pump was not built in this checkout")
def test_the_extension_links_the_libssl_pyopenssl_uses() -> None:
    """Pointers from pyOpenSSL are only valid in the same libssl/libcrypto instance."""
    from cryptography.hazmat.bindings import _openssl

    def linked(shared_object: str) -> dict[str, str]:
        lines = subprocess.run(["ldd", shared_object], check=True, capture_output=True, text=True).stdout.splitlines()
        found = {}
        for line in lines:
            name, _, rest = line.strip().partition(" => ")
            if name.startswith(("libssl.so", "libcrypto.so")):
                found[name] = os.path.realpath(rest.split(" (")[0])
        return found

    ours, pyopenssl = linked(BUILT[0]), linked(_openssl.__file__)
    assert set(ours) == {"libssl.so.3", "libcrypto.so.3"}
    assert ours == pyopenssl
    maps = Path("/proc/self/maps").read_text().splitlines()
    mapped = {os.path.realpath(line.split()[-1]) for line in maps if "/libssl.so" in line or "/libcrypto.so" in line}
    assert mapped == set(ours.values())  # one instance of each in this process


@needs_compiled
@pytest.mark.parametrize("server_side", [True, False], ids=["server", "client"])
@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION], ids=["tls12", "tls13"])
def test_the_rng_makes_runs_reproducible(server_side: bool, version: int) -> None:
    """The premise of every comparison here: the same pump twice gives the same bytes."""
    steps = [("peer_sends", [b"ping"]), ("we_send", [b"pong"])]
    with deterministic_openssl() as restart:
        restart()
        first = run_scenario(server_side, version, steps, [])
        restart()
        second = run_scenario(server_side, version, steps, [])
    assert first == second
    assert ("ok", b"ping") in first


ONE_OF_EACH = [
    ("peer_sends", [b"GET / HTTP/1.1\r\n\r\n", b"x" * 40_000]),
    ("we_send", [b"y" * 100_000]),
    ("peer_sends", [b""]),
    ("we_send", [b""]),
    ("peer_closes",),
    ("we_send", [b"after close"]),
]


BOTH_VERSIONS = [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION]
CASES = {
    "data-big-writes-close-notify": (BOTH_VERSIONS, ONE_OF_EACH),
    "alert": (BOTH_VERSIONS, [("peer_sends", [b"a"]), ("peer_alerts",), ("we_send", [b"b"]), ("we_close",)]),
    "garbage": (BOTH_VERSIONS, [("garbage", b"\x16\x03\x03\x00\x05hello"), ("we_send", [b"b"])]),
    "we-close": (BOTH_VERSIONS, [("peer_sends", [b"a", b"b", b"c"]), ("we_close",), ("peer_sends", [b"late"])]),
    # TLS 1.3 has no renegotiation
    "renegotiation-refused": ([SSL.TLS1_2_VERSION], [("renegotiate",), ("peer_sends", [b"still there?"]), ("we_send", [b"yes"])]),
}


@needs_compiled
@pytest.mark.parametrize("server_side", [True, False], ids=["server", "client"])
@pytest.mark.parametrize(
    "version, steps",
    [pytest.param(version, steps, id=f"{name}-{'tls12' if version == SSL.TLS1_2_VERSION else 'tls13'}") for name, (versions, steps) in CASES.items() for version in versions],
)
def test_compiled_matches_pure(server_side: bool, version: int, steps: list[tuple]) -> None:
    pure, compiled_run = both_pumps(server_side, version, steps, [])
    assert compiled_run == pure


@needs_compiled
@pytest.mark.parametrize("server_side", [True, False], ids=["server", "client"])
def test_records_split_at_every_offset(server_side: bool) -> None:
    """Three records from the peer (the last one a close_notify), cut at each byte in turn."""
    steps = [("peer_sends", [b"first", b"second" * 50]), ("peer_closes",)]
    with deterministic_openssl() as restart:
        restart()
        whole = run_scenario(server_side, SSL.TLS1_3_VERSION, steps, [])
    incoming = [entry[1] for entry in whole if entry[0] == "wire-in"]
    data_length = len(incoming[-1])  # the application-data flight
    for cut in range(1, data_length, 7 if data_length > 400 else 1):
        pure, compiled_run = both_pumps(server_side, SSL.TLS1_3_VERSION, steps, [cut])
        assert compiled_run == pure, f"cut at {cut}"
    # and every offset of a short record, one byte at a time
    pure, compiled_run = both_pumps(server_side, SSL.TLS1_3_VERSION, [("peer_sends", [b"hi"])], list(range(1, 40)))
    assert compiled_run == pure
    assert ("ok", b"hi") in pure


_MESSAGE = st.binary(max_size=2_000) | st.builds(lambda n, byte: byte * n, st.integers(0, 70_000), st.sampled_from([b"a", b"\x00"]))
_STEP = st.one_of(
    st.tuples(st.just("peer_sends"), st.lists(_MESSAGE, min_size=1, max_size=4)),
    st.tuples(st.just("we_send"), st.lists(_MESSAGE, min_size=1, max_size=3)),
    st.tuples(st.just("peer_closes")),
    st.tuples(st.just("we_close")),
    st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=300)),
    st.tuples(st.just("peer_alerts")),
)


@needs_compiled
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    server_side=st.booleans(),
    version=st.sampled_from([SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION]),
    steps=st.lists(_STEP, max_size=6),
    splits=st.lists(st.integers(1, 20_000), max_size=5),
)
def test_compiled_matches_pure_on_any_exchange(server_side: bool, version: int, steps: list[tuple], splits: list[int]) -> None:
    pure, compiled_run = both_pumps(server_side, version, steps, splits)
    assert compiled_run == pure


@needs_compiled
def test_pumps_refuse_the_same_argument_types() -> None:
    """Both take bytes only (cffi refuses bytearray/memoryview for `void *`; Cython's `bytes` too)."""
    server_context, _ = _contexts(SSL.TLS1_3_VERSION)
    for factory in (pumps.pure_pump, compiled_pump):
        pump = factory(SSL.Connection(server_context, None))
        for wrong in (bytearray(b"x"), memoryview(b"x")):
            with pytest.raises(TypeError):
                pump.read(wrong)  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                pump.write(wrong)  # type: ignore[arg-type]
