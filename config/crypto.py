"""Process-wide crypto set-up: OpenSSL providers, an ENGINE, and private keys kept inside it.

Theory of operation. Everything here runs in the control plane, once per distinct
`CryptoSettings`, before any TLS context is built:

1. `check_engine_support` proves that pyOpenSSL is linked to a shared libcrypto with the ENGINE
   API and that `ctypes.CDLL("libcrypto.so.3")` is that same library instance (an error pushed
   through ctypes must show up in pyOpenSSL's error queue). PyPI's pyOpenSSL/cryptography wheels
   carry a static OpenSSL without ENGINE support: nothing an engine does could reach them.
2. Providers (`apply_providers`) are activated once per process, in order, `default` first (added
   when missing: activating any provider explicitly ends OpenSSL's implicit `default`, and
   pkcs11-provider activated before it deadlocks SoftHSM2). OpenSSL 3.0 has no
   OSSL_PROVIDER_load_ex, so a provider's module and parameters reach it as an openssl.cnf
   section built in memory (`provider_config_text`, values quoted) and loaded with
   CONF_modules_load; pkcs11-provider always gets the `no-deinit` quirk (its de-init at exit can
   crash the process). A provider stays active for the process, as first configured: OpenSSL
   cannot re-initialise one with new parameters, so a reload that changes them is refused with
   "restart to apply". `propquery` is the default property query (EVP_set_default_properties).
   The default UI method is set to UI_null: a provider that wants a PIN must never prompt.
3. The engine is loaded by id, or through the `dynamic` engine from `so_path`; the ctrl commands
   run in the order given, then `ENGINE_init` and `ENGINE_set_default(e, flags)` with the flags
   named by `algorithms` (HAProxy's `ssl-engine <id> algo RSA,EC`). The defaults must be set
   BEFORE keys are loaded: OpenSSL 3 binds a legacy key to the default engine when the key is
   created, and a key loaded earlier stays in software.
4. `use_private_key` installs each certificate's key into a context: PEM keys the usual way,
   `engine:<URI>` keys with `ENGINE_load_private_key`, and `StoreKey`s (`pkcs11:` URIs, or a
   provider's own scheme) with OSSL_STORE_open_ex + OSSL_STORE_load (`load_store_key`), the PIN
   handed to the provider's passphrase callback, so key material never enters Python. Each key is
   loaded once per runtime and shared by the contexts built from it; keys are loaded in the
   process that serves (after fork: a token key loaded before fork cannot sign in the child).
   pkcs11-provider puts nothing on the error queue when a key is not found, whatever the reason;
   the same URI with type=public, asked without a PIN, tells "PIN refused" from "no such key".
   For engine keys a UI method that answers nothing is passed, so a missing PIN fails instead of
   prompting on a tty, and a `pin-value` in the URI goes to the engine's PIN command when it has one (libp11 does) and is
   removed from the URI, because libp11 prints the URI to stderr when the key is not found.
5. `close` unregisters the engine's default methods. The engine stays loaded for the process and
   a later runtime with the same engine settings reuses it (see `_process_engine` for why).

Failure policy: an engine or provider that does not load with `required: false` logs one warning
(its name and the reason) and the runtime serves without it (software crypto; certificates whose
keys it held are left out, each with its own problem); with `required: true` start-up fails with
the same message. PINs (`pin-value=` in URIs, ctrl values) never appear in messages or logs.

pyOpenSSL 23's cffi `lib` lacks `ENGINE_set_default`, `ENGINE_unregister_*`, `UI_null` and
`OPENSSL_info`: those go through ctypes, which is safe because of step 1.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import functools
import logging
import os
import re
import urllib.parse
from typing import Any

from OpenSSL import SSL, crypto
from OpenSSL import _util as pyopenssl_binding

from config.model import (
    Configuration,
    CryptoSettings,
    EngineKey,
    EngineSettings,
    KeySource,
    PemKey,
    Problem,
    ProviderSettings,
    StoreKey,
)

log = logging.getLogger(__name__)

ENGINE_KEY_PREFIX = "engine:"

# ENGINE_METHOD_* from <openssl/engine.h>, under HAProxy's `ssl-engine ... algo` names.
ALGORITHM_FLAGS: dict[str, int] = {
    "RSA": 0x0001,
    "DSA": 0x0002,
    "DH": 0x0004,
    "RAND": 0x0008,
    "CIPHERS": 0x0040,
    "DIGESTS": 0x0080,
    "PKEY": 0x0200 | 0x0400,
    "PKEY_CRYPTO": 0x0200,
    "PKEY_ASN1": 0x0400,
    "EC": 0x0800,
    "ALL": 0xFFFF,
}
# ENGINE_unregister_<suffix> for each flag, so `close` gives the methods back to software.
_UNREGISTER_BY_FLAG: dict[int, str] = {
    0x0001: "RSA",
    0x0002: "DSA",
    0x0004: "DH",
    0x0008: "RAND",
    0x0040: "ciphers",
    0x0080: "digests",
    0x0200: "pkey_meths",
    0x0400: "pkey_asn1_meths",
    0x0800: "EC",
}
# The ENGINE API symbols whose absence means "this pyOpenSSL cannot use engines".
REQUIRED_ENGINE_SYMBOLS = (
    "ENGINE_by_id",
    "ENGINE_ctrl_cmd_string",
    "ENGINE_init",
    "ENGINE_finish",
    "ENGINE_free",
    "ENGINE_load_private_key",
    "SSL_CTX_use_PrivateKey",
)
_ENGINE_CTRL_GET_CMD_FROM_NAME = 13
_OPENSSL_INFO_ENGINES_DIR = 1002
_OPENSSL_INFO_MODULES_DIR = 1003
_ERR_LIB_USER = 128
_PIN_VALUE = re.compile(r"(pin-value=)[^;?&]*", re.IGNORECASE)


class CryptoSetupError(Exception):
    """One line: what failed, why, and how to fix it. Never carries a PIN."""


def redact(text: str) -> str:
    """`text` with every `pin-value=...` replaced, safe for logs, metrics and errors."""
    return _PIN_VALUE.sub(r"\1***", text)


@functools.cache
def _system_libcrypto() -> ctypes.CDLL:
    """The system libcrypto.so.3 through ctypes, for what pyOpenSSL 23's cffi `lib` lacks. Loaded on
    first use, so that importing this module works everywhere (the routes-file parser imports it)."""
    try:
        libcrypto = ctypes.CDLL("libcrypto.so.3")
    except OSError as error:
        raise CryptoSetupError(f"cannot load the system libcrypto.so.3 ({error}); fix: apt-get install libssl3") from None
    pointer, text, integer, uint = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint
    signatures: dict[str, tuple[list[Any], Any]] = {
        "ENGINE_set_default": ([pointer, uint], integer),
        "ENGINE_ctrl": ([pointer, integer, ctypes.c_long, text, pointer], integer),
        "UI_null": ([], pointer),
        "UI_set_default_method": ([pointer], None),
        "OPENSSL_info": ([integer], text),
        "OSSL_PROVIDER_available": ([pointer, text], integer),
        "OSSL_PROVIDER_set_default_search_path": ([pointer, text], integer),
        "OSSL_PROVIDER_get0_name": ([pointer], text),
        "EVP_PKEY_get0_provider": ([pointer], pointer),
        "EVP_set_default_properties": ([pointer, text], integer),
        "BIO_new_mem_buf": ([text, integer], pointer),
        "BIO_free": ([pointer], integer),
        "NCONF_new": ([pointer], pointer),
        "NCONF_load_bio": ([pointer, pointer, ctypes.POINTER(ctypes.c_long)], integer),
        "NCONF_free": ([pointer], None),
        "CONF_modules_load": ([pointer, text, ctypes.c_ulong], integer),
        "UI_UTIL_wrap_read_pem_callback": ([pointer, integer], pointer),
        "UI_destroy_method": ([pointer], None),
        "OSSL_STORE_open_ex": ([text, pointer, text, pointer, pointer, pointer, pointer, pointer], pointer),
        "OSSL_STORE_expect": ([pointer, integer], integer),
        "OSSL_STORE_load": ([pointer], pointer),
        "OSSL_STORE_eof": ([pointer], integer),
        "OSSL_STORE_close": ([pointer], integer),
        "OSSL_STORE_INFO_get_type": ([pointer], integer),
        "OSSL_STORE_INFO_get1_PKEY": ([pointer], pointer),
        "OSSL_STORE_INFO_get1_PUBKEY": ([pointer], pointer),
        "OSSL_STORE_INFO_free": ([pointer], None),
        "ERR_new": ([], None),
        "ERR_set_error": ([integer, integer, text], None),
    }
    for suffix in _UNREGISTER_BY_FLAG.values():
        signatures[f"ENGINE_unregister_{suffix}"] = ([pointer], None)
    for name, (argtypes, restype) in signatures.items():
        try:
            function = getattr(libcrypto, name)
        except AttributeError:
            raise CryptoSetupError(
                f"the system libcrypto.so.3 has no {name} (built without ENGINE support?); fix: use "
                "Debian's libssl3"
            ) from None
        function.argtypes = argtypes
        function.restype = restype
    return libcrypto


def check_engine_support(binding_lib: Any = None) -> None:
    """Raise CryptoSetupError unless pyOpenSSL's OpenSSL can drive engines from this process.

    `binding_lib` defaults to pyOpenSSL's cffi `lib`; tests pass a stand-in. The real failing case
    is pyOpenSSL/cryptography installed from PyPI wheels (static OpenSSL, no ENGINE API).
    """
    lib = pyopenssl_binding.lib if binding_lib is None else binding_lib
    fix = (
        "fix: run with Debian's python3-openssl/python3-cryptography (a venv made with "
        "/usr/bin/python3 -m venv --system-site-packages, no pip pyOpenSSL/cryptography)"
    )
    if not getattr(lib, "Cryptography_HAS_ENGINE", 0):
        raise CryptoSetupError(f"pyOpenSSL's OpenSSL was built without ENGINE support; {fix}")
    missing = [name for name in REQUIRED_ENGINE_SYMBOLS if not hasattr(lib, name)]
    if missing:
        raise CryptoSetupError(f"pyOpenSSL's OpenSSL binding lacks {', '.join(missing)}; {fix}")
    lib.ERR_clear_error()
    libcrypto = _system_libcrypto()
    libcrypto.ERR_new()
    libcrypto.ERR_set_error(ctypes.c_int(_ERR_LIB_USER), ctypes.c_int(1), None)
    if not lib.ERR_get_error():
        raise CryptoSetupError(
            "pyOpenSSL uses a different OpenSSL than the system libcrypto.so.3 (statically "
            f"linked wheel?); {fix}"
        )


def openssl_errors() -> str:
    """Drain this thread's OpenSSL error queue into one short, de-duplicated, redacted line."""
    lib, ffi = pyopenssl_binding.lib, pyopenssl_binding.ffi
    reasons: list[str] = []
    unnamed: list[str] = []  # codes without a reason string: shown only when nothing better exists
    buffer = ffi.new("char[]", 256)
    while code := lib.ERR_get_error():
        reason_pointer = lib.ERR_reason_error_string(code)
        if reason_pointer != ffi.NULL:
            reason = ffi.string(reason_pointer).decode()
            if reason not in reasons:
                reasons.append(reason)
        else:
            lib.ERR_error_string_n(code, buffer, len(buffer))
            unnamed.append(ffi.string(buffer).decode())
    return redact("; ".join(reasons or unnamed)) or "no OpenSSL error reported"


