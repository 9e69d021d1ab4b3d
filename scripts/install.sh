#!/usr/bin/env bash
# Idempotent set-up: Debian packages that are missing, then a venv on Debian's Python that sees
# Debian's pyOpenSSL/cryptography (linked to the system OpenSSL 3, which has the ENGINE API).
set -euo pipefail
: "${PYTHON:=/usr/bin/python3}" "${VENV:=.venv}" "${APT_PACKAGES:=}"

missing=()
for pkg in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}"
    sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
# Pin pyOpenSSL and cryptography to exactly the Debian builds so pip can never swap in wheels
# that carry their own static OpenSSL without ENGINE support.
constraints="$VENV/debian-crypto-constraints.txt"
"$VENV/bin/python" - > "$constraints" <<'PY'
import OpenSSL, cryptography
print(f"pyOpenSSL=={OpenSSL.__version__}")
print(f"cryptography=={cryptography.__version__}")
PY
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints" -e '.[test]'
"$VENV/bin/python" -c "import OpenSSL._util as u; assert u.lib.Cryptography_HAS_ENGINE, 'pyOpenSSL has no ENGINE API'"
