"""CryptoRuntime set-up and failure policy: providers, missing engines, missing ENGINE API, PINs."""

from __future__ import annotations

import logging
import types

import pytest
from OpenSSL import SSL
from OpenSSL import _util as pyopenssl_binding

from config.crypto import CryptoRuntime, CryptoSetupError, check_engine_support, redact, split_pin
from config.model import CryptoSettings, EngineKey, EngineSettings, ProviderSettings, StoreKey
from proxy.doctor import run_doctor
from tests.engine.conftest import FixtureEngineProbe, ServerIdentity, key_uri

MISSING_ENGINE = EngineSettings(id="no-such-engine-xyz")


def test_default_and_legacy_providers_load() -> None:
    runtime = CryptoRuntime.start(CryptoSettings(providers=(ProviderSettings("legacy"),)))
    assert runtime.providers_loaded == ("default", "legacy")  # default first, added for the user
    assert runtime.engine_status == "none"


def test_bogus_provider_fails_with_name_and_fix() -> None:
    with pytest.raises(CryptoSetupError) as failure:
        CryptoRuntime.start(CryptoSettings(providers=(ProviderSettings("bogus-provider"),)))
    message = str(failure.value)
    assert "'bogus-provider'" in message and "fix:" in message and "ossl-modules" in message
    assert "\n" not in message


def test_a_provider_module_that_does_not_exist_is_named() -> None:
    with pytest.raises(CryptoSetupError) as failure:
        CryptoRuntime.start(CryptoSettings(providers=(ProviderSettings("ghost", module="/nonexistent/ghost.so"),)))
    message = str(failure.value)
    assert "'ghost' did not load from /nonexistent/ghost.so" in message and "\n" not in message


def test_a_bad_property_query_is_a_one_line_error() -> None:
    with pytest.raises(CryptoSetupError, match=r"tls.propquery: '\?\?provider' is not a property query"):
        CryptoRuntime.start(CryptoSettings(propquery="??provider"))
    CryptoRuntime.start(CryptoSettings(propquery="?provider=default"))
    CryptoRuntime.start(CryptoSettings())  # and back to no property query


def test_missing_engine_not_required_warns_once_and_serves_software(
    caplog: pytest.LogCaptureFixture, software_rsa: ServerIdentity
) -> None:
    with caplog.at_level(logging.WARNING, logger="config.crypto"):
        runtime = CryptoRuntime.start(CryptoSettings(engine=MISSING_ENGINE))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "'no-such-engine-xyz'" in warnings[0] and "software crypto" in warnings[0]
    assert runtime.engine_status.startswith("failed: ")
    assert runtime.fallback_reason and runtime.fallback_reason in runtime.engine_status
    assert runtime.use_private_key(SSL.Context(SSL.TLS_SERVER_METHOD), software_rsa.key) == "file"


def test_missing_engine_required_fails_start_up_with_the_same_reason() -> None:
    with pytest.raises(CryptoSetupError) as failure:
        CryptoRuntime.start(CryptoSettings(engine=EngineSettings(id="no-such-engine-xyz", required=True)))
    message = str(failure.value)
    assert "'no-such-engine-xyz'" in message and "engines-3" in message and "required: false" in message
    assert "\n" not in message


def test_engine_key_without_an_engine_names_the_key_but_not_the_pin(caplog: pytest.LogCaptureFixture) -> None:
    runtime = CryptoRuntime.start(CryptoSettings(engine=MISSING_ENGINE))
    with pytest.raises(CryptoSetupError) as failure:
        runtime.use_private_key(SSL.Context(SSL.TLS_SERVER_METHOD), EngineKey(key_uri("rsakey")))
    message = str(failure.value)
    assert "object=rsakey" in message and "pin-value=***" in message and "no-such-engine-xyz" in message
    assert "1234" not in message + caplog.text


def test_missing_so_path_explains_itself() -> None:
    with pytest.raises(CryptoSetupError, match=r"so_path /nonexistent/engine.so does not exist"):
        CryptoRuntime.start(CryptoSettings(engine=EngineSettings(id="x", so_path="/nonexistent/engine.so", required=True)))


def test_rejected_ctrl_command_names_the_command_never_its_value() -> None:
    engine = EngineSettings(id="dynamic", ctrl=(("NO_SUCH_COMMAND", "secret-9876"),), required=True)
    with pytest.raises(CryptoSetupError) as failure:
        CryptoRuntime.start(CryptoSettings(engine=engine))
    message = str(failure.value)
    assert "ctrl command NO_SUCH_COMMAND was rejected" in message and "secret-9876" not in message


def test_unknown_algorithm_is_a_config_error_even_when_not_required() -> None:
    with pytest.raises(CryptoSetupError, match=r"tls.engine.algorithms: unknown RSAA; fix: use names from RSA"):
        CryptoRuntime.start(CryptoSettings(engine=EngineSettings(id="pkcs11", algorithms=("RSAA",))))


