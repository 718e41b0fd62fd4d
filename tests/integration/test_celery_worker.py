"""The outbox with real parts: Redis broker, worker processes, beat, DynamoDB Local.

Each test starts ``celery worker -B`` on ``tests/integration/worker_app.py``
in a subprocess, with a queue and table of its own, and reads back what the
handlers recorded in Redis and what the table holds.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_outbox import Event, Outbox, Status
from tests.celery_support import Worker, start_worker, stop_worker, wait_for

pytestmark = pytest.mark.integration

StartWorker = Callable[..., Worker]


@pytest.fixture
def run_worker(
    ddb_local_endpoint: str, redis_url: str, queue_name: str, tmp_path: Path
) -> Iterator[StartWorker]:
    """Start workers for this test; every one is stopped and cleaned up after."""
    started: list[Worker] = []

    def start(**options: Any) -> Worker:
        options.setdefault("queue", f"{queue_name}-{len(started)}")
        worker = start_worker(
            endpoint_url=ddb_local_endpoint,
            redis_url=redis_url,
            folder=tmp_path,
            **options,
        )
        started.append(worker)
        return worker

    yield start
    for worker in started:
        log = worker.log_text()
        stop_worker(worker)
        # Shown by pytest when the test failed.
        print(f"--- worker log {worker.log.name} ---\n{log[-20000:]}")


def item(outbox: Outbox, event_id: str) -> dict[str, Any]:
    """The stored item of an event."""
    found = outbox.store.get_item(event_id)
    assert found is not None, f"event {event_id} is missing"
    return found


def settled(outbox: Outbox, event_id: str, status: Status) -> bool:
    """Whether the event has reached ``status``."""
    return outbox.store.status_of(event_id) is status


def test_500_events_complete_exactly_once(run_worker: StartWorker) -> None:
    """500 events with business items, two workers each with its own beat: each once."""
    worker = run_worker(pool="prefork", concurrency=2)
    queue = worker.calls_key.rsplit(":", 1)[0]
    # A second worker with a second beat, on the same queue and table.
    table = worker.outbox.store.table
    second = run_worker(pool="threads", concurrency=4, queue=queue, table=table)
    assert second.calls_key == worker.calls_key
    outbox = worker.outbox
    emitted: list[Event] = []
    for batch in range(50):
        with outbox.transaction() as tx:
            for n in range(10):
                order = f"order-{batch:02d}-{n}"
                tx.put(outbox.store.table, {"id": order, "kind": "order", "n": n})
                emitted.append(outbox.emit("it.ok", {"order": order}))
    ids = {e.id for e in emitted}
    assert len(ids) == 500

    def all_completed() -> bool:
        counts = outbox.store.stats().counts
        return counts["completed"] == 500 and counts["created"] == 0

    wait_for(all_completed, timeout_s=240, what="500 completions")
    counts = outbox.store.stats().counts
    assert counts == {"created": 0, "active": 0, "completed": 500, "failed": 0}
    calls = worker.calls()
    assert sorted(c["id"] for c in calls) == sorted(ids)  # each id exactly once
    assert {c["attempt"] for c in calls} == {1}
    assert {c["task_id"] for c in calls} == {f"outbox:{i}:1" for i in ids}
    assert len({c["pid"] for c in calls}) >= 1
    for event in emitted[::50]:
        stored = item(outbox, event.id)
        assert stored["retryCount"]["N"] == "0"
        assert "completedOn" in stored


def test_retries_failures_and_celery_retries(run_worker: StartWorker) -> None:
    """Failing twice completes after backoffs; always failing ends failed."""
    worker = run_worker(pool="prefork", concurrency=2, backoff_ms=500, max_retries=2)
    outbox = worker.outbox
    flaky = outbox.emit("it.flaky", {"order": "o-1"})
    broken = outbox.emit("it.broken", {"order": "o-2"})
    retrying = outbox.emit("it.retry", {"order": "o-3"})
    autoretrying = outbox.emit("it.autoretry", {"order": "o-4"})

    wait_for(lambda: settled(outbox, flaky.id, Status.COMPLETED), what="flaky done")
    wait_for(lambda: settled(outbox, broken.id, Status.FAILED), what="broken failed")
    for event in (retrying, autoretrying):
        wait_for(
            lambda e=event: settled(outbox, e.id, Status.COMPLETED), what=event.type
        )

    # Failing twice, then succeeding: retry count 2, backoff honoured.
    stored = item(outbox, flaky.id)
    assert stored["retryCount"]["N"] == "2"
    calls = worker.calls_of(flaky.id)
    assert [c["attempt"] for c in calls] == [1, 2, 3]
    assert [c["retries"] for c in calls] == [0, 1, 2]
    assert [c["task_id"] for c in calls] == [
        f"outbox:{flaky.id}:{n}" for n in (1, 2, 3)
    ]
    # Equal jitter: retry n waits at least half of 500 ms * 2**(n-1).
    assert calls[1]["at_ms"] - calls[0]["at_ms"] >= 250
    assert calls[2]["at_ms"] - calls[1]["at_ms"] >= 500

    # Always failing: failed after max_retries (2) retries, with its error.
    stored = item(outbox, broken.id)
    assert stored["retryCount"]["N"] == "3"
    assert stored["lastError"]["S"] == "ValueError: broken handler cannot take o-2"
    assert [c["attempt"] for c in worker.calls_of(broken.id)] == [1, 2, 3]
    (failed,) = [f for f in outbox.store.failed().events if f.event.id == broken.id]
    assert failed.retry_count == 3

    # self.retry(countdown=0.3) waited in DynamoDB, then ran as attempt 2.
    calls = worker.calls_of(retrying.id)
    assert [(c["attempt"], c["retries"]) for c in calls] == [(1, 0), (2, 1)]
    assert calls[1]["at_ms"] - calls[0]["at_ms"] >= 300
    assert item(outbox, retrying.id)["retryCount"]["N"] == "1"

    # autoretry_for went through the outbox as well.
    calls = worker.calls_of(autoretrying.id)
    assert [c["attempt"] for c in calls] == [1, 2]
    assert "Retry in" in worker.log_text() or "retry:" in worker.log_text()

    # Celery 5 shows the message headers both as request attributes and in
    # request.headers; the handlers saw the event's id in both.
    for call in worker.calls():
        assert call["header_event_id"] == call["id"]
        assert call["attribute_event_id"] == call["id"]


@pytest.mark.parametrize("write_mode", ["item", "partiql"])
def test_killed_worker_child_fails_the_attempt_at_once(
    run_worker: StartWorker, write_mode: str
) -> None:
    """SIGKILL mid-task: the main process fails the attempt, counted, at once.

    In partiql mode the handler started before its start mark was written
    (a deferred start); the mark lands while the handler runs, and the
    main process's report does not depend on it. The report fails only a
    start of its own delivery (``runningBy``), so it succeeding here shows
    the main process and the child agree on the delivery's name.
    """
    worker = run_worker(
        pool="prefork",
        concurrency=1,
        timeout_ms=20_000,
        extra_env={"OUTBOX_IT_WRITE_MODE": write_mode},
    )
    outbox = worker.outbox
    event = outbox.emit("it.stuck", {"order": "o-9"})
    (first,) = wait_for(lambda: worker.calls_of(event.id), what="attempt 1 to start")
    leased = wait_for(
        lambda: (found := item(outbox, event.id)).get("runningSince") and found,
        what="the start mark",
    )
    assert leased["status"]["S"] == "active"
    # The child marks the start with the name its main process gave this
    # delivery; the main process's report below is refused for any other.
    assert len(leased["runningBy"]["S"]) == 32
    deadline_ms = int(leased["gsiSortKey"]["N"])

    os.kill(first["pid"], signal.SIGKILL)
    wait_for(
        lambda: settled(outbox, event.id, Status.COMPLETED),
        timeout_s=60,
        what="the retry and its completion",
    )
    calls = worker.calls_of(event.id)
    assert [c["attempt"] for c in calls] == [1, 2]
    assert calls[1]["pid"] != first["pid"]
    # Retried after the backoff, not after the lease ran out.
    assert calls[1]["at_ms"] < deadline_ms
    stored = item(outbox, event.id)
    assert stored["retryCount"]["N"] == "1"  # the lost attempt counted
    assert stored["lastError"]["S"].startswith("WorkerLost")
    assert worker.alive()


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_write_back_on_other_pools(run_worker: StartWorker, pool: str) -> None:
    """The threads and solo pools complete, retry and fail events as prefork does."""
    worker = run_worker(pool=pool, concurrency=4, backoff_ms=200)
    outbox = worker.outbox
    ok = [outbox.emit("it.ok", {"order": f"o-{n}"}) for n in range(5)]
    flaky = outbox.emit("it.flaky", {"order": "o-6"})
    retrying = outbox.emit("it.retry", {"order": "o-7"})
    broken = outbox.emit("it.broken", {"order": "o-8"})
    for event in [*ok, flaky, retrying]:
        wait_for(
            lambda e=event: settled(outbox, e.id, Status.COMPLETED), what=event.type
        )
    wait_for(lambda: settled(outbox, broken.id, Status.FAILED), what="broken failed")
    assert [c["attempt"] for c in worker.calls_of(flaky.id)] == [1, 2, 3]
    assert item(outbox, flaky.id)["retryCount"]["N"] == "2"
    assert item(outbox, retrying.id)["retryCount"]["N"] == "1"
    assert item(outbox, broken.id)["retryCount"]["N"] == "3"
    assert {c["pid"] for c in worker.calls()} == {worker.calls()[0]["pid"]}
    for call in worker.calls():
        assert call["header_event_id"] == call["attribute_event_id"] == call["id"]


def test_worker_refuses_settings_that_run_events_twice(
    run_worker: StartWorker,
) -> None:
    """A visibility timeout shorter than the lease stops the worker at start."""
    worker = run_worker(timeout_ms=30_000, extra_env={"OUTBOX_IT_VISIBILITY_S": "20"})
    wait_for(lambda: not worker.alive(), timeout_s=60, what="the worker to exit")
    assert worker.proc.returncode != 0
    log = worker.log_text()
    assert "Outbox start-up check: error: broker_transport_options" in log
    assert "visibility_timeout of 20 s" in log
    assert worker.calls() == []


@pytest.mark.parametrize("write_mode", ["item", "partiql"])
def test_a_requeued_message_does_not_run_under_its_failed_lease(
    run_worker: StartWorker, write_mode: str
) -> None:
    """acks_late + reject_on_worker_lost: the broker delivers the lost message again.

    The main process fails the lost attempt (the lease is gone) and Celery
    requeues the same message. That copy must not run the handler: its lease
    was written back. The next attempt comes from the drain, after the backoff.
    """
    worker = run_worker(
        pool="prefork",
        concurrency=1,
        timeout_ms=20_000,
        backoff_ms=3_000,
        extra_env={"OUTBOX_IT_WRITE_MODE": write_mode},
    )
    outbox = worker.outbox
    event = outbox.emit("it.requeued", {"order": "o-requeued"})
    wait_for(
        lambda: settled(outbox, event.id, Status.COMPLETED),
        timeout_s=60,
        what="the retry and its completion",
    )
    calls = worker.calls_of(event.id)
    stored = item(outbox, event.id)
    assert stored["retryCount"]["N"] == "1"  # the lost attempt counted
    # Attempt 1 ran once (and was lost); its requeued copy was refused.
    assert [c["attempt"] for c in calls] == [1, 2]


@pytest.mark.parametrize("write_mode", ["item", "partiql"])
def test_hard_time_limit_fails_the_attempt_once(
    run_worker: StartWorker, write_mode: str
) -> None:
    """A child killed for its hard time limit: one failed attempt, reported at once."""
    worker = run_worker(
        pool="prefork",
        concurrency=1,
        timeout_ms=5_000,  # it.stuck's time limit: 4 s, then it sleeps 9 s
        backoff_ms=200,
        extra_env={"OUTBOX_IT_WRITE_MODE": write_mode},
    )
    outbox = worker.outbox
    event = outbox.emit("it.stuck", {"order": "o-limit"})
    wait_for(
        lambda: settled(outbox, event.id, Status.COMPLETED),
        timeout_s=90,
        what="the retry and its completion",
    )
    calls = worker.calls_of(event.id)
    assert [c["attempt"] for c in calls] == [1, 2]
    stored = item(outbox, event.id)
    assert stored["retryCount"]["N"] == "1"
    assert stored["lastError"]["S"].startswith("WorkerLost: TimeLimitExceeded")
    assert "Hard time limit" in worker.log_text()


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_a_warm_shutdown_writes_the_buffered_completions(
    run_worker: StartWorker, pool: str
) -> None:
    """partiql: completions still buffered when the worker stops are written.

    The flush interval outlasts the test: only the shutdown flush
    (``worker_process_shutdown`` in a prefork child, ``worker_shutdown``
    otherwise) can write them.
    """
    env = {"OUTBOX_IT_WRITE_MODE": "partiql", "OUTBOX_IT_FLUSH_MS": "25000"}
    worker = run_worker(pool=pool, concurrency=2, extra_env=env)
    outbox = worker.outbox
    events = [outbox.emit("it.ok", {"order": f"o-{n}"}) for n in range(3)]
    wait_for(lambda: len(worker.calls()) >= 3, what="three handler calls")
    os.kill(worker.proc.pid, signal.SIGTERM)  # a warm shutdown
    worker.proc.wait(20)
    for event in events:
        assert settled(outbox, event.id, Status.COMPLETED), event.id
