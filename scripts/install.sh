#!/usr/bin/env bash
# Idempotent set-up: Debian packages that are missing, then a venv on Debian's Python that sees
# Debian's pyOpenSSL/cryptography (linked to the system OpenSSL 3, which has the ENGINE API).
#
# APT_PACKAGES come from the release's main suites. APT_BACKPORTS_PACKAGES (pkcs11-provider 1.0,
# which bookworm main lacks) come from bookworm-backports: the source is added once, as its own
# deb822 file signed by the Debian archive key already on the machine, and only the packages named
# here are installed from it (`-t bookworm-backports`); nothing else changes suite.
set -euo pipefail
: "${PYTHON:=/usr/bin/python3}" "${VENV:=.venv}" "${APT_PACKAGES:=}" "${APT_BACKPORTS_PACKAGES:=}"
BACKPORTS_SOURCE=/etc/apt/sources.list.d/bookworm-backports.sources
ARCHIVE_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

missing_from() {
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || echo "$pkg"
    done
}
sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
apt_install() {
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "$@" >/dev/null
}

# shellcheck disable=SC2086  # the lists are space-separated package names
mapfile -t missing < <(missing_from $APT_PACKAGES)
mapfile -t missing_backports < <(missing_from $APT_BACKPORTS_PACKAGES)
if ((${#missing_backports[@]})) && [ ! -f "$BACKPORTS_SOURCE" ]; then
    [ -f "$ARCHIVE_KEYRING" ] || { echo "no $ARCHIVE_KEYRING; fix: apt-get install debian-archive-keyring" >&2; exit 1; }
    echo "adding Debian bookworm-backports as $BACKPORTS_SOURCE (for ${missing_backports[*]})"
    printf '%s\n' "Types: deb" "URIs: http://deb.debian.org/debian" "Suites: bookworm-backports" \
        "Components: main" "Signed-By: $ARCHIVE_KEYRING" | $sudo_cmd tee "$BACKPORTS_SOURCE" >/dev/null
fi
if ((${#missing[@]} + ${#missing_backports[@]})); then
    $sudo_cmd apt-get -o DPkg::Lock::Timeout=600 update -qq
fi
if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}"
    apt_install "${missing[@]}"
fi
if ((${#missing_backports[@]})); then
    echo "installing from bookworm-backports: ${missing_backports[*]}"
    apt_install -t bookworm-backports "${missing_backports[@]}"
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

# The optional compiled hot path (README "Compiled hot path"): Cython 3 from PyPI, gcc, Python.h
# (python3-dev) and libssl-dev from Debian. A failed build is one line and not an error: the
# pure-Python path is the reference and runs whenever the extension is absent.
build_log="$VENV/compiled-build.log"
if "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints" -e '.[compiled]' >"$build_log" 2>&1 \
    && "$VENV/bin/python" scripts/build_compiled.py >>"$build_log" 2>&1; then
    echo "compiled hot path: built"
else
    echo "compiled hot path: NOT built, the pure-Python path will run (why: $build_log)"
fi