def test_same_engine_id_with_other_ctrl_asks_for_a_restart(fixture_engine: FixtureEngineProbe) -> None:
    settings = fixture_engine.settings(algorithms=())
    CryptoRuntime.start(settings).close()
    assert settings.engine is not None
    changed = EngineSettings(id=settings.engine.id, so_path="/elsewhere/asyncfixture.so", required=True)
    with pytest.raises(CryptoSetupError, match=r"already loaded in this process.*restart ingress-proxy"):
        CryptoRuntime.start(CryptoSettings(engine=changed))


def test_engine_api_present_in_debian_pyopenssl() -> None:
    check_engine_support()


def test_pip_wheel_without_engine_api_is_explained() -> None:
    """PyPI's pyOpenSSL/cryptography wheels embed a static OpenSSL with Cryptography_HAS_ENGINE == 0
    and no ENGINE_* functions: simulated with stand-ins for the binding's `lib`."""
    with pytest.raises(CryptoSetupError, match=r"without ENGINE support; fix: .*system-site-packages"):
        check_engine_support(types.SimpleNamespace(Cryptography_HAS_ENGINE=0))
    partial = types.SimpleNamespace(Cryptography_HAS_ENGINE=1, ENGINE_by_id=None, ENGINE_init=None)
    with pytest.raises(CryptoSetupError, match=r"lacks ENGINE_ctrl_cmd_string, .*ENGINE_load_private_key"):
        check_engine_support(partial)


def test_a_different_openssl_instance_is_detected() -> None:
    """A binding whose error queue never sees errors pushed through ctypes is another OpenSSL copy."""
    real = pyopenssl_binding.lib
    other_copy = types.SimpleNamespace(
        **{name: getattr(real, name) for name in ("Cryptography_HAS_ENGINE", "ENGINE_by_id", "ENGINE_ctrl_cmd_string",
                                                   "ENGINE_init", "ENGINE_finish", "ENGINE_free",
                                                   "ENGINE_load_private_key", "SSL_CTX_use_PrivateKey")},
        ERR_clear_error=lambda: None,
        ERR_get_error=lambda: 0,
    )
    with pytest.raises(CryptoSetupError, match=r"different OpenSSL than the system libcrypto.so.3"):
        check_engine_support(other_copy)
    real.ERR_clear_error()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pkcs11:token=a;object=b;pin-value=1234", "pkcs11:token=a;object=b;pin-value=***"),
        ("pkcs11:object=b?pin-value=s3cr3t&x=1", "pkcs11:object=b?pin-value=***&x=1"),
        ("pkcs11:token=a;PIN-VALUE=9;type=private", "pkcs11:token=a;PIN-VALUE=***;type=private"),
        ("pkcs11:token=a;object=b", "pkcs11:token=a;object=b"),
    ],
)
def test_redact_hides_pin_values(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("pkcs11:token=a;object=b;type=private;pin-value=12%2034", ("pkcs11:token=a;object=b;type=private", "12 34")),
        ("pkcs11:pin-value=1;object=b", ("pkcs11:object=b", "1")),
        ("pkcs11:object=b?pin-value=9&module-path=/x", ("pkcs11:object=b?module-path=/x", "9")),
        ("pkcs11:object=b?PIN-VALUE=9", ("pkcs11:object=b", "9")),
        ("pkcs11:object=b", ("pkcs11:object=b", None)),
        ("0:01", ("0:01", None)),
    ],
)
def test_split_pin(uri: str, expected: tuple[str, str | None]) -> None:
    assert split_pin(uri) == expected


def test_an_optional_provider_that_does_not_load_warns_once_and_serves_software(
    caplog: pytest.LogCaptureFixture, software_rsa: ServerIdentity
) -> None:
    """`required: false` (an accelerator like qatprovider on a host without the device): one warning,
    the process serves in software; keys that only it could open fail by name."""
    ghost = ProviderSettings("ghost-accelerator", module="/nonexistent/ghost.so", required=False)
    with caplog.at_level(logging.WARNING, logger="config.crypto"):
        runtime = CryptoRuntime.start(CryptoSettings(providers=(ghost,), async_mode=True))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'ghost-accelerator'" in warnings[0] and "serving without it" in warnings[0]
    assert runtime.providers_loaded == ("default",) and set(runtime.provider_failures) == {"ghost-accelerator"}
    assert runtime.use_private_key(SSL.Context(SSL.TLS_SERVER_METHOD), software_rsa.key) == "file"
    with pytest.raises(CryptoSetupError, match=r"needs provider 'ghost-accelerator', which did not load \(tls.providers"):
        runtime.load_store_key(StoreKey("ghost-accelerator:/keys/site.pem"))
    lines, ok = run_doctor(CryptoSettings(providers=(ghost,)), [])
    assert not ok
    assert any(line.startswith("provider ghost-accelerator: FAILED (required: false, serving without it)") for line in lines)


def test_a_required_provider_that_does_not_load_stops_start_up() -> None:
    with pytest.raises(CryptoSetupError, match=r"'ghost-accelerator' did not load from /nonexistent/ghost.so"):
        CryptoRuntime.start(CryptoSettings(providers=(ProviderSettings("ghost-accelerator", module="/nonexistent/ghost.so"),)))
