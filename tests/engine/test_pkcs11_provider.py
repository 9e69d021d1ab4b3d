"""Keys on a SoftHSM2 token served through pkcs11-provider (OpenSSL 3 provider, OSSL_STORE by URI),
in this process: TLS 1.2 and 1.3 with RSA and EC, the token's refusals as one-line errors.

A wrong PIN is tested in fresh processes (test_pkcs11_provider_cli.py): once a process has logged
in to the token, pkcs11-provider reuses that login and a later wrong PIN still loads the key."""

from __future__ import annotations

import pytest
from OpenSSL import SSL

from config.crypto import CryptoRuntime, CryptoSetupError, activation_order, provider_config_text, public_key_uri
from config.model import CryptoSettings, ProviderSettings, StoreKey
from tests.engine.conftest import USER_PIN, ServerIdentity, SoftHsmToken, server_context, store_uri
from tests.engine.tls_pump import TlsTestServer, s_client, signature_type


@pytest.fixture
def provider_runtime(softhsm_token: SoftHsmToken):
    runtime = CryptoRuntime.start(softhsm_token.provider_settings())
    yield runtime
    runtime.close()


@pytest.mark.parametrize("protocol", ["-tls1_2", "-tls1_3"])
@pytest.mark.parametrize("key_name", ["rsa", "ec"])
async def test_token_key_by_uri_serves_openssl_s_client(
    provider_runtime: CryptoRuntime, softhsm_token: SoftHsmToken, ca_file: str, key_name: str, protocol: str
) -> None:
    identity = softhsm_token.store_identity(getattr(softhsm_token, key_name))
    context, label = server_context(provider_runtime, identity)
    assert label == "provider:pkcs11"
    async with TlsTestServer(context) as server:
        output = await s_client(server.port, ca_file, protocol)
    assert f"Protocol version: {'TLSv1.2' if protocol == '-tls1_2' else 'TLSv1.3'}" in output
    assert signature_type(output) == ("ECDSA" if key_name == "ec" else "RSA-PSS")
    assert "Verification: OK" in output
    assert server.handshakes == 1


def test_a_key_is_fetched_from_the_token_once_per_runtime(provider_runtime: CryptoRuntime, softhsm_token: SoftHsmToken) -> None:
    identity = softhsm_token.store_identity(softhsm_token.rsa)
    first, _ = provider_runtime.load_store_key(identity.key)  # type: ignore[arg-type]
    second, _ = provider_runtime.load_store_key(identity.key)  # type: ignore[arg-type]
    assert first is second
    for _ in range(3):
        server_context(provider_runtime, identity)
    assert provider_runtime.keys_installed["provider:pkcs11"] == 3


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (StoreKey(store_uri("no-such-object"), USER_PIN), "no provider found this key"),
        (StoreKey("pkcs11:token=no-such-token;object=rsakey;type=private", USER_PIN), "no provider found this key"),
    ],
    ids=["no-such-object", "no-such-token"],
)
def test_keys_the_token_lacks_are_one_line_each_without_the_pin(
    softhsm_token: SoftHsmToken, key: StoreKey, expected: str, capfd: pytest.CaptureFixture[str]
) -> None:
    runtime = CryptoRuntime.start(softhsm_token.provider_settings())  # a fresh runtime: no key cached
    try:
        with pytest.raises(CryptoSetupError) as failure:
            runtime.load_store_key(key)
    finally:
        runtime.close()
    message = str(failure.value)
    assert expected in message and "\n" not in message
    assert "fix:" in message
    captured = capfd.readouterr()
    assert "Enter PIN" not in captured.err, "a server must never prompt for a PIN"
    for pin in ("9999", USER_PIN):
        assert pin not in message + captured.out + captured.err


def test_an_ec_token_key_under_an_rsa_certificate_is_refused(
    provider_runtime: CryptoRuntime, softhsm_token: SoftHsmToken
) -> None:
    mismatched = ServerIdentity(softhsm_token.rsa.chain_pem, softhsm_token.store_identity(softhsm_token.ec).key, "rsa")
    with pytest.raises((CryptoSetupError, SSL.Error)):
        server_context(provider_runtime, mismatched)


def test_a_key_uri_without_a_provider_says_which_setting_is_missing(softhsm_token: SoftHsmToken) -> None:
    runtime = CryptoRuntime.start(CryptoSettings())
    with pytest.raises(CryptoSetupError, match=r"tls.providers is empty; fix: add tls.providers"):
        runtime.load_store_key(StoreKey(store_uri("rsakey"), USER_PIN))


def test_default_is_activated_first_and_pkcs11_gets_no_deinit() -> None:
    given = (ProviderSettings("pkcs11", parameters=(("pkcs11-module-path", "/m.so"),)), ProviderSettings("default"))
    ordered = activation_order(given)
    assert [provider.name for provider in ordered] == ["default", "pkcs11"]
    assert ordered[1].parameters == (("pkcs11-module-path", "/m.so"), ("pkcs11-module-quirks", "no-deinit"))
    assert activation_order((ProviderSettings("legacy"),))[0] == ProviderSettings("default")
    quirked = activation_order((ProviderSettings("pkcs11", parameters=(("pkcs11-module-quirks", "no-operation-state"),)),))
    assert quirked[1].parameters == (("pkcs11-module-quirks", "no-operation-state no-deinit"),)


def test_provider_config_quotes_values_so_openssl_expands_nothing() -> None:
    text = provider_config_text((ProviderSettings("x", module="/a b/x.so", parameters=(("p", 'v$HOME#"q'),)),))
    assert 'module = "/a b/x.so"' in text
    assert 'p = "v$HOME#\\"q"' in text


@pytest.mark.parametrize(
    ("uri", "public"),
    [
        ("pkcs11:token=t;object=k;type=private", "pkcs11:token=t;object=k;type=public"),
        ("pkcs11:token=t;object=k", "pkcs11:token=t;object=k;type=public"),
        ("pkcs11:object=k;type=private?module-name=x", "pkcs11:object=k;type=public?module-name=x"),
    ],
)
def test_public_key_uri(uri: str, public: str) -> None:
    assert public_key_uri(uri) == public
