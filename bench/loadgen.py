"""External load generators (wrk, openssl s_time) run on the generator core, with their output parsed
into one `LoadResult` that carries its own error counts, so no figure is reported without them.

Which tool for which row, and why (checked with nginx logging `$ssl_session_reused`):
- wrk and h2load resume TLS sessions on every reconnection (`Connection: close` gives resumed, not
  full handshakes), so they only measure keep-alive traffic here.
- Fixed-rate latency: Debian has no wrk2, and h2load's `--rate` paces connections, not requests.
  wrk's Lua `delay()` hook paces requests instead: one schedule of send slots `start + i/rate` for
  all connections; a connection that becomes free claims the next slot and waits for it (wrk
  delays in whole milliseconds, so requests leave in 1 ms batches). wrk starts its latency clock
  when it writes the request, so time a request waits for a free connection is not counted: there
  are enough connections for that not to happen below saturation, and a proxy that cannot keep
  the rate (achieved < 97 % of target) is flagged as saturated instead of given a latency.
- `openssl s_time -new` offers no session on any connection: full handshakes, whatever the server
  allows. `-reuse` resumes one session on every connection (with `-www`, so that the TLS 1.3 ticket
  is read). Both print one character per connection (`*` full, `r` resumed), which is how a row
  checks what kind of handshake it measured. Each s_time runs one connection at a time, so several
  run side by side to keep the proxy busy.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.machine import GENERATOR_CPUS

S_TIME_PROCESSES = 8  # concurrent handshakes offered; enough to keep one proxy core busy
GRACE_SECONDS = 15.0  # a generator running this long past its duration is killed and reported

_S_TIME_SUMMARY = re.compile(
    r"^(\d+) connections in [\d.]+s; [\d.]+ connections/user sec, bytes read (\d+)$", re.MULTILINE
)
_S_TIME_PROGRESS = re.compile(r"[*rt3]+")  # one character per connection: * full, r resumed

_WRK_PACING_SCRIPT = """\
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock_id, bench_timespec *now);
]]
local now_spec = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, now_spec)  -- CLOCK_MONOTONIC
  return tonumber(now_spec.tv_sec) * 1000 + tonumber(now_spec.tv_nsec) / 1e6
end
local interval_ms = 1000 / RATE_PER_SECOND
local next_slot_ms = nil
delay = function()
  local now = now_ms()
  if next_slot_ms == nil then next_slot_ms = now end
  local wait = next_slot_ms - now
  next_slot_ms = next_slot_ms + interval_ms
  if wait < 0 then return 0 end
  return wait
