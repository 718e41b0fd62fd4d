"""Markdown tables of benchmark results, side by side, for docs/performance.md.

    python benchmarks/tables.py NAME=results.json [NAME=results.json ...]

Each file is what ``benchmarks/run.py --json`` printed; the tables show the
medians, one column per file, so that the documentation quotes the files
exactly. A figure a file does not have (an older benchmark) shows as ``-``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = tuple[str, Callable[[dict[str, Any]], Any], str]


def _get(*path: str) -> Callable[[dict[str, Any]], Any]:
    def read(median: dict[str, Any]) -> Any:
        value: Any = median
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value

    return read


def _cpu(side: str, key: str) -> Callable[[dict[str, Any]], Any]:
    def read(median: dict[str, Any]) -> Any:
        cpu = _get("e2e", side, key)(median)
        if not cpu:
            return None
        parts = [cpu.get(k) for k in ("dynamodb_local", "worker", "producer")]
        if any(p is None for p in parts):
            return None
        return " / ".join(f"{p:.2f}" for p in parts)

    return read


ROWS: list[Row] = [
    ("emit, single `emit` (events/s)", _get("emit", "single", "events_per_s"), ".1f"),
    ("emit, `publish` of 25 (events/s)", _get("emit", "batch", "events_per_s"), ".1f"),
    ("emit, `publish_each` of 25 (events/s)", _get("emit", "each", "events_per_s"),
     ".1f"),
    (
        "emit, business transaction (events/s)",
        _get("emit", "transaction", "events_per_s"),
        ".1f",
    ),
    ("end to end, bare Celery (tasks/s)", _get("e2e", "bare", "tasks_per_s"), ".1f"),
    ("end to end, outbox (events/s)", _get("e2e", "outbox", "events_per_s"), ".1f"),
    ("**throughput ratio**", _get("e2e", "ratio"), ".3f"),
    ("ratio of app CPU per event (DynamoDB's work left out)",
     _get("e2e", "app_cpu_ratio"), ".3f"),
    (
        "**requests per event**, emit to completion",
        _get("e2e", "outbox", "per_event", "requests"),
        ".3f",
    ),
    (
        "**requests per event, single emits**",
        _get("e2e", "outbox", "single_emit_requests"),
        ".3f",
    ),
    ("write units per event", _get("e2e", "outbox", "per_event", "wcu"), ".2f"),
    ("CPU ms per bare task (DynamoDB Local / worker / producer)",
     _cpu("bare", "cpu_ms_per_task"), "s"),
    ("CPU ms per event (DynamoDB Local / worker / producer)",
     _cpu("outbox", "cpu_ms_per_event"), "s"),
    ("latency p50, bare Celery (ms)", _get("latency", "bare", "p50_ms"), ".1f"),
    ("**latency p50, no nudge** (ms)", _get("latency", "outbox", "p50_ms"), ".1f"),
    ("latency p99, no nudge (ms)", _get("latency", "outbox", "p99_ms"), ".1f"),
    ("**latency p50, nudge** (ms)", _get("latency", "outbox_nudge", "p50_ms"), ".1f"),
    ("latency p99, nudge (ms)", _get("latency", "outbox_nudge", "p99_ms"), ".1f"),
]  # fmt: skip


def table(columns: list[tuple[str, dict[str, Any]]]) -> str:
    """One Markdown table: a row per figure, a column per result."""
    lines = [
        "| figure | " + " | ".join(name for name, _ in columns) + " |",
        "| --- |" + " ---: |" * len(columns),
    ]
    for label, read, form in ROWS:
        cells = []
        for _, median in columns:
            value = read(median)
            cells.append("-" if value is None else format(value, form))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the table of the given results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="NAME=path/to/result.json")
    args = parser.parse_args(argv)
    columns = []
    for spec in args.results:
        name, _, path = spec.partition("=")
        data = json.loads(Path(path or name).read_text())
        columns.append((name if path else Path(name).stem, data.get("median", data)))
    print(table(columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
