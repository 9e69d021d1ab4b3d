"""What the benchmark reads from the machine: process-tree RSS and CPU, per-core load, versions."""

from __future__ import annotations

import datetime
import os
import platform
import re
import resource
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PROXY_CPUS = "0"
GENERATOR_CPUS = "1"
BOTH_CPUS = "0,1"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def process_tree(root_pid: int) -> list[int]:
    """`root_pid` and all its descendants alive now (nginx master + workers, proxy + workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    tree, pending = [], [root_pid]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return tree


def tree_rss_bytes(root_pid: int) -> int:
    total = 0
    for pid in process_tree(root_pid):
        try:
            resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError):
            continue
        total += resident_pages * _PAGE_SIZE
    return total


def tree_cpu_seconds(root_pid: int) -> float:
    total_ticks = 0
    for pid in process_tree(root_pid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total_ticks += int(fields[11]) + int(fields[12])  # utime + stime
    return total_ticks / _CLOCK_TICKS


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """utime + stime of one thread (the proxy's event-loop thread is its main thread: tid = pid)."""
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def core_busy_ticks() -> dict[str, tuple[int, int]]:
    """Per core (`cpu0`, `cpu1`, ...): (busy ticks, total ticks) since boot."""
    result = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if re.fullmatch(r"cpu\d+", name):
            ticks = [int(value) for value in values]
            idle = ticks[3] + ticks[4]  # idle + iowait
            result[name] = (sum(ticks[:8]) - idle, sum(ticks[:8]))
    return result


@dataclass
class CpuWindow:
    """CPU use of one process tree and of the generator core over a measurement window."""

    root_pid: int
    _start_cpu: float = 0.0
    _start_cores: dict[str, tuple[int, int]] | None = None
    _start_time: float = 0.0
    proxy_cpu_percent: float = 0.0  # 100 = one core fully busy
    proxy_core_percent: float = 0.0  # how busy core 0 was, whoever ran on it
    generator_core_percent: float = 0.0

    def __enter__(self) -> CpuWindow:
        self._start_cpu = tree_cpu_seconds(self.root_pid)
        self._start_cores = core_busy_ticks()
        self._start_time = time.monotonic()
        return self

    def __exit__(self, *exc_info: object) -> None:
        elapsed = max(time.monotonic() - self._start_time, 1e-9)
        self.proxy_cpu_percent = 100 * (tree_cpu_seconds(self.root_pid) - self._start_cpu) / elapsed
        assert self._start_cores is not None
        end_cores = core_busy_ticks()

        def busy_percent(core: str) -> float:
            busy0, total0 = self._start_cores[core]  # type: ignore[index]
            busy1, total1 = end_cores[core]
            return 100 * (busy1 - busy0) / max(total1 - total0, 1)

        self.proxy_core_percent = busy_percent(f"cpu{PROXY_CPUS}")
        self.generator_core_percent = busy_percent(f"cpu{GENERATOR_CPUS}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def raise_open_file_limit() -> int:
    """Raise this process's (and so its children's) soft RLIMIT_NOFILE to the hard limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _first_line(argv: list[str]) -> str:
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable ({error})"
    output = (completed.stdout + completed.stderr).strip()
    return output.splitlines()[0] if output else "unknown"


def machine_info(repo: Path) -> dict[str, object]:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "kernel": platform.release(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "memory_total": _meminfo_total(),
        "python": platform.python_version(),
        "git_commit": _first_line(["git", "-C", str(repo), "rev-parse", "HEAD"]),
        "versions": {
            "haproxy": _first_line(["haproxy", "-v"]),
            "nginx": _first_line(["nginx", "-v"]),
            "wrk": _first_line(["wrk", "--version"]),
            "h2load": _first_line(["h2load", "--version"]),
            "openssl": _first_line(["openssl", "version"]),
        },
    }


def _meminfo_total() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return line.split(":", 1)[1].strip()
    return "unknown"
