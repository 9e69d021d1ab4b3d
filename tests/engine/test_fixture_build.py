"""conftest._build compiles a fixture again when any of its inputs changed, the shared worker pool
header (offload_pool.h) included, and keeps the library while none did. Copies of the real sources
in the same layout (async_engine/async_engine.c includes ../offload_pool.h), with set mtimes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.engine.conftest import FIXTURE_ENGINE_SOURCE, OFFLOAD_POOL_HEADER, _build

INPUTS_WRITTEN = 1_000_000  # mtimes in seconds since the epoch, far before any build of today
LIBRARY_BUILT = 2_000_000
HEADER_CHANGED = 3_000_000


def _set_mtime(path: Path, seconds: int) -> None:
    os.utime(path, (seconds, seconds))


@pytest.fixture
def engine_inputs(tmp_path: Path) -> tuple[Path, Path]:
    source = tmp_path / "async_engine" / "async_engine.c"
    source.parent.mkdir()
    shutil.copy(FIXTURE_ENGINE_SOURCE, source)
    header = tmp_path / "offload_pool.h"
    shutil.copy(OFFLOAD_POOL_HEADER, header)
    for path in (source, header):
        _set_mtime(path, INPUTS_WRITTEN)
    return source, header


def test_library_newer_than_every_input_is_kept(engine_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    library = _build(tmp_path / "build" / "asyncfixture.so", *engine_inputs)
    _set_mtime(library, LIBRARY_BUILT)
    _build(library, *engine_inputs)
    assert library.stat().st_mtime == LIBRARY_BUILT


def test_newer_pool_header_alone_rebuilds_from_that_header(engine_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    source, header = engine_inputs
    library = _build(tmp_path / "build" / "asyncfixture.so", source, header)
    _set_mtime(library, LIBRARY_BUILT)
    header.write_text(header.read_text() + '\n#error "the header changed"\n')
    _set_mtime(header, HEADER_CHANGED)
    with pytest.raises(subprocess.CalledProcessError):  # gcc ran again, and read the changed header
        _build(library, source, header)
    assert library.stat().st_mtime == LIBRARY_BUILT  # a failed build leaves the last library in place
