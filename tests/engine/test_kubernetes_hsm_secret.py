"""An HSM-backed key from Kubernetes: a TLS Secret whose tls.key holds the token key's URI (bare, or
in pkcs11-provider's PEM wrapping), the providers from the ConfigMap, translated by the real
translator and served by the real proxy; the private key stays on the SoftHSM2 token."""

from __future__ import annotations

import asyncio
import base64
import subprocess

import pytest
from prometheus_client import REGISTRY

from config.tls_material import wrap_key_uri
from ingress_watch.snapshot import Snapshot
from ingress_watch.translate import TranslateOptions, translate
from tests.engine.conftest import PKCS11_PROVIDER_MODULE, SOFTHSM_MODULE, SoftHsmToken, store_uri

pytestmark = pytest.mark.e2e


def _snapshot(token: SoftHsmToken, backend_port: int, tls_keys: dict[str, bytes]) -> Snapshot:
    parameters = "\n".join(f"pkcs11 {name}={value}" for name, value in token.provider().parameters)
    ingress_tls = [{"hosts": [f"{name}.test"], "secretName": f"{name}-hsm"} for name in tls_keys]
    rules = [
        {"host": f"{name}.test", "http": {"paths": [{"path": "/", "pathType": "Prefix",
                                                      "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}
        for name in tls_keys
    ]
    chains = {"rsakey": token.rsa.chain_pem, "eckey": token.ec.chain_pem}
    secrets = tuple(
        {
            "metadata": {"name": f"{name}-hsm", "namespace": "shop"},
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": base64.b64encode(chains[name]).decode(), "tls.key": base64.b64encode(key).decode()},
        }
        for name, key in tls_keys.items()
    )
    return Snapshot(
        ingresses=({
            "metadata": {"name": "shop", "namespace": "shop", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"ingressClassName": "proxy", "tls": ingress_tls, "rules": rules},
        },),
        ingress_classes=({"metadata": {"name": "proxy"}, "spec": {"controller": "ingress-proxy.dev/controller"}},),
        services=({"metadata": {"name": "web", "namespace": "shop"}, "spec": {"ports": [{"port": 80, "targetPort": backend_port}]}},),
        endpoint_slices=({
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"port": backend_port}],
            "endpoints": [{"addresses": ["127.0.0.1"]}],
        },),
        secrets=secrets,
        configmap={"metadata": {"name": "ingress-proxy", "namespace": "ingress-proxy"},
                   "data": {"ssl-provider": "pkcs11", "ssl-provider-parameters": parameters}},
    )


async def test_secret_with_a_key_uri_serves_through_the_token(
    start_proxy, start_backend, softhsm_token: SoftHsmToken, ca_file: str
) -> None:
    backend = await start_backend("web")
    keys = {"rsakey": wrap_key_uri(store_uri("rsakey")), "eckey": store_uri("eckey").encode() + b"\n"}
    translation = translate(_snapshot(softhsm_token, backend.address.port, keys), TranslateOptions())
    assert translation.problems == ()
    configuration = translation.configuration
    assert configuration.crypto.providers == (softhsm_token.provider(),)
    proxy = await start_proxy(configuration)
    labels = {"version": "TLSv1.3", "key_source": "provider:pkcs11", "resumed": "no"}
    before = REGISTRY.get_sample_value("ingress_proxy_tls_handshakes_total", labels) or 0.0
    for host in ("rsakey.test", "eckey.test"):
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--fail", "--tlsv1.3", "--cacert", ca_file,
            "--resolve", f"{host}:{proxy.https_port}:127.0.0.1", f"https://{host}:{proxy.https_port}/from-a-secret",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        output, errors = await asyncio.wait_for(curl.communicate(), 30)
        assert curl.returncode == 0, errors.decode()
        assert b'"path_qs": "/from-a-secret"' in output
    assert (REGISTRY.get_sample_value("ingress_proxy_tls_handshakes_total", labels) or 0.0) - before == 2
    assert proxy.server.generation.tls.problems == ()


def test_pkcs11_provider_reads_our_wrapped_uri_as_its_own(softhsm_token: SoftHsmToken, tmp_path) -> None:
    """The PEM block we accept is the one pkcs11-provider decodes: openssl, with the provider
    loaded from a config file, takes our wrapped URI as a key file and prints its public half."""
    wrapped = tmp_path / "wrapped.pem"
    wrapped.write_bytes(wrap_key_uri(store_uri("rsakey")))
    config = tmp_path / "openssl-provider.cnf"
    config.write_text(
        "openssl_conf = init\n[init]\nproviders = providers\n[providers]\ndefault = default_section\npkcs11 = pkcs11_section\n"
        "[default_section]\nactivate = 1\n"
        f"[pkcs11_section]\nmodule = {PKCS11_PROVIDER_MODULE}\npkcs11-module-path = {SOFTHSM_MODULE}\n"
        f"pkcs11-module-token-pin = file:{softhsm_token.pin_file}\npkcs11-module-quirks = no-deinit\nactivate = 1\n"
    )
    result = subprocess.run(
        ["openssl", "pkey", "-in", str(wrapped), "-pubout"],
        env={**softhsm_token.env, "OPENSSL_CONF": str(config)}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    certificate_key = x509.load_pem_x509_certificate(softhsm_token.rsa.chain_pem).public_key()
    assert serialization.load_pem_public_key(result.stdout.encode()).public_numbers() == certificate_key.public_numbers()  # type: ignore[union-attr]
