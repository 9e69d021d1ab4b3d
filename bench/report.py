"""The result table (Markdown, also printed) and the JSON record of one run."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from bench.rows import FOREIGN_LOAD_FLAG, Measurement, Metric, Row

COLUMNS = ("ingress-proxy", "haproxy", "nginx")
HEADINGS = {"ingress-proxy": "ingress-proxy", "haproxy": "HAProxy", "nginx": "nginx"}
FLAG_MARK = " (!)"

RowResults = Sequence[tuple[Row, Sequence[Measurement]]]


def _format(value: float, unit: str) -> str:
    if unit.startswith("ms"):
        return f"{value:.2f}"
    if unit.startswith("KiB"):
        return f"{value:.1f}"
    if unit.startswith("×"):
        return f"{value:.2f}×"
    return f"{value:,.0f}"


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or not theirs:
        return "n/a"
    return f"{ours / theirs:.2f}x"


def _table(results: RowResults, per_cpu: bool) -> list[str]:
    lines = [
        "| row | metric | " + " | ".join(HEADINGS[name] for name in COLUMNS)
        + " | ours/HAProxy | ours/nginx |",
        "|---|---|" + "---:|" * (len(COLUMNS) + 2),
    ]
    for row, measurements in results:
        by_proxy = {measurement.proxy: measurement for measurement in measurements}
        for metric in row.metrics:
            if per_cpu and not metric.per_cpu:
                continue
            lines.append(_table_line(row, metric, by_proxy, per_cpu))
    return lines


def _table_line(
    row: Row, metric: Metric, by_proxy: dict[str, Measurement], per_cpu: bool
) -> str:
    figures: dict[str, float | None] = {}
    cells = []
    for name in COLUMNS:
        measurement = by_proxy.get(name)
        source = None if measurement is None else (
            measurement.per_cpu if per_cpu else measurement.values
        )
        value = None if source is None else source.get(metric.key)
        figures[name] = value
        if value is None:
            cells.append("n/a")
        else:
            assert measurement is not None
            cells.append(_format(value, metric.unit) + (FLAG_MARK if measurement.flags else ""))
    label = metric.label + ("" if metric.higher_is_better else " (lower is better)")
    if per_cpu:
        label += " per proxy CPU-s"
    return (
        f"| {row.name} | {label} | " + " | ".join(cells) + " | "
        + _ratio(figures["ingress-proxy"], figures["haproxy"]) + " | "
        + _ratio(figures["ingress-proxy"], figures["nginx"]) + " |"
    )


def _details(results: RowResults) -> list[str]:
    lines = ["## How each row was measured, and what each proxy reported", ""]
    for row, measurements in results:
        lines.append(f"- **{row.name}** ({row.title}, key {row.settings.key_type}, "
                     f"resumption {'on' if row.settings.resumption else 'off'}, "
                     f"workers {row.settings.workers}): {row.method}")
        for measurement in measurements:
            lines.append(f"  - {HEADINGS[measurement.proxy]}: {_describe(measurement)}")
    return lines


def _describe(measurement: Measurement) -> str:
    if measurement.unavailable is not None:
        return f"n/a — {measurement.unavailable}"
    parts = []
    if measurement.proxy_cpu_percent is not None:
        parts.append(
            f"proxy CPU {measurement.proxy_cpu_percent:.0f} %, "
            f"core 0 busy {measurement.proxy_core_percent:.0f} %, "
            f"generator core {measurement.generator_core_percent:.0f} %"
        )
    parts.extend(measurement.notes)
    parts.extend(f"FLAG: {flag}" for flag in measurement.flags)
    if measurement.errors:
        parts.append("errors: " + ", ".join(f"{kind} {count}" for kind, count in measurement.errors.items()))
    return "; ".join(parts) if parts else "ok"


def _shared_machine_warning(results: RowResults) -> list[str]:
    measured = [m for _row, measurements in results for m in measurements if m.unavailable is None]
    shared = [m for m in measured if any(flag.startswith(FOREIGN_LOAD_FLAG) for flag in m.flags)]
    if not shared:
        return []
    return [
        f"**Shared machine:** in {len(shared)} of {len(measured)} measurements other processes "
        "used the proxy's core; those figures (p99 latency most of all) are noisy. Re-run on an "
        "idle machine for figures to quote; the per-CPU table below is the steadier comparison.",
        "",
    ]


def render_markdown(info: dict[str, object], results: RowResults, mode: str) -> str:
    versions = info["versions"]
    assert isinstance(versions, dict)
    lines = [
        f"# ingress-proxy side-by-side benchmark ({mode} run, {info['date']})",
        "",
        f"Machine: {info['cpu_model']}, {info['cpu_count']} cores, {info['memory_total']}, "
        f"kernel {info['kernel']}; commit {info['git_commit']}.",
        "Versions: " + "; ".join(f"{name}: {text}" for name, text in versions.items()) + ".",
        "Loopback only. Proxy under test pinned to core 0 (both cores for the -w2 rows); wrk / "
        "openssl s_time / the asyncio client, the backend nginx and the harness pinned to core 1. "
        f"A figure marked{FLAG_MARK} has a flag or errors listed below.",
        "",
        *_shared_machine_warning(results),
        *_table(results, per_cpu=False),
        "",
        "Per proxy CPU-second (figure ÷ the proxy's CPU share during the measurement; compares "
        "cost when the generator, not the proxy, was the limit):",
        "",
        *_table(results, per_cpu=True),
        "",
        *_details(results),
        "",
    ]
    return "\n".join(lines)


def to_json(info: dict[str, object], results: RowResults, mode: str) -> str:
    return json.dumps(
        {
            "mode": mode,
            "machine": info,
            "rows": [
                {
                    "name": row.name,
                    "title": row.title,
                    "settings": dataclasses.asdict(row.settings),
                    "method": row.method,
                    "metrics": [dataclasses.asdict(metric) for metric in row.metrics],
                    "measurements": [dataclasses.asdict(m) for m in measurements],
                }
                for row, measurements in results
            ],
        },
        indent=2,
    )


def write(results_dir: Path, info: dict[str, object], results: RowResults, mode: str) -> tuple[Path, Path]:
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = str(info["date"]).replace(":", "").replace("-", "").replace("+0000", "Z")
    markdown_path = results_dir / f"bench-{stamp}-{mode}.md"
    json_path = results_dir / f"bench-{stamp}-{mode}.json"
    markdown_path.write_text(render_markdown(info, results, mode))
    json_path.write_text(to_json(info, results, mode) + "\n")
    return markdown_path, json_path
