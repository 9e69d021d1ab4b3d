"""`ingress-proxy doctor`: is crypto offload set up, and is it actually used?

Each check yields one line; `ok` is False when anything the configuration asks for is broken
(an engine or provider that does not load, an engine or token key that cannot sign, async mode
without async support). Facts that are merely informative (no QAT device) never make `ok` False.
Key URIs are shown redacted: a PIN never reaches the output.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import time
from pathlib import Path

import cryptography
import OpenSSL
from OpenSSL import _util as pyopenssl_binding
from OpenSSL import crypto

from config.crypto import (
    CryptoRuntime,
    CryptoSetupError,
    activation_order,
    check_engine_support,
    openssl_directory,
    openssl_errors,
    redact,
    shown_parameters,
)
from config.model import CryptoSettings, EngineKey, KeySource, PemKey, StoreKey
from proxy.compiled import hot_path_line
from proxy.tls.offload import async_jobs_supported

_TEST_MESSAGE = b"ingress-proxy doctor test signature"
_QAT_DEBUGFS_GLOB = "/sys/kernel/debug/qat_*"
_QAT_PROVIDER_MODULE = "qatprovider.so"  # Intel's QAT provider, as its installer names it


def run_doctor(settings: CryptoSettings | None, keys: list[KeySource]) -> tuple[list[str], bool]:
    settings = settings or CryptoSettings()
    lines = [_library_line(), hot_path_line()]
    ok = True

    engine_api_needed = settings.engine is not None or bool(settings.providers) or settings.async_mode or bool(settings.propquery)
    try:
        check_engine_support()
        lines.append("ENGINE API: available, and ctypes reaches the same libcrypto instance as pyOpenSSL")
    except CryptoSetupError as error:
        lines.append(f"ENGINE API: MISSING: {error}")
        if engine_api_needed:
            return lines, False

    async_supported = async_jobs_supported()
    wanted = "enabled in settings" if settings.async_mode else "not enabled in settings"
    lines.append(f"async jobs (SSL_MODE_ASYNC): {'supported' if async_supported else 'NOT supported'}, {wanted}")
    ok &= async_supported or not settings.async_mode

    runtime, start_ok = _start_runtime(settings, lines)
    ok &= start_ok
    try:
        for key in keys:
            key_ok, line = _test_key(runtime, key)
            lines.append(line)
            ok &= key_ok
    finally:
        if runtime is not None:
            runtime.close()
    lines.extend(_qat_lines())
    return lines, ok


def _library_line() -> str:
    lib, ffi = pyopenssl_binding.lib, pyopenssl_binding.ffi
    version = ffi.string(lib.OpenSSL_version(0)).decode()
    mapped = sorted(
        {
            line.split(maxsplit=5)[5]
            for line in Path("/proc/self/maps").read_text().splitlines()
            if len(line.split(maxsplit=5)) == 6 and ("/libssl.so" in line or "/libcrypto.so" in line)
        }
    )
    where = ", ".join(mapped) if mapped else "no shared libssl/libcrypto mapped (statically linked wheel?)"
    return (
        f"pyOpenSSL {OpenSSL.__version__} / cryptography {cryptography.__version__} use {version}; "
        f"loaded: {where}"
    )


def _start_runtime(settings: CryptoSettings, lines: list[str]) -> tuple[CryptoRuntime | None, bool]:
    """Providers (one line each, in activation order), then the engine, through CryptoRuntime."""
    engine = settings.engine
    try:
        runtime = CryptoRuntime.start(settings)
    except CryptoSetupError as error:
        what = "providers" if "tls.provider" in str(error) or "tls.propquery" in str(error) else f"engine {engine.id if engine else '-'}"
        lines.append(f"{what}: FAILED: {error}")
        return None, False
    providers_ok = True
    for provider in activation_order(settings.providers) if settings.providers else ():
        if provider.name in runtime.provider_failures:
            lines.append(f"provider {provider.name}: FAILED (required: false, serving without it): {runtime.provider_failures[provider.name]}")
            providers_ok = False
            continue
        module = provider.module or f"{provider.name}.so in {settings.provider_path or openssl_directory('modules')}"
        parameters = shown_parameters(provider)
        lines.append(f"provider {provider.name}: active, from {module}" + (f", {parameters}" if parameters else ""))
    if settings.propquery:
        lines.append(f"property query: {settings.propquery}")
    if engine is None:
        lines.append("engine: none configured (software crypto)")
        return runtime, providers_ok
    source = f"from {engine.so_path}" if engine.so_path else "by id"
    if runtime.engine_status == "loaded":
        lines.append(
            f"engine {engine.id}: loaded {source}, default for {','.join(engine.algorithms) or 'nothing'}, "
            f"{len(engine.ctrl)} ctrl command(s) accepted"
        )
        return runtime, providers_ok
    lines.append(f"engine {engine.id}: FAILED ({runtime.engine_status}); serving would fall back to software")
    return runtime, False


def _test_key(runtime: CryptoRuntime | None, key: KeySource) -> tuple[bool, str]:
    if isinstance(key, PemKey):
        return True, "key (PEM): software key, nothing to test"
    shown = redact(key.uri)
    if runtime is None:
        return False, f"key {shown}: not tested, crypto set-up failed"
    lib = pyopenssl_binding.lib
    try:
        if isinstance(key, StoreKey):
            pkey, label = runtime.load_store_key(key)  # owned by the runtime
            via = f"via {label.replace(':', ' ', 1)}"
        else:
            pkey, via = runtime.load_engine_key(key), f"via engine {runtime.engine_id}"
    except CryptoSetupError as error:
        return False, f"key {shown}: FAILED: {error}"
    try:
        started = time.perf_counter()
        signed, detail = _sign_and_verify(pkey)
        elapsed_ms = (time.perf_counter() - started) * 1000
    finally:
        if isinstance(key, EngineKey):
            lib.EVP_PKEY_free(pkey)
    if not signed:
        return False, f"key {shown}: test signature FAILED {via}: {detail}"
    return True, f"key {shown}: test signature OK {via} ({detail}, {elapsed_ms:.1f} ms)"


def _sign_and_verify(pkey: object) -> tuple[bool, str]:
    """SHA-256 sign with the engine key, verify with its public half: (ok, description)."""
    lib, ffi = pyopenssl_binding.lib, pyopenssl_binding.ffi
    bits = lib.EVP_PKEY_bits(pkey)
    kind = {lib.EVP_PKEY_RSA: "RSA", lib.EVP_PKEY_EC: "EC"}.get(lib.EVP_PKEY_id(pkey), "key")
    description = f"{kind}-{bits}"
    lib.ERR_clear_error()
    context = lib.EVP_MD_CTX_new()
    try:
        if lib.EVP_DigestSignInit(context, ffi.NULL, lib.EVP_get_digestbyname(b"sha256"), ffi.NULL, pkey) != 1:
            return False, f"{description}: EVP_DigestSignInit: {openssl_errors()}"
        length = ffi.new("size_t *")
        if lib.EVP_DigestSign(context, ffi.NULL, length, _TEST_MESSAGE, len(_TEST_MESSAGE)) != 1:
            return False, f"{description}: EVP_DigestSign: {openssl_errors()}"
        signature = ffi.new("unsigned char[]", length[0])
        if lib.EVP_DigestSign(context, signature, length, _TEST_MESSAGE, len(_TEST_MESSAGE)) != 1:
            return False, f"{description}: EVP_DigestSign: {openssl_errors()}"
    finally:
        lib.EVP_MD_CTX_free(context)
    public = _software_public_half(pkey)
    context = lib.EVP_MD_CTX_new()
    try:
        verified = (
            lib.EVP_DigestVerifyInit(context, ffi.NULL, lib.EVP_get_digestbyname(b"sha256"), ffi.NULL, public._pkey) == 1
            and lib.EVP_DigestVerify(context, signature, length[0], _TEST_MESSAGE, len(_TEST_MESSAGE)) == 1
        )
    finally:
        lib.EVP_MD_CTX_free(context)
    if not verified:
        return False, f"{description}: signature did not verify: {openssl_errors()}"
    return True, description


def _software_public_half(pkey: object) -> crypto.PKey:
    """The public half of `pkey` copied into the default provider, so the token's signature is
    checked by software (a token may not verify with a private-key object, and should not be
    trusted to check itself)."""
    holder = crypto.PKey.__new__(crypto.PKey)  # pyOpenSSL has no constructor from an EVP_PKEY*
    holder._pkey = pkey
    holder._only_public = False
    holder._initialized = True
    return crypto.load_publickey(crypto.FILETYPE_ASN1, crypto.dump_publickey(crypto.FILETYPE_ASN1, holder))


def _qat_lines() -> list[str]:
    module = Path(openssl_directory("modules")) / _QAT_PROVIDER_MODULE
    lines = [
        f"QAT provider: {module} installed (use tls.providers: [{{name: qatprovider}}])"
        if module.is_file()
        else f"QAT provider: no {module} (Intel's qatprovider not installed)"
    ]
    devices = sorted(glob.glob(_QAT_DEBUGFS_GLOB))
    if not devices:
        return [*lines, f"QAT: no {_QAT_DEBUGFS_GLOB} (no QAT device, or debugfs not mounted)"]
    for device in devices:
        counters = Path(device) / "fw_counters"
        try:
            text = " ".join(counters.read_text().split())
        except OSError as error:
            text = f"unreadable ({error.strerror}); run as root with debugfs mounted"
        lines.append(f"QAT {os.path.basename(device)} fw_counters: {text}")
    return lines
