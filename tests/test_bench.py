"""A small run of the benchmark: it produces every figure (values unchecked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def numbers(tree: Any, path: str = "") -> dict[str, Any]:
    """Every leaf of ``tree`` by its dotted path."""
    if isinstance(tree, dict):
        found: dict[str, Any] = {}
        for key, value in tree.items():
            found.update(numbers(value, f"{path}.{key}" if path else key))
        return found
    return {path: tree}


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["item", "partiql"])
def test_quick_run_produces_every_figure(
    ddb_local_endpoint: str, redis_url: str, mode: str
) -> None:
    """``run.py --quick --json`` reports every figure, as medians and per run."""
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--json",
            "--endpoint",
            ddb_local_endpoint,
            "--broker",
            redis_url,
            "--outbox",
            f"write_mode={mode}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    median = result["median"]
    assert len(result["runs"]) == 1
    assert set(median["emit"]) == {"single", "batch", "each", "transaction"}
    for figures in median["emit"].values():
        assert figures["events_per_s"] > 0 and figures["requests"] > 0
    e2e = median["e2e"]
    assert e2e["bare"]["tasks_per_s"] > 0 and e2e["outbox"]["events_per_s"] > 0
    assert e2e["ratio"] > 0
    per_event = e2e["outbox"]["per_event"]
    assert per_event["requests"] > 0 and per_event["wcu"] > 0
    assert per_event["requests_by_operation"]
    assert e2e["outbox"]["worker_per_event"]["requests"] > 0
    if mode == "partiql":
        assert "BatchExecuteStatement" in per_event["requests_by_operation"]
    else:
        assert "UpdateItem" in per_event["requests_by_operation"]
    assert e2e["outbox"]["cpu_ms_per_event"]["worker"] is not None
    assert e2e["app_cpu_ratio"] > 0
    for name in ("bare", "outbox", "outbox_nudge"):
        latency = median["latency"][name]
        assert 0 < latency["p50_ms"] <= latency["p99_ms"]
    assert all(v is not None for k, v in numbers(median).items() if "cpu" not in k)
    from benchmarks.tables import ROWS, table

    rows = table([(mode, median)]).splitlines()[2:]
    assert len(rows) == len(ROWS)
    # Every figure is shown, but DynamoDB Local's CPU: the suite's runs on a
    # process the benchmark did not start, whose CPU it does not read.
    missing = [row for row in rows if row.endswith("| - |") and "CPU ms" not in row]
    assert not missing


def test_tables_show_missing_figures_as_dashes() -> None:
    """An older result without a figure shows ``-`` in that figure's row."""
    from benchmarks.tables import table

    text = table([("old", {"e2e": {"ratio": 0.25}}), ("new", {"e2e": {"ratio": 0.5}})])
    assert "| **throughput ratio** | 0.250 | 0.500 |" in text
    assert "| end to end, outbox (events/s) | - | - |" in text
