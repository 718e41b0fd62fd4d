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
    assert "attempt" not in failed[0]  # failed: no next attempt to name
    assert summary["operator_retry"] == {
        "id": failed[0]["id"],
        "retried": True,
        "outcome": "completed",
        "after": {"completed": 50, "failed": 0},
    }
    assert isinstance(summary["events_per_s"], float)
    assert summary["broker"] == (url if broker == "redis" else "filesystem://")


def test_demo_without_failures_retries_nothing(redis_url: str) -> None:
    """Too few orders to reach the offline ERP: no failed event to retry."""
    done = subprocess.run(
        [*CONSOLE, "--events", "5", "--broker", redis_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    assert "Operator" not in done.stderr + done.stdout
    assert "Every event ended as intended." in done.stdout


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("bogus://x", "No such transport: bogus"),
        ("redis://127.0.0.1:1/0", "Connection refused"),
    ],
)
def test_demo_names_a_broker_it_cannot_reach(url: str, reason: str) -> None:
    """A wrong or unreachable broker fails at once with kombu's reason."""
    done = subprocess.run(
        [*CONSOLE, "--broker", url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"cannot reach the broker {url}" in done.stderr
    assert reason in done.stderr
    assert "Starting a Celery worker" not in done.stderr