def openssl_directory(kind: str) -> str:
    """Where this libcrypto looks for engines ("engines") or providers ("modules")."""
    which = _OPENSSL_INFO_ENGINES_DIR if kind == "engines" else _OPENSSL_INFO_MODULES_DIR
    value = _system_libcrypto().OPENSSL_info(which)
    return value.decode() if value else "?"


def algorithm_flags(algorithms: tuple[str, ...]) -> int:
    unknown = [name for name in algorithms if name.upper() not in ALGORITHM_FLAGS]
    if unknown:
        raise CryptoSetupError(
            f"tls.engine.algorithms: unknown {', '.join(unknown)}; "
            f"fix: use names from {', '.join(ALGORITHM_FLAGS)}"
        )
    flags = 0
    for name in algorithms:
        flags |= ALGORITHM_FLAGS[name.upper()]
    return flags


# ---- providers -------------------------------------------------------------------------------

DEFAULT_PROVIDER = "default"
PKCS11_PROVIDER = "pkcs11"
PKCS11_NO_DEINIT_QUIRK = "no-deinit"  # without it pkcs11-provider may crash the process at exit
_PKCS11_QUIRKS = "pkcs11-module-quirks"
_CONFIG_APPLICATION = "ingress_proxy_providers"
_SECRET_PARAMETER = re.compile(r"pin|pass|secret", re.IGNORECASE)  # values never shown

