"""Flower as the outbox's retry button, with a real worker, beat and Redis.

A worker (with embedded beat) drains a real DynamoDB Local table through the
Redis broker; a Flower process watches it. The handler fails while a flag
file exists, so the event ends ``failed``. Through Flower's HTTP API the test
finds the handler task (its id names the event and attempt; its arguments
show the payload's keys, not its values), then runs
``celery_outbox.retry_failed`` with ``task/async-apply``; the event then
completes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests

from celery_outbox import Event, OutboxConfig, OutboxStore, Status
from celery_outbox.testing import free_port

pytestmark = pytest.mark.integration

TESTS = Path(__file__).parent.parent
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], deadline_s: float = 120) -> T:
    """Poll ``probe`` until it returns something truthy; fail after the deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        found = probe()
        if found:
            return found
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


class Process:
    """A child process in its own session, logging to a file, stopped by id."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                args,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> None:
        """Fail with the process's log if it has exited."""
        if self.proc.poll() is not None:
            pytest.fail(f"{self.log.name} exited:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """Stop the process and the children it started (beat)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture
def services(
    ddb_local_endpoint: str, redis_url: str, queue_name: str, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    """A table, a worker with beat, and Flower, all for this test alone."""
    table = f"flower-{uuid.uuid4().hex[:10]}"
    config = OutboxConfig(
        table_name=table, endpoint_url=ddb_local_endpoint, completion="keep"
    )
    store = OutboxStore(config)
    store.create_table()
    flag = tmp_path / "fail"
    flag.touch()
    port = free_port()
    env = {
        **os.environ,
        "OPS_TABLE": table,
        "OPS_ENDPOINT": ddb_local_endpoint,
        "OPS_BROKER": redis_url,
        "OPS_BACKEND": redis_url,
        "OPS_QUEUE": queue_name,
        "OPS_FAIL_FLAG": str(flag),
        "PYTHONPATH": str(TESTS),
        "FLOWER_UNAUTHENTICATED_API": "true",
    }
    celery = [sys.executable, "-m", "celery", "-A", "ops_app"]
    worker = Process(
        [
            *celery,
            "worker",
            "-B",
            "-s",
            str(tmp_path / "beat"),
            "-P",
            "solo",
            "-E",
            "-Q",
            queue_name,
            "-n",
            f"{queue_name}@%h",
            "-l",
            "INFO",
        ],
        env,
        tmp_path / "worker.log",
    )
    flower = Process(
        [*celery, "flower", f"--port={port}", "--address=127.0.0.1"],
        env,
        tmp_path / "flower.log",
    )
    try:
        yield {
            "store": store,
            "flag": flag,
            "flower": f"http://127.0.0.1:{port}",
            "worker": worker,
            "processes": [worker, flower],
            "handler": "ops_app.order_created",
        }
    finally:
        worker.stop()
        flower.stop()
        store.delete_table()


def get_json(url: str, **params: Any) -> Any:
    """GET ``url`` and decode its JSON, or None while the server is not up."""
    try:
        response = requests.get(url, params=params, timeout=10)
    except requests.ConnectionError:
        return None
    response.raise_for_status()
    return response.json()


def test_flower_shows_the_event_and_retries_it(services: dict[str, Any]) -> None:
    """Flower lists the failed handler task by event; its retry task revives it."""
    store: OutboxStore = services["store"]
    flower: str = services["flower"]
    event = Event.new("order.created", {"email": "alice@example.com", "total": 30.4})
    store.publish([event])

    def status() -> Status | None:
        for process in services["processes"]:
            process.alive()
        return store.status_of(event.id)

    wait_for("the event to fail", lambda: status() is Status.FAILED)

    task_id = f"outbox:{event.id}:1"

    def handler_task() -> dict[str, Any] | None:
        tasks = get_json(f"{flower}/api/tasks", taskname=services["handler"]) or {}
        task: dict[str, Any] | None = tasks.get(task_id)
        return task if task and task.get("state") == "FAILURE" else None

    task = wait_for("Flower to list the failed handler task", handler_task)
    assert event.id in task["args"] and "'attempt': 1" in task["args"]
    assert "'email': '<str>'" in task["args"]
    assert "alice@example.com" not in task["args"]

    services["flag"].unlink()  # the cause is fixed: the handler succeeds now
    response = requests.post(
        f"{flower}/api/task/async-apply/celery_outbox.retry_failed",
        json={"kwargs": {"type": "order.created"}},
        timeout=10,
    )
    response.raise_for_status()
    retry_id = response.json()["task-id"]

    def retry_result() -> dict[str, Any] | None:
        found = get_json(f"{flower}/api/task/result/{retry_id}")
        return found if found and found.get("state") == "SUCCESS" else None

    result = wait_for("the retry task's result", retry_result)["result"]
    assert result == {"retried": [event.id], "missing": [], "not_failed": []}
    wait_for("the event to complete", lambda: status() is Status.COMPLETED)

    # The retried attempt is a task of its own: the failed one stays listed.
    def task_states() -> dict[str, Any] | None:
        tasks = get_json(f"{flower}/api/tasks", taskname=services["handler"]) or {}
        states = {i: t.get("state") for i, t in tasks.items() if event.id in i}
        return states if states.get(f"{task_id}:retry1") == "SUCCESS" else None

    states = wait_for("Flower to list the retried attempt", task_states)
    assert states == {task_id: "FAILURE", f"{task_id}:retry1": "SUCCESS"}

    log = services["worker"].log.read_text()
    assert f"Event {event.id!r} (order.created) attempt 1 failed: RuntimeError" in log
    assert "Drained outbox" in log and "claimed 1" in log
