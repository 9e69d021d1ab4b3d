"""Certificates → SNI contexts, and their reuse across publishes (no sockets)."""

from __future__ import annotations

import dataclasses

from OpenSSL import SSL, crypto

from config.model import Certificate, Configuration, KeySource, PemKey, RouteTable
from proxy.contexts import ContextCache
from tests.conftest import certificate_for


def install_pem_key(context: SSL.Context, key: KeySource) -> str:
    assert isinstance(key, PemKey)
    context.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, key.pem))
    return "file"


def configuration(*certificates: Certificate) -> Configuration:
    return Configuration(routes=RouteTable((), ()), certificates=certificates)


def test_sni_mapping_precise_wildcard_default(ca):
    cache = ContextCache(b"k" * 80)
    exact, wild = certificate_for(ca, "a.test"), certificate_for(ca, "*.w.test")
    contexts = cache.build(configuration(exact, wild), install_pem_key)
    assert contexts.for_server_name(b"A.test") is contexts.precise["a.test"]
    assert contexts.for_server_name(b"x.w.test") is contexts.wildcard["w.test"]
    assert contexts.for_server_name(b"y.x.w.test") is contexts.default
    assert contexts.for_server_name(None) is contexts.default
    assert contexts.key_source(contexts.precise["a.test"]) == "file"


def test_unchanged_certificates_keep_their_contexts_and_changed_ones_are_rebuilt(ca):
    cache = ContextCache(b"k" * 80)
    kept, replaced = certificate_for(ca, "kept.test"), certificate_for(ca, "replaced.test")
    first = cache.build(configuration(kept, replaced), install_pem_key)
    renewed = certificate_for(ca, "replaced.test")
    second = cache.build(configuration(kept, renewed), install_pem_key)
    assert second.precise["kept.test"] is first.precise["kept.test"]
    assert second.default is first.default
    assert second.precise["replaced.test"] is not first.precise["replaced.test"]
    assert cache.current is second


def test_a_new_crypto_runtime_rebuilds_everything(ca):
    cache = ContextCache(b"k" * 80)
    certificate = certificate_for(ca, "a.test")
    first = cache.build(configuration(certificate), install_pem_key)
    second = cache.build(configuration(certificate), lambda context, key: install_pem_key(context, key))
    assert second.precise["a.test"] is not first.precise["a.test"]


def test_a_broken_certificate_is_left_out_and_reported(ca):
    cache = ContextCache(b"k" * 80)
    good, other = certificate_for(ca, "good.test"), certificate_for(ca, "bad.test")
    mismatched = dataclasses.replace(other, key=good.key, origin="routes.yaml:9:7")
    contexts = cache.build(configuration(good, mismatched), install_pem_key)
    assert "good.test" in contexts.precise and "bad.test" not in contexts.precise
    assert [problem.location for problem in contexts.problems] == ["routes.yaml:9:7"]