# Providers this process activated: name → the settings they were activated with. OpenSSL 3.0
# cannot take a provider's parameters back, so a provider stays as first activated.
_activated_providers: dict[str, ProviderSettings] = {}


def is_pkcs11_provider(provider: ProviderSettings) -> bool:
    module = os.path.basename(provider.module) if provider.module else ""
    return provider.name == PKCS11_PROVIDER or module == "pkcs11.so"


def with_required_parameters(provider: ProviderSettings) -> ProviderSettings:
    """`provider` plus the parameters we always need: pkcs11-provider gets the `no-deinit` quirk
    (its de-init at exit races the token library's own and may crash the process)."""
    if not is_pkcs11_provider(provider):
        return provider
    parameters = list(provider.parameters)
    for index, (name, value) in enumerate(parameters):
        if name == _PKCS11_QUIRKS:
            if PKCS11_NO_DEINIT_QUIRK not in value.split():
                parameters[index] = (name, f"{value} {PKCS11_NO_DEINIT_QUIRK}".strip())
            break
    else:
        parameters.append((_PKCS11_QUIRKS, PKCS11_NO_DEINIT_QUIRK))
    return dataclasses.replace(provider, parameters=tuple(parameters))


def activation_order(providers: tuple[ProviderSettings, ...]) -> tuple[ProviderSettings, ...]:
    """The order to activate `providers` in: `default` first (added when missing), the rest as given.

    Activating any provider explicitly stops OpenSSL from falling back to `default`, which TLS
    needs for everything but the private key; and pkcs11-provider activated before `default`
    deadlocks SoftHSM2 (it calls back into OpenSSL for digests during its own initialisation).
    """
    defaults = [provider for provider in providers if provider.name == DEFAULT_PROVIDER]
    rest = [with_required_parameters(provider) for provider in providers if provider.name != DEFAULT_PROVIDER]
    return (*(defaults or [ProviderSettings(DEFAULT_PROVIDER)])[:1], *rest)


def shown_parameters(provider: ProviderSettings) -> str:
    """`name=value, ...` for messages and doctor, values of PIN-like parameters replaced by ***."""
    return ", ".join(
        f"{name}={'***' if _SECRET_PARAMETER.search(name) else value}" for name, value in provider.parameters
    )


