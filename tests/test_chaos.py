"""The reduced chaos run: a few hundred events through everything going wrong.

It runs ``chaos/run.py`` as a script, the way ``docs/reliability.md`` shows,
with DynamoDB Local and a Redis of its own (never the shared one), and
checks the promises the full run's figures are about.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(program: str) -> None:
    """Skip on a laptop without ``program``; under CI, fail."""
    if shutil.which(program) is None:
        message = f"the chaos run needs {program} on PATH"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("write_mode", ["item", "partiql"])
def test_reduced_chaos_run(write_mode: str) -> None:
    """No event is lost or left pending, and every duplicate has a cause."""
    need("java")
    need("redis-server")
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "chaos" / "run.py"),
            "--json",
            "--events",
            "300",
            "--rate",
            "15",
            "--kill-every-s",
            "1",
            "--settle-s",
            "300",
            "--write-mode",
            write_mode,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert done.stdout, done.stderr[-3000:]
    figures = json.loads(done.stdout)
    assert figures["problems"] == [], "\n".join(
        [
            *figures["problems"],
            f"diagnosis: {figures.get('pending_diagnosis')}",
            *figures.get("pending_log", []),
        ]
    )
    assert done.returncode == 0

    assert figures["emitted"] == 300
    assert figures["lost"] == 0
    assert figures["pending"] == 0
    assert figures["completed"] + figures["failed"] == 300
    assert figures["failed_without_running"] == 0
    # Poison events fail; a killed attempt counts too, so a few more may.
    assert figures["failed"] >= figures["poison_events"]

    # Every duplicate invocation is explained by an interrupted attempt.
    reasons = figures["duplicates_by_reason"]
    assert sum(reasons.values()) == figures["duplicate_invocations"]
    assert not [r for r in reasons if r.startswith("unexplained")]
    assert figures["overlapping_leases"] == 0

    # The chaos did happen.
    assert figures["worker_children_killed"] > 0
    assert figures["redis_restarts"] == 1
    assert sum(figures["faults"].values()) > 0
    assert figures["invocations"] >= figures["completed"]
