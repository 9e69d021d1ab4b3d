"""Build the optional compiled hot path in place (run by scripts/install.sh; needs Cython 3,
gcc, Python.h from python3-dev and libssl-dev). Generated C and objects go to .venv/build-compiled;
only the importable .so lands next to its .pyx. Exit status non-zero when any extension fails."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / ".venv" / "build-compiled"
# Each entry: module name → (its source, the libraries it links). The pump links the system
# libssl/libcrypto, the ones Debian's cryptography binding uses, so pyOpenSSL's pointers are valid in it.
EXTENSIONS = {
    "proxy.tls._pump": ("proxy/tls/_pump.pyx", ["ssl", "crypto"]),
    "proxy._http1_heads": ("proxy/_http1_heads.pyx", []),
}


def main() -> int:
    os.chdir(ROOT)  # build_ext --inplace places each .so by its module name, from here
    extensions = [
        Extension(name, [str(ROOT / source)], libraries=libraries, extra_compile_args=["-O2"])
        for name, (source, libraries) in EXTENSIONS.items()
    ]
    modules = cythonize(extensions, build_dir=str(BUILD / "c"), quiet=True, compiler_directives={"language_level": 3})
    distribution = Distribution({"name": "ingress-proxy-compiled", "ext_modules": modules})
    command = distribution.get_command_obj("build_ext")
    command.inplace = True
    command.build_temp = str(BUILD / "obj")
    command.build_lib = str(BUILD / "lib")
    command.ensure_finalized()
    command.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