def _config_value(text: str) -> str:
    """`text` as a double-quoted openssl.cnf value: no `$var` expansion, no `#` comment inside."""
    if "\n" in text or "\r" in text:
        raise CryptoSetupError("a provider parameter holds a line break; fix: write it on one line")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def provider_config_text(providers: tuple[ProviderSettings, ...]) -> str:
    """An openssl.cnf that activates `providers` in order, each with its module and parameters.

    OpenSSL 3.0 has no OSSL_PROVIDER_load_ex: a provider's parameters reach it only through a
    configuration section, so that is what we load (from memory, never from a file)."""
    lines = [f"{_CONFIG_APPLICATION} = init", "[init]", "providers = providers", "[providers]"]
    lines += [f"{provider.name} = provider{index}" for index, provider in enumerate(providers)]
    for index, provider in enumerate(providers):
        lines.append(f"[provider{index}]")
        if provider.module is not None:
            lines.append(f"module = {_config_value(provider.module)}")
        lines += [f"{name} = {_config_value(value)}" for name, value in provider.parameters]
        lines.append("activate = 1")
    return "\n".join(lines) + "\n"


def apply_providers(settings: CryptoSettings) -> tuple[tuple[str, ...], dict[str, str]]:
    """Activate `settings.providers` (default first), one at a time, and set the property query.

    Returns (names active for these settings, name → why it did not load) for providers with
    `required: false`, which are left out with one warning each; a required one that does not load
    raises. Providers stay active for the process: contexts still serving use their keys. A
    provider already active with the same settings is kept; with other settings it is an error,
    because OpenSSL cannot re-initialise a provider with new parameters."""
    libcrypto = _system_libcrypto()
    # pkcs11-provider falls back to its own console prompt (UI_new → the default UI method) when
    # our passphrase callback has no PIN: a server has no one at its terminal, so prompt nobody.
    libcrypto.UI_set_default_method(libcrypto.UI_null())
    ordered = activation_order(settings.providers) if settings.providers else ()
    if settings.provider_path is not None:
        if not os.path.isdir(settings.provider_path):
            raise CryptoSetupError(
                f"tls.provider_path: {settings.provider_path} is not a directory; fix: name the directory "
                f"that holds the provider modules (Debian: {openssl_directory('modules')})"
            )
        libcrypto.OSSL_PROVIDER_set_default_search_path(None, settings.provider_path.encode())
    active: list[str] = []
    failed: dict[str, str] = {}
    for provider in ordered:
        try:
            _activate(provider)
        except CryptoSetupError as error:
            if provider.required or provider.name == DEFAULT_PROVIDER:
                raise
            log.warning("%s; serving without it (tls.providers[].required is false)", error)
            failed[provider.name] = str(error)
            continue
        active.append(provider.name)
    pyopenssl_binding.lib.ERR_clear_error()
    if not libcrypto.EVP_set_default_properties(None, (settings.propquery or "").encode()):
        raise CryptoSetupError(
            f"tls.propquery: {settings.propquery!r} is not a property query ({openssl_errors()}); "
            'fix: write it like "?provider=pkcs11" or "provider=default"'
        )
    return tuple(active), failed


def _activate(provider: ProviderSettings) -> None:
    _check_pkcs11_module(provider)
    active = _activated_providers.get(provider.name)
    if active is not None:
        if dataclasses.replace(active, required=provider.required) != provider:
            raise CryptoSetupError(
                f"tls.providers: provider {provider.name!r} is already active in this process with other "
                "module or parameters, and OpenSSL cannot re-initialise it; fix: restart ingress-proxy to apply them"
            )
        return
    _load_provider_config(provider_config_text((provider,)), provider)
    _activated_providers[provider.name] = provider


def _check_pkcs11_module(provider: ProviderSettings) -> None:
    """pkcs11-provider opens its PKCS#11 module only when a key is first loaded, and then a missing
    module looks like a missing key: name the file while the cause is still obvious."""
    module = dict(provider.parameters).get("pkcs11-module-path")
    if is_pkcs11_provider(provider) and module is not None and not os.path.isfile(module):
        raise CryptoSetupError(
            f"tls.providers: {provider.name} parameter pkcs11-module-path: no such file {module}; fix: name "
            "the token's PKCS#11 library (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)"
        )


