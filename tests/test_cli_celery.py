"""The real ``celery -A app outbox ...`` command, in subprocesses, on DynamoDB Local.

Each sub-command runs through Celery's own command line (the ``celery.commands``
entry point) with the test app in ``tests/ops_app.py``, including bad
arguments, and the exit codes documented in ``celery_outbox.cli`` are checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_outbox import Event, OutboxConfig, OutboxStore, Status

pytestmark = pytest.mark.integration

TESTS = Path(__file__).parent


class Runner:
    """Runs ``celery -A ops_app outbox ...`` for one table."""

    def __init__(self, endpoint: str, table: str) -> None:
        self.table = table
        self.env = {
            **os.environ,
            "OPS_TABLE": table,
            "OPS_ENDPOINT": endpoint,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])
            ),
        }
        self.store = OutboxStore(
            OutboxConfig(table_name=table, endpoint_url=endpoint, completion="keep")
        )

    def __call__(
        self, *args: str, stdin: str = "", **env: str
    ) -> subprocess.CompletedProcess[str]:
        """Run the command; stdin is empty, as in a cron job."""
        return subprocess.run(
            [sys.executable, "-m", "celery", "-A", "ops_app", "outbox", *args],
            env={**self.env, **env},
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def failed_events(self, *events: Event) -> None:
        """Publish ``events`` and move each to ``failed``."""
        self.store.publish(list(events))
        for lease in self.store.claim().leases:
            self.store.fail(lease, "RuntimeError: card declined", final=True)


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single error line of a failed command (no traceback)."""
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture
def run(ddb_local_endpoint: str) -> Iterator[Runner]:
    """A runner for a fresh table on DynamoDB Local (created by the test)."""
    runner = Runner(ddb_local_endpoint, f"cli-{uuid.uuid4().hex[:10]}")
    yield runner
    runner.store.delete_table()


@pytest.fixture
def ready(run: Runner) -> Runner:
    """A runner whose table exists."""
    run.store.create_table()
    return run


def test_outbox_is_a_celery_command(run: Runner) -> None:
    """`celery outbox --help` lists the sub-commands; an unknown one exits 2."""
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for name in ("failed", "retry", "stats", "create-table", "check", "iam-policy"):
        assert name in result.stdout
    assert run("nope").returncode == 2


def test_check_and_create_table(run: Runner) -> None:
    """check fails on a missing table; create-table makes it; check then passes."""
    missing = run("check")
    assert missing.returncode == 3
    assert f"PROBLEM: table {run.table!r} does not exist" in missing.stderr
    created = run("create-table")
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith(f"Created table {run.table!r}")
    again = run("create-table")
    assert again.returncode == 0 and "already exists" in again.stdout
    ok = run("check")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK:")


def test_check_time_limit_against_the_lease(ready: Runner) -> None:
    """A handler time limit above the lease is a problem: exit code 3."""
    result = ready("check", OPS_TIME_LIMIT="100")
    assert result.returncode == 3
    problem = result.stderr.splitlines()[0]
    assert problem.startswith("PROBLEM:")
    assert "order.created" in problem and "time_limit" in problem
    assert "100" in problem


def test_missing_table_is_one_line(run: Runner) -> None:
    """A command on a missing table exits with 1 and one line, no traceback."""
    result = run("stats")
    assert result.returncode == 1
    assert one_error(result).startswith("Error: ")
    assert run.table in one_error(result)


def test_failed(ready: Runner) -> None:
    """failed lists failed events as a table or JSON; bad arguments exit 2."""
    one = Event.new("order.created", {"email": "alice@example.com"})
    two = Event.new("order.paid", {"email": "bob@example.com"})
    ready.failed_events(one, two)
    table = ready("failed")
    assert table.returncode == 0, table.stderr
    rows = table.stdout.splitlines()[1:]
    assert sorted(r.split()[0] for r in rows) == sorted([one.id, two.id])
    assert "alice" not in table.stdout
    data = json.loads(ready("failed", "--json", "--type", "order.paid").stdout)
    assert [e["id"] for e in data["events"]] == [two.id]
    assert data["events"][0]["last_error"] == "RuntimeError: card declined"
    assert ready("failed", "--limit", "0").returncode == 2
    bad_cursor = ready("failed", "--cursor", "junk")
    assert bad_cursor.returncode == 2
    assert one_error(bad_cursor).startswith("Error: ")
    assert "cursor" in one_error(bad_cursor) and "junk" in one_error(bad_cursor)


def test_retry(ready: Runner) -> None:
    """retry asks first, retries by type with --yes, and reports unknown ids."""
    one, two = Event.new("order.created"), Event.new("order.paid")
    ready.failed_events(one, two)
    unconfirmed = ready("retry", one.id)
    assert unconfirmed.returncode == 4
    assert ready.store.status_of(one.id) is Status.FAILED
    by_type = ready("retry", "--all-failed", "--type", "order.paid", "--yes")
    assert by_type.returncode == 0, by_type.stderr
    assert by_type.stdout.strip() == "Retried 1 events."
    assert ready.store.status_of(two.id) is Status.CREATED
    assert ready.store.status_of(one.id) is Status.FAILED
    partial = ready("retry", "--yes", one.id, "no-such-event")
    assert partial.returncode == 3
    assert "Not found: no-such-event" in partial.stderr
    assert ready.store.status_of(one.id) is Status.CREATED
    assert ready("retry", "--yes").returncode == 2


def test_stats(ready: Runner) -> None:
    """stats --json counts events per status."""
    ready.failed_events(Event.new("order.created"))
    ready.store.publish([Event.new("order.created")])
    result = ready("stats", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["counts"] == {"created": 1, "active": 0, "completed": 0, "failed": 1}
    assert data["due"] == 1


def test_iam_policy(run: Runner) -> None:
    """iam-policy prints JSON for the app's table; a bad account exits 2."""
    result = run("iam-policy", "--region", "eu-west-1", "--account", "123456789012")
    assert result.returncode == 0, result.stderr
    statements = json.loads(result.stdout)["Statement"]
    assert statements[0]["Resource"] == (
        f"arn:aws:dynamodb:eu-west-1:123456789012:table/{run.table}"
    )
    assert run("iam-policy", "--account", "12").returncode == 2


def test_console_script(ready: Runner) -> None:
    """The celery-outbox script runs the same commands with -A."""
    script = shutil.which("celery-outbox", path=str(Path(sys.executable).parent))
    assert script is not None
    result = subprocess.run(
        [script, "-A", "ops_app", "stats", "--json"],
        env=ready.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["due"] == 0
