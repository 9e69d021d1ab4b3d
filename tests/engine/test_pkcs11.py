"""Keys generated on a SoftHSM2 token serve TLS through the real pkcs11 engine, and never leave it."""

from __future__ import annotations

import pytest
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi, lib

from config.crypto import CryptoRuntime, CryptoSetupError
from config.model import EngineKey, PemKey
from tests.engine.conftest import ServerIdentity, SoftHsmToken, key_uri, server_context
from tests.engine.tls_pump import TlsTestServer, s_client, signature_type


@pytest.fixture
def pkcs11_runtime(softhsm_token: SoftHsmToken):
    runtime = CryptoRuntime.start(softhsm_token.settings())
    yield runtime
    runtime.close()


@pytest.mark.parametrize("protocol", ["-tls1_2", "-tls1_3"])
@pytest.mark.parametrize("key_name", ["rsa", "ec"])
async def test_token_key_serves_openssl_s_client(
    pkcs11_runtime: CryptoRuntime, softhsm_token: SoftHsmToken, ca_file: str, key_name: str, protocol: str
) -> None:
    identity = getattr(softhsm_token, key_name)
    context, label = server_context(pkcs11_runtime, identity)
    assert label == "engine:pkcs11"
    async with TlsTestServer(context) as server:
        output = await s_client(server.port, ca_file, protocol)
    assert f"Protocol version: {'TLSv1.2' if protocol == '-tls1_2' else 'TLSv1.3'}" in output
    assert signature_type(output) == ("ECDSA" if key_name == "ec" else "RSA-PSS")
    assert "Verification: OK" in output
    assert server.handshakes == 1
    assert pkcs11_runtime.keys_installed["engine:pkcs11"] == 1


@pytest.mark.parametrize("object_label", ["rsakey", "eckey"])
def test_token_keys_are_sensitive_and_never_extractable(softhsm_token: SoftHsmToken, object_label: str) -> None:
    listing = softhsm_token.pkcs11_tool("--login", "--pin", "1234", "--list-objects", "--type", "privkey")
    block = next(part for part in listing.split("Private Key Object") if f"label:      {object_label}" in part)
    access = next(line for line in block.splitlines() if "Access:" in line)
    assert "never extractable" in access and "sensitive" in access, access
    assert "extractable" not in access.replace("never extractable", "")


def _private_components_in_process(pkey: object) -> list[str]:
    """Which private-key numbers OpenSSL holds for `pkey` in this process (RSA d, EC private scalar).

    Without these numbers there is nothing to leak, whatever the process does with the handle.
    """
    found = []
    if lib.EVP_PKEY_id(pkey) == lib.EVP_PKEY_RSA:
        rsa = lib.EVP_PKEY_get1_RSA(pkey)
        n, e, d = (ffi.new("BIGNUM **") for _ in range(3))
        lib.RSA_get0_key(rsa, n, e, d)
        assert n[0] != ffi.NULL, "the public modulus should be present"
        if d[0] != ffi.NULL:
            found.append("RSA d")
        lib.RSA_free(rsa)
    else:
        ec_key = lib.EVP_PKEY_get1_EC_KEY(pkey)
        scalar = lib.EC_KEY_get0_private_key(ec_key)
        if scalar != ffi.NULL and lib.BN_num_bits(scalar) > 0:  # libp11 marks token keys with a 0 placeholder
            found.append("EC private scalar")
        lib.EC_KEY_free(ec_key)
    return found


@pytest.mark.parametrize("object_label", ["rsakey", "eckey"])
def test_engine_key_material_never_enters_the_process(pkcs11_runtime: CryptoRuntime, object_label: str) -> None:
    """The loaded key is a handle to the token: no private numbers in this process's memory."""
    pkey = pkcs11_runtime.load_engine_key(EngineKey(key_uri(object_label)))
    try:
        assert _private_components_in_process(pkey) == []
    finally:
        lib.EVP_PKEY_free(pkey)


@pytest.mark.parametrize("key_name", ["rsa", "ec"])
def test_software_key_does_hold_private_numbers(request: pytest.FixtureRequest, key_name: str) -> None:
    """The check above can fail: a PEM key loaded the ordinary way has its private numbers here."""
    identity: ServerIdentity = request.getfixturevalue(f"software_{key_name}")
    assert isinstance(identity.key, PemKey)
    pkey = crypto.load_privatekey(crypto.FILETYPE_PEM, identity.key.pem)
    assert _private_components_in_process(pkey._pkey) == [{"rsa": "RSA d", "ec": "EC private scalar"}[key_name]]


def test_wrong_object_fails_naming_the_uri_without_the_pin(
    pkcs11_runtime: CryptoRuntime, capfd: pytest.CaptureFixture[str]
) -> None:
    """Neither our error nor what libp11 itself prints on fd 2 ("The private key was not found at:
    <URI>") carries the PIN: it reaches libp11 through its PIN command, not the URI."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    with pytest.raises(CryptoSetupError) as failure:
        pkcs11_runtime.use_private_key(context, EngineKey("engine:" + key_uri("nosuchkey")))
    message = str(failure.value)
    assert "object=nosuchkey" in message and "pin-value=***" in message
    assert "1234" not in message
    assert "\n" not in message
    printed_by_engine = capfd.readouterr().err
    assert "object=nosuchkey" in printed_by_engine
    assert "1234" not in printed_by_engine



def test_engine_key_is_loaded_once_for_every_context(pkcs11_runtime: CryptoRuntime, softhsm_token: SoftHsmToken) -> None:
    for _ in range(3):
        server_context(pkcs11_runtime, softhsm_token.rsa)
    assert pkcs11_runtime.keys_installed["engine:pkcs11"] == 3
    assert pkcs11_runtime.engine_keys_loaded == 1