def _load_provider_config(text: str, provider: ProviderSettings) -> None:
    libcrypto = _system_libcrypto()
    pyopenssl_binding.lib.ERR_clear_error()
    data = text.encode()
    bio = libcrypto.BIO_new_mem_buf(data, len(data))
    conf = libcrypto.NCONF_new(None)
    try:
        error_line = ctypes.c_long(0)
        if not libcrypto.NCONF_load_bio(conf, bio, ctypes.byref(error_line)):
            raise CryptoSetupError(f"tls.providers: internal configuration did not parse ({openssl_errors()})")
        loaded = libcrypto.CONF_modules_load(conf, _CONFIG_APPLICATION.encode(), 0) > 0
        reason = "" if loaded else openssl_errors()
    finally:
        libcrypto.NCONF_free(conf)
        libcrypto.BIO_free(bio)
    if not libcrypto.OSSL_PROVIDER_available(None, provider.name.encode()):
        where = provider.module or f"{provider.name}.so in the modules directory"
        raise CryptoSetupError(
            f"tls.providers: OpenSSL provider {provider.name!r} did not load from {where} "
            f"({reason or 'no OpenSSL error reported'}); fix: install it (Debian: apt-get install "
            f"{'pkcs11-provider' if is_pkcs11_provider(provider) else '<provider package>'}), put it in "
            f"{openssl_directory('modules')}, or set its module (tls.providers[].module / tls.provider_path)"
        )


def provider_of(pkey: Any) -> str | None:
    """The name of the provider holding `pkey` (a cffi EVP_PKEY*), or None for a legacy key."""
    libcrypto = _system_libcrypto()
    provider = libcrypto.EVP_PKEY_get0_provider(int(pyopenssl_binding.ffi.cast("uintptr_t", pkey)))
    if not provider:
        return None
    name = libcrypto.OSSL_PROVIDER_get0_name(provider)
    return name.decode() if name else None


# ---- keys through OSSL_STORE -------------------------------------------------------------------

_OSSL_STORE_INFO_PUBKEY = 3
_OSSL_STORE_INFO_PKEY = 4
_PEM_PASSWORD_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
PKCS11_URI_PEM_LABEL = b"PKCS#11 PROVIDER URI"


def _load_from_store(uri: str, pin: str | None, expected: int) -> int:
    """OSSL_STORE_open_ex(uri) → the first object of type `expected` (an EVP_PKEY* as int, 0 if none).

    The PIN reaches the provider through the passphrase callback and nowhere else; without a PIN
    the callback refuses, so a provider never prompts on a terminal."""
    libcrypto = _system_libcrypto()

    def answer(buffer: int, size: int, _rwflag: int, _data: int) -> int:
        if pin is None:
            return -1
        encoded = pin.encode()
        if len(encoded) > size:
            return -1
        ctypes.memmove(buffer, encoded, len(encoded))
        return len(encoded)

    callback = _PEM_PASSWORD_CALLBACK(answer)
    ui_method = libcrypto.UI_UTIL_wrap_read_pem_callback(callback, 0)
    try:
        store = libcrypto.OSSL_STORE_open_ex(uri.encode(), None, None, ui_method, None, None, None, None)
        if not store:
            return 0
        try:
            libcrypto.OSSL_STORE_expect(store, expected)
            while not libcrypto.OSSL_STORE_eof(store):
                info = libcrypto.OSSL_STORE_load(store)
                if not info:
                    continue
                try:
                    if libcrypto.OSSL_STORE_INFO_get_type(info) == expected:
                        getter = libcrypto.OSSL_STORE_INFO_get1_PKEY if expected == _OSSL_STORE_INFO_PKEY else libcrypto.OSSL_STORE_INFO_get1_PUBKEY
                        return int(getter(info) or 0)
                finally:
                    libcrypto.OSSL_STORE_INFO_free(info)
            return 0
        finally:
            libcrypto.OSSL_STORE_close(store)
    finally:
        libcrypto.UI_destroy_method(ui_method)


def public_key_uri(uri: str) -> str:
    """`uri` asking for the public half: type=private becomes type=public (added when absent)."""
    scheme, _, rest = uri.partition(":")
    path, question_mark, query = rest.partition("?")
    attributes = [attribute for attribute in path.split(";") if attribute and not attribute.lower().startswith("type=")]
    return f"{scheme}:{';'.join([*attributes, 'type=public'])}{question_mark}{query}"


def load_store_key(key: StoreKey) -> Any:
    """The private key `key` names, through OSSL_STORE: a cffi EVP_PKEY* the caller must free.

    pkcs11-provider reports nothing on OpenSSL's error queue when a key is not found — wrong
    token, wrong object or wrong PIN all look the same — so on failure the same URI is asked for
    its public half without a PIN: found means the object exists and the PIN was refused."""
    lib, ffi = pyopenssl_binding.lib, pyopenssl_binding.ffi
    shown = redact(key.uri)
    lib.ERR_clear_error()
    pkey = _load_from_store(key.uri, key.pin, _OSSL_STORE_INFO_PKEY)
    if pkey:
        lib.ERR_clear_error()
        return ffi.cast("EVP_PKEY *", pkey)
    reason = openssl_errors()
    public = _load_from_store(public_key_uri(key.uri), None, _OSSL_STORE_INFO_PUBKEY)
    lib.ERR_clear_error()
    if public:
        lib.EVP_PKEY_free(ffi.cast("EVP_PKEY *", public))
        if key.pin is None:
            raise CryptoSetupError(
                f"private key {shown}: the token holds this key but needs a PIN; fix: set pin_env or "
                "pin_file (Kubernetes: pkcs11-module-token-pin=file:... in ssl-provider-parameters)"
            )
        raise CryptoSetupError(
            f"private key {shown}: the token holds this key but refused the PIN; fix: give the token's "
            "user PIN (pin_env / pin_file)"
        )
    detail = "" if reason == "no OpenSSL error reported" else f" ({reason})"
    raise CryptoSetupError(
        f"private key {shown}: no provider found this key{detail}; fix: check the token label and object "
        "in the URI (pkcs11-tool --list-objects), the provider's pkcs11-module-path, and that the "
        "provider is in tls.providers"
    )


