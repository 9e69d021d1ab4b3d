# Two commands do all set-up on a fresh Debian machine: `make run` and `make test`.
PYTHON := /usr/bin/python3
VENV := .venv
APT_PACKAGES := python3-venv python3-openssl python3-cryptography python3-yaml libssl-dev gcc python3-dev curl \
	softhsm2 opensc libengine-pkcs11-openssl openssl iproute2 testssl.sh nghttp2-client
# From bookworm-backports (scripts/install.sh adds that source): not in bookworm main.
APT_BACKPORTS_PACKAGES := pkcs11-provider
BENCH_APT_PACKAGES := haproxy nginx-light wrk

.PHONY: install run test fuzz soak bench clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh Makefile scripts/build_compiled.py $(wildcard proxy/*.pyx proxy/*/*.pyx)
	APT_PACKAGES="$(APT_PACKAGES)" APT_BACKPORTS_PACKAGES="$(APT_BACKPORTS_PACKAGES)" \
		PYTHON=$(PYTHON) VENV=$(VENV) scripts/install.sh
	touch $@

run: install
	$(VENV)/bin/python examples/run_demo.py

# The data-plane suites run three ways: the whole suite as installed (the keep-alive fast path,
# on the compiled hot path when install built it); e2e + hostile with only the general path
# (INGRESS_PROXY_FAST_PATH=0); unit/e2e/hostile on the pure-Python reference path
# (INGRESS_PROXY_PURE=1, what runs wherever the extension is not built). Each keeps every
# behaviour the tests pin down.
test: install
	$(VENV)/bin/python -m mypy
	$(VENV)/bin/python -m pytest -q tests
	INGRESS_PROXY_FAST_PATH=0 $(VENV)/bin/python -m pytest -q tests/e2e tests/hostile
	INGRESS_PROXY_PURE=1 $(VENV)/bin/python -m pytest -q tests/unit tests/e2e tests/hostile

fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(VENV)/bin/python -m pytest -q tests/hostile

soak: install
	SOAK_SCALE=10 $(VENV)/bin/python -m pytest -q tests/soak

bench: install
	APT_PACKAGES="$(BENCH_APT_PACKAGES)" PYTHON=$(PYTHON) VENV=$(VENV) scripts/install.sh
	$(VENV)/bin/python -m bench

clean:
	rm -rf $(VENV) examples/certs bench/results/*.tmp
	find proxy -name '*.so' -delete
