# ingress-proxy as a Kubernetes Ingress controller: `docker build -t ingress-proxy:0.1.0 .`
#
# Debian bookworm because its python3-openssl (pyOpenSSL 23) and python3-cryptography (38) link the
# system libssl.so.3/libcrypto.so.3 (OpenSSL 3.0) with the ENGINE API; PyPI wheels carry a static
# OpenSSL without it, so engines (pkcs11 HSMs, QAT) could never reach them. The venv is made the way
# scripts/install.sh makes it: from /usr/bin/python3 with --system-site-packages, pip constrained to
# the Debian crypto versions so it can never swap in wheels.
FROM debian:bookworm-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-openssl python3-cryptography python3-yaml \
      libengine-pkcs11-openssl ca-certificates \
 && rm -rf /var/lib/apt/lists/*

ENV VENV=/opt/ingress-proxy/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/ingress-proxy/src
COPY pyproject.toml ./
COPY config ./config
COPY proxy ./proxy
COPY ingress_watch ./ingress_watch

RUN /usr/bin/python3 -m venv --system-site-packages "$VENV" \
 && "$VENV/bin/python" -c 'import OpenSSL, cryptography; print(f"pyOpenSSL=={OpenSSL.__version__}"); print(f"cryptography=={cryptography.__version__}")' \
      > "$VENV/debian-crypto-constraints.txt" \
 && "$VENV/bin/python" -m pip install --no-cache-dir --disable-pip-version-check -c "$VENV/debian-crypto-constraints.txt" . \
 && "$VENV/bin/python" -c "import OpenSSL._util as u; assert u.lib.Cryptography_HAS_ENGINE, 'pyOpenSSL has no ENGINE API'" \
 && "$VENV/bin/ingress-proxy" doctor

# Non-root; numeric so that the kubelet can verify runAsNonRoot. All listeners are above 1024.
RUN groupadd --system --gid 10001 ingress-proxy \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin ingress-proxy
USER 10001:10001
WORKDIR /tmp

EXPOSE 8443 8080 9100
ENTRYPOINT ["/opt/ingress-proxy/venv/bin/ingress-proxy", "serve", "--kubernetes"]