class _EngineLoadError(Exception):
    """Internal: why an engine did not load; becomes a warning or a CryptoSetupError."""


class CryptoRuntime:
    """The loaded providers, engine and its default-method registrations for one CryptoSettings.

    Engine keys are loaded once per runtime (by URI) and shared by every context built from it, so
    a reload that only changes routes does not go back to the token.

    Plain values for metrics (proxy/ exports them): `engine_status`, `fallback_reason`,
    `keys_installed` (by key-source label: "file" or "engine:<id>"), `engine_keys_loaded`.
    """

    def __init__(self, settings: CryptoSettings) -> None:
        self.settings = settings
        self.engine_status = "none"
        self.fallback_reason: str | None = None
        self.providers_loaded: tuple[str, ...] = ()
        self.provider_failures: dict[str, str] = {}  # required: false providers that did not load
        self.keys_installed: collections.Counter[str] = collections.Counter()
        self.engine_keys_loaded = 0
        self._engine_keys: dict[str, Any] = {}  # EngineKey.uri → EVP_PKEY* (ffi.gc-owned)
        self._store_keys: dict[StoreKey, tuple[Any, str]] = {}  # → (EVP_PKEY*, key-source label)
        self._engine: Any = None  # initialised cffi ENGINE*, owned by _loaded_engines
        self._default_flags = 0

    @classmethod
    def start(cls, settings: CryptoSettings) -> CryptoRuntime:
        runtime = cls(settings)
        if settings.engine is not None:
            algorithm_flags(settings.engine.algorithms)  # a typo is a config error, never a fallback
        if settings.engine is not None or settings.providers or settings.async_mode or settings.propquery:
            check_engine_support()  # async mode reaches libssl through ctypes too (proxy.tls.offload)
        if settings.providers or settings.propquery or settings.provider_path:
            runtime.providers_loaded, runtime.provider_failures = apply_providers(settings)
        if settings.engine is not None:
            runtime._start_engine(settings.engine)
        return runtime

    @property
    def engine_id(self) -> str | None:
        return self.settings.engine.id if self.settings.engine is not None else None

    def _start_engine(self, engine: EngineSettings) -> None:
        try:
            self._engine = _process_engine(engine)
            flags = algorithm_flags(engine.algorithms)
            if flags and not _system_libcrypto().ENGINE_set_default(self._engine_address(), flags):
                raise _EngineLoadError(f"ENGINE_set_default({'|'.join(engine.algorithms)}) failed: {openssl_errors()}")
            self._default_flags = flags
            self.engine_status = "loaded"
        except _EngineLoadError as error:
            self._release_engine()
            reason = redact(str(error))
            message = f"OpenSSL engine {engine.id!r} did not load: {reason}"
            if engine.required:
                raise CryptoSetupError(
                    f"{message}; fix: repair the engine, or set tls.engine.required: false to fall back to software crypto"
                ) from None
            log.warning("%s; serving with software crypto (tls.engine.required is false)", message)
            self.engine_status = f"failed: {reason}"
            self.fallback_reason = reason

    def _engine_address(self) -> int:
        return int(pyopenssl_binding.ffi.cast("uintptr_t", self._engine))

    def use_private_key(self, context: SSL.Context, key: KeySource) -> str:
        """Install `key` in `context`; returns the key-source label for metrics."""
        if isinstance(key, PemKey):
            context.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, key.pem))
            label = "file"
        elif isinstance(key, EngineKey):
            label = self._use_engine_key(context, key)
        elif isinstance(key, StoreKey):
            label = self._use_store_key(context, key)
        else:
            raise TypeError(f"unknown key source {type(key).__name__}")
        self.keys_installed[label] += 1
        return label

    def load_engine_key(self, key: EngineKey) -> Any:
        """ENGINE_load_private_key for `key`: a cffi EVP_PKEY* the caller must EVP_PKEY_free."""
        lib, ffi = pyopenssl_binding.lib, pyopenssl_binding.ffi
        uri = _engine_uri(key)
        shown = redact(key.uri)
        if self._engine is None and self.settings.engine is None:
            raise CryptoSetupError(
                f"private key {shown}: needs an OpenSSL engine, but no tls.engine is configured; fix: "
                "configure tls.engine, or use a PEM key"
            )
        if self._engine is None:
            raise CryptoSetupError(
                f"private key {shown}: needs engine {self.engine_id!r}, which did not load: {self.fallback_reason}"
            )
        lib.ERR_clear_error()
        uri_without_pin, pin = split_pin(uri)
        if pin is not None and self._engine_has_command("PIN"):
            # libp11 prints the URI it was given to stderr when a key is not found: hand it the
            # PIN through its PIN command, so that the URI it sees (and may print) has none.
            if not lib.ENGINE_ctrl_cmd_string(self._engine, b"PIN", pin.encode(), 0):
                raise CryptoSetupError(
                    f"private key {shown}: engine {self.engine_id!r} rejected the PIN command ({openssl_errors()})"
                )
            uri = uri_without_pin
        ui_method = ffi.cast("UI_METHOD *", _system_libcrypto().UI_null() or 0)
        pkey = lib.ENGINE_load_private_key(self._engine, uri.encode(), ui_method, ffi.NULL)
        if pkey == ffi.NULL:
            reason = redact(openssl_errors())
            raise CryptoSetupError(
                f"private key {shown}: engine {self.engine_id!r} could not load it ({reason}); fix: check "
                "the URI (token, object, id, type=private) and the PIN"
            )
        return pkey

    def _engine_has_command(self, name: str) -> bool:
        address = self._engine_address()
        return _system_libcrypto().ENGINE_ctrl(address, _ENGINE_CTRL_GET_CMD_FROM_NAME, 0, name.encode(), None) > 0

    def _use_engine_key(self, context: SSL.Context, key: EngineKey) -> str:
        lib, ffi = pyopenssl_binding.lib, pyopenssl_binding.ffi
        pkey = self._engine_keys.get(key.uri)
        if pkey is None:
            pkey = ffi.gc(self.load_engine_key(key), lib.EVP_PKEY_free)
            self._engine_keys[key.uri] = pkey
            self.engine_keys_loaded += 1
        if lib.SSL_CTX_use_PrivateKey(context._context, pkey) != 1:  # the context takes its own reference
            raise CryptoSetupError(
                f"private key {redact(key.uri)}: SSL_CTX_use_PrivateKey failed ({openssl_errors()}); "
                "fix: pair the certificate with the key it was issued for, of a type TLS supports (RSA, EC)"
            )
        return f"engine:{self.engine_id}"

    def load_store_key(self, key: StoreKey) -> tuple[Any, str]:
        """`key` loaded once per runtime: (EVP_PKEY*, owned by the runtime; "provider:<name>")."""
        lib, ffi = pyopenssl_binding.lib, pyopenssl_binding.ffi
        loaded = self._store_keys.get(key)
        if loaded is None:
            if not self.settings.providers:
                raise CryptoSetupError(
                    f"private key {redact(key.uri)}: a key URI needs a provider that opens it, but "
                    "tls.providers is empty; fix: add tls.providers: [{name: pkcs11, parameters: "
                    "{pkcs11-module-path: <your PKCS#11 module>}}]"
                )
            scheme = key.uri.partition(":")[0]
            if scheme in self.provider_failures:
                raise CryptoSetupError(
                    f"private key {redact(key.uri)}: needs provider {scheme!r}, which did not load "
                    f"({self.provider_failures[scheme]})"
                )
            pkey = ffi.gc(load_store_key(key), lib.EVP_PKEY_free)
            loaded = (pkey, f"provider:{provider_of(pkey) or 'unknown'}")
            self._store_keys[key] = loaded
        return loaded

    def _use_store_key(self, context: SSL.Context, key: StoreKey) -> str:
        lib = pyopenssl_binding.lib
        pkey, label = self.load_store_key(key)
        lib.ERR_clear_error()
        if lib.SSL_CTX_use_PrivateKey(context._context, pkey) != 1:  # the context takes its own reference
            raise CryptoSetupError(
                f"private key {redact(key.uri)}: the token's key does not fit the certificate "
                f"({openssl_errors()}); fix: pair the certificate with the key it was issued for"
            )
        return label

    def close(self) -> None:
        """Give the default methods back to software (ENGINE_unregister_*) and stop using the engine.

        The engine itself stays loaded for the process (see `_process_engine`); keys already
        installed in contexts that still serve keep working (the contexts hold references).
        """
        self._engine_keys.clear()
        self._store_keys.clear()
        self._release_engine()

    def _release_engine(self) -> None:
        if self._engine is None:
            return
        address = self._engine_address()
        for flag, suffix in _UNREGISTER_BY_FLAG.items():
            if self._default_flags & flag:
                getattr(_system_libcrypto(), f"ENGINE_unregister_{suffix}")(address)
        self._engine = None
        self._default_flags = 0
        pyopenssl_binding.lib.ERR_clear_error()


