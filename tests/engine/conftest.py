"""Fixtures for engine-backed crypto: the C fixture engine (built with gcc), a hermetic SoftHSM2
token with RSA-2048 and EC P-256 keys generated on it (non-extractable), certificates for them
signed by a test CA, and helpers to build pyOpenSSL contexts through CryptoRuntime."""

from __future__ import annotations

import ctypes
import datetime
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import SSL, crypto

from config.crypto import CryptoRuntime
from config.model import CryptoSettings, EngineKey, EngineSettings, KeySource, PemKey, ProviderSettings, StoreKey
from proxy.tls.offload import enable_async_mode

REPO = Path(__file__).resolve().parents[2]
FIXTURE_ENGINE_SOURCE = Path(__file__).parent / "async_engine" / "async_engine.c"
FIXTURE_PROVIDER_SOURCE = Path(__file__).parent / "async_provider" / "async_provider.c"
OFFLOAD_POOL_HEADER = Path(__file__).parent / "offload_pool.h"  # the worker pool both fixtures include
FIXTURE_PROVIDER_NAME = "testoffload"  # sorts after "default": see async_provider.c
BUILD_DIR = REPO / "tests" / "fixtures" / "build"  # gitignored
PKCS11_ENGINE = "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so"
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PKCS11_PROVIDER_MODULE = "/usr/lib/x86_64-linux-gnu/ossl-modules/pkcs11.so"  # Debian pkcs11-provider
PKCS11_SPY_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11-spy.so"  # opensc: logs every PKCS#11 call (and the PIN)
TOKEN_LABEL = "proxy"
USER_PIN = "1234"
FIXTURE_ENGINE_ID = "asyncfixture"
COUNTER_NAMES = (
    "operations",
    "rsa_priv_enc",
    "rsa_priv_dec",
    "ec_sign",
    "offloaded",
    "pauses",
    "in_flight",
    "peak_in_flight",
    "synchronous",
)


def _build(library: Path, source: Path, *headers: Path) -> Path:
    """gcc `source` into `library` (again only when the source or a header it includes is newer)."""
    library.parent.mkdir(parents=True, exist_ok=True)
    newest_input = max(path.stat().st_mtime for path in (source, *headers))
    if not library.exists() or library.stat().st_mtime < newest_input:
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wno-deprecated-declarations",
             str(source), "-o", str(partial), "-lcrypto", "-lpthread"],
            check=True,
        )
        partial.replace(library)
    return library


def build_fixture_engine(build_dir: Path = BUILD_DIR) -> Path:
    return _build(build_dir / f"{FIXTURE_ENGINE_ID}.so", FIXTURE_ENGINE_SOURCE, OFFLOAD_POOL_HEADER)


def build_fixture_provider(build_dir: Path = BUILD_DIR) -> Path:
    return _build(build_dir / f"{FIXTURE_PROVIDER_NAME}.so", FIXTURE_PROVIDER_SOURCE, OFFLOAD_POOL_HEADER)


PROVIDER_COUNTER_NAMES = (
    "signatures",
    "rsa_sign",
    "ec_sign",
    "offloaded",
    "pauses",
    "in_flight",
    "peak_in_flight",
    "synchronous",
    "keys_loaded",
)


class FixtureProviderProbe:
    """Counters and gate of the fixture provider (tests/engine/async_provider), through ctypes on
    the same file OpenSSL loads as the provider module, so both see the same counters."""

    def __init__(self, library: Path) -> None:
        self.library_path = str(library)
        self._library = ctypes.CDLL(self.library_path)
        self._library.testoffload_counters.argtypes = [ctypes.POINTER(ctypes.c_longlong), ctypes.c_int]
        self._library.testoffload_set_gate.argtypes = [ctypes.c_int]

    def counters(self) -> dict[str, int]:
        values = (ctypes.c_longlong * len(PROVIDER_COUNTER_NAMES))()
        self._library.testoffload_counters(values, len(PROVIDER_COUNTER_NAMES))
        return dict(zip(PROVIDER_COUNTER_NAMES, values))

    def reset(self) -> None:
        self._library.testoffload_reset_counters()

    def set_gate(self, open_: bool) -> None:
        self._library.testoffload_set_gate(int(open_))

    def provider(self) -> ProviderSettings:
        return ProviderSettings(FIXTURE_PROVIDER_NAME, module=self.library_path)

    def settings(self, async_mode: bool = True) -> CryptoSettings:
        return CryptoSettings(providers=(self.provider(),), async_mode=async_mode)

    @staticmethod
    def key(key_file: Path) -> StoreKey:
        return StoreKey(f"{FIXTURE_PROVIDER_NAME}:{key_file}")


