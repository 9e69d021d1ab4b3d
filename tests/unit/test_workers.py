"""`--workers`' key-loading lock: forked workers publish in turn (proxy/workers.py says why)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from proxy.workers import KeyLoadingLock

HOLD_SECONDS = 0.3  # long enough that two unlocked children would overlap; correctness needs no timing


def _children_holding(lock: KeyLoadingLock, journal: Path, count: int) -> None:
    """Fork `count` children that each write 'in', wait, write 'out' while holding `lock`."""
    pids = []
    for index in range(count):
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                with lock:
                    with journal.open("a") as file:
                        file.write(f"in {index}\n")
                    time.sleep(HOLD_SECONDS)
                    with journal.open("a") as file:
                        file.write(f"out {index}\n")
                status = 0
            finally:
                os._exit(status)
        pids.append(pid)
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_forked_workers_hold_the_lock_one_at_a_time(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    _children_holding(KeyLoadingLock(), journal, 3)
    lines = journal.read_text().splitlines()
    assert len(lines) == 6
    for enter, leave in zip(lines[::2], lines[1::2]):  # every "in" is followed by the same child's "out"
        assert enter.startswith("in ") and leave == enter.replace("in", "out"), lines


def test_a_worker_that_dies_holding_the_lock_lets_go_of_it(tmp_path: Path) -> None:
    lock = KeyLoadingLock()
    pid = os.fork()
    if pid == 0:
        lock.__enter__()
        os._exit(0)  # never leaves the lock: the kernel releases a dead process's record locks
    os.waitpid(pid, 0)
    journal = tmp_path / "journal"
    _children_holding(lock, journal, 1)
    assert journal.read_text().splitlines() == ["in 0", "out 0"]