def split_pin(uri: str) -> tuple[str, str | None]:
    """(uri without its pin-value attribute, the percent-decoded PIN or None), RFC 7512 style:
    pin-value may sit among the ;-separated path attributes or the &-separated query ones."""
    scheme, colon, rest = uri.partition(":")
    if not colon or "pin-value=" not in rest.lower():
        return uri, None
    path, question_mark, query = rest.partition("?")
    pin = None
    kept: list[str] = []
    for attributes, separator in ((path, ";"), (query, "&")):
        remaining = []
        for attribute in attributes.split(separator) if attributes else []:
            name, _, value = attribute.partition("=")
            if name.lower() == "pin-value":
                pin = urllib.parse.unquote(value)
            else:
                remaining.append(attribute)
        kept.append(separator.join(remaining))
    path, query = kept
    return f"{scheme}:{path}" + (f"?{query}" if query else ""), pin


def _engine_uri(key: EngineKey) -> str:
    """EngineKey.uri may be given with or without the `engine:` prefix of the routes file."""
    return key.uri[len(ENGINE_KEY_PREFIX) :] if key.uri.startswith(ENGINE_KEY_PREFIX) else key.uri


# Engines loaded in this process, by id: ((so_path, ctrl), initialised ENGINE*). Like HAProxy, an
# engine is loaded once and kept until exit: OpenSSL cannot bind the same engine library a second
# time while keys from the first binding are alive (libp11 fails with "init failed"), and contexts
# still serving old connections hold such keys. Reloads with the same engine settings reuse it.
_loaded_engines: dict[str, tuple[tuple[str | None, tuple[tuple[str, str], ...]], Any]] = {}