class FixtureEngineProbe:
    """Reads the fixture engine's counters and drives its gate, through its exported C functions.

    ctypes opens the same file the dynamic engine dlopens, so it sees the same counters.
    """

    def __init__(self, library: Path) -> None:
        self.library_path = str(library)
        self._library = ctypes.CDLL(self.library_path)
        self._library.asyncfixture_counters.argtypes = [ctypes.POINTER(ctypes.c_longlong), ctypes.c_int]
        self._library.asyncfixture_set_gate.argtypes = [ctypes.c_int]

    def counters(self) -> dict[str, int]:
        values = (ctypes.c_longlong * len(COUNTER_NAMES))()
        self._library.asyncfixture_counters(values, len(COUNTER_NAMES))
        return dict(zip(COUNTER_NAMES, values))

    def reset(self) -> None:
        self._library.asyncfixture_reset_counters()

    def set_gate(self, open_: bool) -> None:
        self._library.asyncfixture_set_gate(int(open_))

    def settings(self, algorithms: tuple[str, ...] = ("RSA", "EC"), async_mode: bool = True) -> CryptoSettings:
        return CryptoSettings(
            engine=EngineSettings(id=FIXTURE_ENGINE_ID, so_path=self.library_path, algorithms=algorithms, required=True),
            async_mode=async_mode,
        )


@pytest.fixture(scope="session")
def fixture_engine() -> Iterator[FixtureEngineProbe]:
    probe = FixtureEngineProbe(build_fixture_engine())
    yield probe
    probe.set_gate(True)


@pytest.fixture
def engine_probe(fixture_engine: FixtureEngineProbe) -> Iterator[FixtureEngineProbe]:
    fixture_engine.reset()
    fixture_engine.set_gate(True)
    yield fixture_engine
    fixture_engine.set_gate(True)


@pytest.fixture(scope="session")
def fixture_provider() -> Iterator[FixtureProviderProbe]:
    probe = FixtureProviderProbe(build_fixture_provider())
    yield probe
    probe.set_gate(True)


@pytest.fixture
def provider_probe(fixture_provider: FixtureProviderProbe) -> Iterator[FixtureProviderProbe]:
    fixture_provider.reset()
    fixture_provider.set_gate(True)
    yield fixture_provider
    fixture_provider.set_gate(True)


@pytest.fixture(scope="session")
def provider_identities(
    software_rsa: ServerIdentity, software_ec: ServerIdentity, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, ServerIdentity]:
    """The software identities with their keys held by the fixture provider (via its store)."""
    directory = tmp_path_factory.mktemp("provider-keys")
    identities = {}
    for identity in (software_rsa, software_ec):
        assert isinstance(identity.key, PemKey)
        key_file = directory / f"{identity.label}.pem"
        key_file.write_bytes(identity.key.pem)
        identities[identity.label] = ServerIdentity(identity.chain_pem, FixtureProviderProbe.key(key_file), identity.label)
    return identities


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """Overrides tests/conftest.py's ECDSA CA, so RSA test servers present all-RSA chains."""
    return trustme.CA(key_type=trustme.KeyType.RSA)


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@dataclass(frozen=True)
class ServerIdentity:
    chain_pem: bytes
    key: KeySource
    label: str  # "rsa" or "ec"


@pytest.fixture(scope="session")
def software_rsa(ca: trustme.CA) -> ServerIdentity:
    leaf = ca.issue_cert("localhost", key_type=trustme.KeyType.RSA)
    return ServerIdentity(b"".join(blob.bytes() for blob in leaf.cert_chain_pems), PemKey(leaf.private_key_pem.bytes()), "rsa")


@pytest.fixture(scope="session")
def software_ec(ca: trustme.CA) -> ServerIdentity:
    leaf = ca.issue_cert("localhost", key_type=trustme.KeyType.ECDSA)
    return ServerIdentity(b"".join(blob.bytes() for blob in leaf.cert_chain_pems), PemKey(leaf.private_key_pem.bytes()), "ec")


@dataclass(frozen=True)
class SoftHsmToken:
    directory: Path
    env: dict[str, str]  # environment for pkcs11-tool / openssl CLI
    rsa: ServerIdentity
    ec: ServerIdentity

    def settings(self, required: bool = True, async_mode: bool = False) -> CryptoSettings:
        return CryptoSettings(
            engine=EngineSettings(
                id="pkcs11",
                so_path=PKCS11_ENGINE,
                ctrl=(("MODULE_PATH", SOFTHSM_MODULE),),
                algorithms=("RSA", "EC"),
                required=required,
            ),
            async_mode=async_mode,
        )

    @property
    def pin_file(self) -> Path:
        return self.directory / "user.pin"

    @property
    def provider_module(self) -> Path:
        """A copy of libsofthsm2.so for pkcs11-provider in this process. The pkcs11 engine tests
        share the process; with one module instance under both, pkcs11-provider closing its
        sessions (C_CloseAllSessions) logs the engine's sessions out too, and the engine's next
        signature fails. A second file is a second instance, as two processes would have; both
        open the same token directory. (Deployments use one or the other, never both.)"""
        return self.directory / "libsofthsm2-for-provider.so"

    def provider(self) -> ProviderSettings:
        """pkcs11-provider on this token, the PIN from a file as a Kubernetes pod would mount it.
        In-process tests all use these settings: a provider's parameters are fixed for the life
        of a process (config.crypto.apply_providers)."""
        parameters = (("pkcs11-module-path", str(self.provider_module)), ("pkcs11-module-token-pin", f"file:{self.pin_file}"))
        return ProviderSettings("pkcs11", parameters=parameters)

    def provider_settings(self, async_mode: bool = False) -> CryptoSettings:
        return CryptoSettings(providers=(self.provider(),), async_mode=async_mode)

    def store_identity(self, identity: ServerIdentity, pin: str | None = USER_PIN) -> ServerIdentity:
        """`identity` with its key reached through pkcs11-provider by URI instead of the engine."""
        object_label = "rsakey" if identity.label == "rsa" else "eckey"
        return ServerIdentity(identity.chain_pem, StoreKey(store_uri(object_label), pin), identity.label)

    def pkcs11_tool(self, *arguments: str) -> str:
        return _run(["pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label", TOKEN_LABEL, *arguments], self.env)


