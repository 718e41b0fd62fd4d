"""The main job: ``python -m celery_outbox.demo --json`` on real parts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.celery_support import ROOT

pytestmark = pytest.mark.integration


def run_demo(*args: str) -> dict[str, object]:
    """Run the demo as a user would and return its JSON summary."""
    done = subprocess.run(
        [sys.executable, "-m", "celery_outbox.demo", "--json", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    assert "completed" in done.stderr  # progress went to stderr
    summary: dict[str, object] = json.loads(done.stdout)
    return summary


@pytest.mark.parametrize("broker", ["redis", "embedded"])
def test_demo_json_reports_every_event(redis_url: str, broker: str) -> None:
    """Every emitted event is completed or failed as intended; one retry completes."""
    url = redis_url if broker == "redis" else "embedded"
    summary = run_demo("--events", "50", "--broker", url)
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
