"""`python -m bench [--quick] [--only ROW ...]`: run the side-by-side benchmark, print and save the table."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from bench import certs, report
from bench.machine import GENERATOR_CPUS, machine_info, raise_open_file_limit
from bench.rows import ROWS, Budget, Measurement, Row, RowRun, measure_keep_alive
from bench.servers import (
    PROXIES,
    REPO,
    Proxy,
    ProxyStartTimeout,
    ProxyUnavailable,
    RunContext,
    backend,
)

FULL_BUDGET = Budget(seconds=10, idle_connections=2000, warm_up=True, stalled_readers=1000, memory_return_seconds=30)
QUICK_BUDGET = Budget(seconds=1, idle_connections=300, warm_up=False, stalled_readers=200, memory_return_seconds=5)
REQUIRED_TOOLS = ("haproxy", "nginx", "wrk", "openssl", "taskset")
# HAProxy first: the latency row paces at half of its keep-alive maximum.
MEASUREMENT_ORDER = ("haproxy", "nginx", "ingress-proxy")


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke run (1 s per measurement, 300 idle connections)")
    parser.add_argument(
        "--only", action="append", choices=[row.name for row in ROWS], metavar="ROW",
        help="run only this row (repeatable); rows: " + ", ".join(row.name for row in ROWS),
    )
    parser.add_argument(
        "--results-dir", type=Path, default=REPO / "bench" / "results",
        help="where the Markdown and JSON results go (default: bench/results)",
    )
    return parser.parse_args(argv)


class Runner:
    def __init__(self, context: RunContext, budget: Budget) -> None:
        self.context = context
        self.budget = budget
        self.proxies: dict[str, Proxy] = {proxy.name: proxy for proxy in PROXIES}
        self.haproxy_keep_alive_rate: float | None = None
        # (proxy, workers) -> why it never became ready: later rows skip it instead of waiting again
        self.start_timeouts: dict[tuple[str, int], str] = {}

    def run_row(self, row: Row) -> list[Measurement]:
        target_rate = self._target_rate() if row.needs_target_rate else None
        measurements = []
        for name in MEASUREMENT_ORDER:
            measurement = self._measure(row, self.proxies[name], target_rate)
            if row.name == "keepalive" and name == "haproxy":
                self.haproxy_keep_alive_rate = measurement.values.get("requests_per_second")
            print(f"  {row.name:<18} {name:<14} {_summary(measurement)}", file=sys.stderr, flush=True)
            measurements.append(measurement)
        return measurements

    def _measure(self, row: Row, proxy: Proxy, target_rate: float | None) -> Measurement:
        measurement = Measurement(proxy.name)
        not_applicable = dict(row.not_applicable)
        if proxy.name in not_applicable:
            measurement.unavailable = f"not applicable: {not_applicable[proxy.name]}"
            return measurement
        earlier_timeout = self.start_timeouts.get((proxy.name, row.settings.workers))
        if earlier_timeout is not None:
            measurement.unavailable = f"skipped, never became ready earlier in this run: {earlier_timeout}"
            return measurement
        if row.needs_target_rate and target_rate is None:
            measurement.unavailable = "no HAProxy keep-alive figure to derive the target rate from"
            return measurement
        run = RowRun(self.context.workdir, self.context.certs, self.budget, row.settings, target_rate)
        try:
            with proxy.start(row.settings, self.context) as running:
                measurement.notes.extend(running.notes)
                row.measure(run, running, measurement)
        except ProxyStartTimeout as error:
            self.start_timeouts[(proxy.name, row.settings.workers)] = str(error)
            measurement.unavailable = str(error)
        except ProxyUnavailable as error:
            measurement.unavailable = str(error)
        except (OSError, ValueError, RuntimeError) as error:
            measurement.unavailable = f"measurement failed: {type(error).__name__}: {error}"
        return measurement

    def _target_rate(self) -> float | None:
        if self.haproxy_keep_alive_rate is None:
            keep_alive = next(row for row in ROWS if row.name == "keepalive")
            probe = Measurement("haproxy")
            run = RowRun(self.context.workdir, self.context.certs, self.budget, keep_alive.settings)
            try:
                with self.proxies["haproxy"].start(keep_alive.settings, self.context) as running:
                    measure_keep_alive(run, running, probe)
            except ProxyUnavailable as error:
                print(f"  cannot measure HAProxy's keep-alive maximum: {error}", file=sys.stderr)
                return None
            self.haproxy_keep_alive_rate = probe.values.get("requests_per_second")
        return None if self.haproxy_keep_alive_rate is None else self.haproxy_keep_alive_rate / 2


def _summary(measurement: Measurement) -> str:
    if measurement.unavailable is not None:
        return f"n/a: {measurement.unavailable}"
    figures = ", ".join(f"{key} {value:,.2f}" for key, value in measurement.values.items())
    flags = f"  FLAGS: {'; '.join(measurement.flags)}" if measurement.flags else ""
    return figures + flags


def _stop_on_sigterm(signal_number: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal_number}")


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        print(f"bench: missing {', '.join(missing)}; run `make bench` (installs haproxy nginx-light "
              "wrk nghttp2-client)", file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("bench: needs 2 cores (proxy on core 0, generator on core 1)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {int(GENERATOR_CPUS)})
    raise_open_file_limit()
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    budget = QUICK_BUDGET if arguments.quick else FULL_BUDGET
    mode = "quick" if arguments.quick else "full"
    rows = [row for row in ROWS if arguments.only is None or row.name in arguments.only]
    info = machine_info(REPO)
    info["budget"] = dataclasses.asdict(budget)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="ingress-proxy-bench-", dir=_tmpfs()))
    workdir.chmod(0o755)  # nginx workers run as nobody and read the 1 MiB file from here
    results: list[tuple[Row, list[Measurement]]] = []
    try:
        certificate_set = certs.generate(workdir)
        with backend(workdir, certificate_set) as backend_ports:
            runner = Runner(RunContext(workdir, certificate_set, backend_ports), budget)
            for row in rows:
                print(f"{row.name}: {row.title}", file=sys.stderr, flush=True)
                results.append((row, runner.run_row(row)))
    except KeyboardInterrupt:
        print("bench: interrupted; all processes stopped, partial results follow", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    info["elapsed_seconds"] = round(time.monotonic() - started, 1)
    print(report.render_markdown(info, results, mode))
    markdown_path, json_path = report.write(arguments.results_dir, info, results, mode)
    print(f"bench: wrote {markdown_path} and {json_path} ({info['elapsed_seconds']} s)", file=sys.stderr)
    return 0


def _tmpfs() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


if __name__ == "__main__":
    sys.exit(main())