def _process_engine(engine: EngineSettings) -> Any:
    identity = (engine.so_path, engine.ctrl)
    if engine.id in _loaded_engines:
        loaded_identity, handle = _loaded_engines[engine.id]
        if loaded_identity != identity:
            raise _EngineLoadError(
                "it is already loaded in this process with another so_path/ctrl, and OpenSSL cannot "
                "load an engine twice; fix: restart ingress-proxy to apply the new engine settings"
            )
        return handle
    handle = _load_engine(engine)
    _loaded_engines[engine.id] = (identity, handle)
    return handle


def _load_engine(engine: EngineSettings) -> Any:
    """ENGINE_by_id (or dynamic + SO_PATH), ctrl commands in order, ENGINE_init. Returns ENGINE*."""
    lib, ffi = pyopenssl_binding.lib, pyopenssl_binding.ffi
    lib.ERR_clear_error()
    lib.ENGINE_load_builtin_engines()
    if engine.so_path is not None:
        if not os.path.isfile(engine.so_path):
            raise _EngineLoadError(f"so_path {engine.so_path} does not exist; fix: point tls.engine.so_path at the engine's .so")
        handle = lib.ENGINE_by_id(b"dynamic")
        if handle == ffi.NULL:
            raise _EngineLoadError(f"the 'dynamic' engine is unavailable: {openssl_errors()}")
        dynamic_commands = (("SO_PATH", engine.so_path), ("ID", engine.id), ("LOAD", ""))
        for name, value in dynamic_commands:
            if not lib.ENGINE_ctrl_cmd_string(handle, name.encode(), value.encode() if value else ffi.NULL, 0):
                reason = openssl_errors()
                lib.ENGINE_free(handle)
                raise _EngineLoadError(f"loading {engine.so_path} as id {engine.id!r} failed ({name}): {reason}")
    else:
        handle = lib.ENGINE_by_id(engine.id.encode())
        if handle == ffi.NULL:
            raise _EngineLoadError(
                f"no engine with this id ({openssl_errors()}); fix: install it in "
                f"{openssl_directory('engines')} or set tls.engine.so_path"
            )
    for name, value in engine.ctrl:
        if not lib.ENGINE_ctrl_cmd_string(handle, name.encode(), value.encode() if value else ffi.NULL, 0):
            reason = openssl_errors()
            lib.ENGINE_free(handle)
            raise _EngineLoadError(f"ctrl command {name} was rejected ({reason}); fix: check tls.engine.ctrl")
    if not lib.ENGINE_init(handle):
        reason = openssl_errors()
        lib.ENGINE_free(handle)
        raise _EngineLoadError(f"ENGINE_init failed: {reason}")
    return handle


def check_crypto(configuration: Configuration, where: str) -> list[Problem]:
    """What `ingress-proxy check` asks the crypto stack, as problems: do the providers and the
    engine start, and does every key held in a token or engine load and pair with its certificate.
    Only asked when the configuration uses them; `where` names the file for set-up problems."""
    certificates = [configuration.default_certificate, *configuration.certificates]
    keyed = [certificate for certificate in certificates if certificate is not None and not isinstance(certificate.key, PemKey)]
    crypto_settings = configuration.crypto
    if not keyed and not crypto_settings.providers and crypto_settings.engine is None:
        return []
    try:
        runtime = CryptoRuntime.start(crypto_settings)
    except CryptoSetupError as error:
        return [Problem(where, str(error))]
    problems = []
    try:
        for certificate in keyed:
            context = SSL.Context(SSL.TLS_SERVER_METHOD)
            try:
                context.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, certificate.chain_pem))
                runtime.use_private_key(context, certificate.key)
                context.check_privatekey()
            except CryptoSetupError as error:
                problems.append(Problem(certificate.origin, str(error)))
            except SSL.Error:
                problems.append(
                    Problem(
                        certificate.origin,
                        f"private key {redact(getattr(certificate.key, 'uri', ''))}: it does not match the "
                        "certificate's public key; fix: pair the certificate with the key it was issued for",
                    )
                )
    finally:
        runtime.close()
    return problems