def _run(command: list[str], env: dict[str, str]) -> str:
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    if completed.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {completed.stderr.strip()}")
    return completed.stdout + completed.stderr


def store_uri(object_label: str) -> str:
    return f"pkcs11:token={TOKEN_LABEL};object={object_label};type=private"


def key_uri(object_label: str) -> str:
    return f"pkcs11:token={TOKEN_LABEL};object={object_label};type=private;pin-value={USER_PIN}"


def _certificate_for_token_key(ca: trustme.CA, env: dict[str, str], directory: Path, object_label: str) -> bytes:
    """CSR signed on the token by `openssl req -engine pkcs11`, then issued by the test CA."""
    csr_path = directory / f"{object_label}.csr"
    _run(
        ["openssl", "req", "-new", "-engine", "pkcs11", "-keyform", "engine", "-key", key_uri(object_label),
         "-subj", "/CN=localhost", "-out", str(csr_path)],
        env,
    )
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.DNSName(f"{object_label}.test")]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def create_softhsm_token(ca: trustme.CA, directory: Path) -> SoftHsmToken:
    """A fresh token in `directory` (its own SOFTHSM2_CONF) with non-extractable RSA-2048 and EC
    P-256 keys generated on it, and certificates for them issued by `ca`."""
    (directory / "tokens").mkdir()
    config = directory / "softhsm2.conf"
    config.write_text(f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    openssl_config = directory / "openssl.cnf"  # for the openssl CLI only
    openssl_config.write_text(
        "openssl_conf = init\n[init]\nengines = engines\n[engines]\npkcs11 = pkcs11\n"
        f"[pkcs11]\ndynamic_path = {PKCS11_ENGINE}\nMODULE_PATH = {SOFTHSM_MODULE}\n"
    )
    env = {**os.environ, "SOFTHSM2_CONF": str(config), "OPENSSL_CONF": str(openssl_config)}
    (directory / "user.pin").write_text(USER_PIN + "\n")
    shutil.copyfile(SOFTHSM_MODULE, directory / "libsofthsm2-for-provider.so")
    _run(["softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL, "--pin", USER_PIN, "--so-pin", "4321"], env)
    token = ["pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label", TOKEN_LABEL, "--login", "--pin", USER_PIN]
    for key_type, key_id, label in (("rsa:2048", "01", "rsakey"), ("EC:prime256v1", "02", "eckey")):
        _run([*token, "--keypairgen", "--key-type", key_type, "--id", key_id, "--label", label,
              "--sensitive", "--usage-sign", *(["--usage-decrypt"] if key_type.startswith("rsa") else [])], env)
    return SoftHsmToken(
        directory,
        env,
        ServerIdentity(_certificate_for_token_key(ca, env, directory, "rsakey"), EngineKey(key_uri("rsakey")), "rsa"),
        ServerIdentity(_certificate_for_token_key(ca, env, directory, "eckey"), EngineKey(key_uri("eckey")), "ec"),
    )


@pytest.fixture(scope="session")
def softhsm_token(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsmToken]:
    token = create_softhsm_token(ca, tmp_path_factory.mktemp("softhsm"))
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = token.env["SOFTHSM2_CONF"]  # the in-process pkcs11 engine reads it at C_Initialize
    yield token
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


def server_context(
    runtime: CryptoRuntime, identity: ServerIdentity, max_version: int = SSL.TLS1_3_VERSION
) -> tuple[SSL.Context, str]:
    """A server context with identity's chain and key installed through `runtime`; returns (ctx, key label)."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_max_proto_version(max_version)
    leaf, *intermediates = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", identity.chain_pem, re.S)
    context.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, leaf))
    for intermediate in intermediates:
        context.add_extra_chain_cert(crypto.load_certificate(crypto.FILETYPE_PEM, intermediate))
    label = runtime.use_private_key(context, identity.key)
    context.check_privatekey()
    if runtime.settings.async_mode:
        enable_async_mode(context)
    return context, label


def client_context(ca: trustme.CA, max_version: int = SSL.TLS1_3_VERSION) -> SSL.Context:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_max_proto_version(max_version)
    context.set_verify(SSL.VERIFY_PEER)
    context.get_cert_store().add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, ca.cert_pem.bytes()))
    return context