end
"""

_WRK_SUMMARY_SCRIPT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH-JSON {"requests":%d,"bytes":%d,"duration_us":%d,"connect":%d,"read":%d,'
    .. '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class LoadResult:
    command: str  # what ran, for the report
    completed: int  # requests (wrk) or connections (s_time) that finished
    seconds: float
    bytes_received: int
    errors: dict[str, int] = field(default_factory=dict)  # only kinds that occurred
    full_handshakes: int | None = None
    resumed_handshakes: int | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)  # "p50", "p99"

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def run_wrk(
    workdir: Path,
    port: int,
    path: str,
    connections: int,
    seconds: float,
    rate_per_second: float | None = None,
) -> LoadResult:
    """Closed loop (as fast as the proxy answers), or paced at `rate_per_second` requests/s."""
    script = workdir / "wrk-summary.lua"
    pacing = "" if rate_per_second is None else _WRK_PACING_SCRIPT.replace(
        "RATE_PER_SECOND", repr(float(rate_per_second))
    )
    script.write_text(pacing + _WRK_SUMMARY_SCRIPT)
    argv = [
        "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
        "-s", str(script), f"https://127.0.0.1:{port}{path}",
    ]
    command = " ".join(argv[:5]) + f" https://127.0.0.1:PORT{path}"
    if rate_per_second is not None:
        command += f" (Lua-paced at {rate_per_second:.0f} req/s)"
    completed = _run(argv, seconds)
    match = re.search(r"^BENCH-JSON (\{.*\})$", completed.stdout, re.MULTILINE)
    if completed.returncode != 0 or match is None:
        return LoadResult(command, 0, seconds, 0, {f"wrk exit {completed.returncode}": 1})
    summary = json.loads(match.group(1))
    errors = {
        kind: summary[kind]
        for kind in ("connect", "read", "write", "timeout")
        if summary[kind]
    }
    if summary["status"]:
        errors["non-2xx/3xx"] = summary["status"]
    return LoadResult(
        command=command,
        completed=summary["requests"],
        seconds=summary["duration_us"] / 1e6,
        bytes_received=summary["bytes"],
        errors=errors,
        latency_ms={"p50": summary["p50_us"] / 1000, "p99": summary["p99_us"] / 1000},
    )


def run_s_time(port: int, mode: str, seconds: float, expected_response_bytes: int) -> LoadResult:
    """`mode` is "new" (full handshakes) or "reuse" (resumed); one GET / per connection."""
    whole_seconds = max(1, round(seconds))
    argv = [
        "taskset", "-c", GENERATOR_CPUS, "openssl", "s_time", "-connect", f"127.0.0.1:{port}",
        f"-{mode}", "-www", "/", "-time", str(whole_seconds),
    ]
    command = f"{S_TIME_PROCESSES} x openssl s_time -{mode} -www / -time {whole_seconds}"
    started = time.monotonic()
    processes = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(S_TIME_PROCESSES)
    ]
    outputs: list[str] = []
    errors: dict[str, int] = {}
    for process in processes:
        try:
            output, _ = process.communicate(timeout=whole_seconds + GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            _count(errors, "s_time hung (connection left open after the HTTP/1.0 response?)")
        if process.returncode != 0 or "ERROR" in output:
            _count(errors, f"s_time failed (exit {process.returncode})")
        outputs.append(output)
    elapsed = time.monotonic() - started
    connections = bytes_read = full = resumed = 0
    for output in outputs:
        match = _S_TIME_SUMMARY.search(output)
        if match is None:
            continue
        connections += int(match.group(1))
        bytes_read += int(match.group(2))
        progress = "".join(line for line in output.splitlines() if _S_TIME_PROGRESS.fullmatch(line))
        full += progress.count("*") + progress.count("t") + progress.count("3")
        resumed += progress.count("r")
    short_responses = connections * expected_response_bytes - bytes_read
    if short_responses > 0:
        errors["bytes missing from responses"] = short_responses
    return LoadResult(
        command=command,
        completed=connections,
        seconds=elapsed,
        bytes_received=bytes_read,
        errors=errors,
        full_handshakes=full,
        resumed_handshakes=resumed,
    )


_H2LOAD_REQUESTS = re.compile(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored")
_H2LOAD_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_H2LOAD_TRAFFIC = re.compile(r"traffic: .*?\((\d+)\) total")


def run_h2load(
    port: int, path: str, clients: int, streams: int, seconds: float, body: Path | None = None, headers: tuple[str, ...] = ()
) -> LoadResult:
    """HTTP/2 closed loop: `clients` connections with up to `streams` requests in flight on each;
    with `body`, each request is a POST of that file (h2load -d), e.g. one gRPC message."""
    whole_seconds = max(1, round(seconds))
    argv = ["h2load", f"-c{clients}", f"-m{streams}", "-t1", f"-D{whole_seconds}", "--warm-up-time=1"]
    if body is not None:
        argv += ["-d", str(body)]
    for header in headers:
        argv += ["-H", header]
    argv.append(f"https://127.0.0.1:{port}{path}")
    command = " ".join(argv[:-1]) + f" https://127.0.0.1:PORT{path}"
    completed = _run(argv, seconds + 1)
    requests = _H2LOAD_REQUESTS.search(completed.stdout)
    if completed.returncode != 0 or requests is None:
        return LoadResult(command, 0, seconds, 0, {f"h2load exit {completed.returncode}": 1})
    done, succeeded, failed, errored = (int(requests.group(n)) for n in (2, 3, 4, 5))
    errors = {kind: count for kind, count in (("failed", failed), ("errored", errored)) if count}
    status = _H2LOAD_STATUS.search(completed.stdout)
    if status is not None and (not_ok := sum(int(status.group(n)) for n in (3, 4))):
        errors["non-2xx/5xx"] = not_ok
    if status is not None and int(status.group(4)):
        errors["5xx"] = int(status.group(4))
    traffic = _H2LOAD_TRAFFIC.search(completed.stdout)
    return LoadResult(
        command=command,
        completed=succeeded if succeeded <= done else done,
        seconds=float(whole_seconds),
        bytes_received=int(traffic.group(1)) if traffic else 0,
        errors=errors,
    )


def _count(errors: dict[str, int], kind: str) -> None:
    errors[kind] = errors.get(kind, 0) + 1


def _run(argv: list[str], seconds: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["taskset", "-c", GENERATOR_CPUS, *argv],
            capture_output=True,
            text=True,
            timeout=seconds + GRACE_SECONDS,
        )
    except subprocess.TimeoutExpired as error:
        return subprocess.CompletedProcess(argv, -9, str(error.stdout or ""), "timed out")
