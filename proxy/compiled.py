"""Which hot path runs: the compiled extensions (built by scripts/install.sh) or pure Python.

The pure-Python code is the reference; the Cython twins (`proxy/tls/_pump.pyx`, and whatever
else lists itself here) must behave identically and are only used when they were built and
`INGRESS_PROXY_PURE` is unset (or "0"). Every twin is selected once, at import, through
`load_twin`, which records why it was or was not taken, so `ingress-proxy doctor` and the tests
can say which path this process runs.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

PURE_VARIABLE = "INGRESS_PROXY_PURE"


def pure_forced() -> bool:
    """The user asked for the reference path (`INGRESS_PROXY_PURE=1`)."""
    return os.environ.get(PURE_VARIABLE, "") not in ("", "0")


# module name → None when the compiled twin is in use, else why not
_ABSENT: dict[str, str | None] = {}


def load_twin(module: str) -> ModuleType | None:
    """The compiled extension `module`, or None (the pure path runs) with the reason kept."""
    if pure_forced():
        _ABSENT[module] = f"disabled by {PURE_VARIABLE}=1"
        return None
    try:
        twin = importlib.import_module(module)
    except ImportError as error:
        _ABSENT[module] = f"not built ({error}); fix: make install (needs gcc, libssl-dev, python3-dev)"
        return None
    _ABSENT[module] = None
    return twin


# The modules that pick a twin at import (each calls load_twin): imported before reporting.
_SELECTING_MODULES = ("proxy.tls", "proxy.http1")


def hot_path_line() -> str:
    """One line for `ingress-proxy doctor`: compiled, pure, or partly compiled, and why."""
    for module in _SELECTING_MODULES:
        importlib.import_module(module)
    if not _ABSENT:
        return "hot path: pure Python (no compiled twin was asked for)"
    missing = {module: why for module, why in _ABSENT.items() if why is not None}
    if not missing:
        return f"hot path: compiled ({', '.join(sorted(_ABSENT))})"
    reasons = "; ".join(f"{module}: {why}" for module, why in sorted(missing.items()))
    kind = "pure Python" if len(missing) == len(_ABSENT) else "partly compiled"
    return f"hot path: {kind} ({reasons})"


def compiled_modules() -> list[str]:
    """The extensions this process runs (for tests that must not skip silently)."""
    return sorted(module for module, why in _ABSENT.items() if why is None)
