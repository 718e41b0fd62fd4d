"""The main job: ``celery-outbox demo --json`` on real parts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.celery_support import ROOT

pytestmark = pytest.mark.integration


# The console script of this environment, and the module form.
CONSOLE = [str(Path(sys.executable).with_name("celery-outbox")), "demo"]
MODULE = [sys.executable, "-m", "celery_outbox.demo"]


def run_demo(command: list[str], *args: str) -> dict[str, object]:
    """Run the demo as a user would and return its JSON summary."""
    done = subprocess.run(
        [*command, "--json", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    assert "completed" in done.stderr  # progress went to stderr
    summary: dict[str, object] = json.loads(done.stdout)
    return summary


@pytest.mark.parametrize(
    ("command", "broker"), [(CONSOLE, "redis"), (MODULE, "embedded")]
)
def test_demo_json_reports_every_event(
    redis_url: str, command: list[str], broker: str
) -> None:
    """Every emitted event is completed or failed as intended; one retry completes."""
    url = redis_url if broker == "redis" else "embedded"
    summary = run_demo(command, "--events", "50", "--broker", url)
    assert summary["ok"] is True
    assert summary["emitted"] == 50
    # Order 20 of 25 is exported to the offline ERP: that one event fails.
    assert summary["failed"] == 1
    assert summary["completed"] == 49
    failed = summary["failed_events"]
    assert isinstance(failed, list)
    assert failed[0]["type"] == "order.exported"
    assert failed[0]["retry_count"] == 3
    assert failed[0]["last_error"].startswith("ERPUnavailable: ERP rejected order")
    assert summary["operator_retry"] == {
        "id": failed[0]["id"],
        "retried": True,
        "outcome": "completed",
    }
    assert isinstance(summary["events_per_s"], float)
    assert summary["broker"] == (url if broker == "redis" else "filesystem://")
