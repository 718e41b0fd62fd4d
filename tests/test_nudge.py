"""The nudge and follow-up drains: sooner drains than the next beat tick."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_outbox import Event, Outbox, OutboxConfig, Status
from celery_outbox import nudge as nudges
from celery_outbox.nudge import HEADER_NUDGE, Nudger, follow_up

ROOT = Path(__file__).resolve().parent.parent


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    """Poll ``condition`` until it holds, failing after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


class FakeTask:
    """Records apply_async calls instead of sending them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def apply_async(self, args: Any = (), **options: Any) -> None:
        self.calls.append((tuple(args or ()), options))


class FakeOutbox:
    """What the nudger and follow-ups read from an outbox."""

    def __init__(self, **options: Any) -> None:
        self.config = OutboxConfig(**options)
        self.drain_task = FakeTask("celery_outbox.drain")
        self.claim_task = FakeTask(nudges.NUDGE_TASK)
        self.more_task = FakeTask(nudges.FOLLOW_UP_TASK)
        nudges._nudge_tasks[id(self)] = self.claim_task
        nudges._follow_up_tasks[id(self)] = self.more_task


class TestFollowUp:
    """When a drain is followed by another."""

    def test_a_full_batch_continues_at_once(self) -> None:
        """After a full batch the next drain runs without delay."""
        outbox: Any = FakeOutbox(batch_size=50)
        plan = follow_up(outbox, 50, until_ms=None, nudged=False, now_ms=1000)
        assert plan == (0.0, 2000)

    def test_a_partial_batch_continues_after_the_busy_interval(self) -> None:
        """After a partial batch the next drain waits busy_poll_interval_ms."""
        outbox: Any = FakeOutbox(busy_poll_interval_ms=100)
        plan = follow_up(outbox, 3, until_ms=1500, nudged=False, now_ms=1000)
        assert plan == (0.1, 1500)

    @pytest.mark.parametrize(
        ("claimed", "until", "nudged", "options"),
        [
            (0, None, False, {}),
            (5, None, True, {}),
            (5, 1050, False, {}),
            (5, None, False, {"busy_poll_interval_ms": 0}),
        ],
    )
    def test_chains_end(
        self, claimed: int, until: int | None, nudged: bool, options: dict[str, Any]
    ) -> None:
        """Nothing claimed, a nudged drain, a chain past its end, or turned off."""
        outbox: Any = FakeOutbox(**options)
        assert (
            follow_up(outbox, claimed, until_ms=until, nudged=nudged, now_ms=1000)
            is None
        )

    def test_a_drain_called_in_process_starts_no_chain(self) -> None:
        """Outside a worker task (the CLI, tests) a full claim sends nothing."""
        outbox: Any = FakeOutbox(batch_size=5)
        nudges.after_claim(outbox, 5)
        assert outbox.more_task.calls == []

    def test_a_follow_up_continues_its_chain(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A follow-up's full claim sends the next one, with the same chain end."""
        from celery_outbox import tasks

        outbox: Any = FakeOutbox(batch_size=5)
        until = nudges.wall_clock_ms() + 60_000
        monkeypatch.setattr(
            tasks, "drain", lambda o: nudges.after_claim(o, 5) or {"claimed": 5}
        )
        nudges.drain_more(outbox, until)
        ((args, options),) = outbox.more_task.calls
        assert args == (until,) and options["countdown"] is None

    def test_a_follow_up_that_finds_the_lock_taken_comes_back(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A follow-up that could not drain (lock busy) is sent again shortly."""
        from celery_outbox import tasks

        outbox: Any = FakeOutbox()
        until = nudges.wall_clock_ms() + 60_000
        monkeypatch.setattr(tasks, "drain", lambda o: {"claimed": 0, "busy": 1})
        nudges.drain_more(outbox, until)
        ((args, options),) = outbox.more_task.calls
        assert args == (until,)
        assert options["countdown"] == nudges.BUSY_RETRY_MS / 1000


class TestNudger:
    """The producer side: debounced nudges that name their events."""

    def test_a_burst_becomes_few_nudges_naming_every_event(self) -> None:
        """Many pokes in a burst send few nudges, which name every event."""
        outbox: Any = FakeOutbox()
        nudger = Nudger(outbox)
        events = [Event.new("order.created", {"n": i}) for i in range(40)]
        for event in events:
            nudger.poke([event])
        named = lambda: [  # noqa: E731
            e["id"] for args, _ in outbox.claim_task.calls for e in args[0]
        ]
        wait_until(lambda: len(named()) == 40, "the nudges")
        assert sorted(named()) == sorted(e.id for e in events)
        assert len(outbox.claim_task.calls) < 40
        assert outbox.drain_task.calls == []
        _, options = outbox.claim_task.calls[0]
        assert options["headers"] == {HEADER_NUDGE: True}
        assert options["retry"] is False and options["expires"] == 1.0

    def test_without_events_or_too_many_it_is_a_plain_drain(self) -> None:
        """A poke naming no events, or more than fit, sends the drain task."""
        outbox: Any = FakeOutbox()
        nudger = Nudger(outbox)
        nudger.poke([Event.new("order.created") for _ in range(nudges.MAX_EVENTS + 1)])
        wait_until(lambda: nudger.sent == 1, "the nudge")
        assert len(outbox.drain_task.calls) == 1
        assert outbox.claim_task.calls == []

    def test_a_broker_error_loses_the_nudge_quietly(self) -> None:
        """A nudge the broker refuses is dropped, not raised."""
        outbox: Any = FakeOutbox()

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise ConnectionError("broker down")

        outbox.drain_task.apply_async = refuse
        assert Nudger(outbox).send(None) is False


@pytest.fixture
def app_outbox(endpoint: str) -> Iterator[Callable[..., Outbox]]:
    """Outboxes installed in an in-memory Celery app, on fresh tables."""
    made: list[Outbox] = []

    def factory(**options: Any) -> Outbox:
        app = Celery("test", broker="memory://", set_as_current=False)
        outbox = Outbox(
            app,
            table_name=f"test-{uuid.uuid4().hex[:12]}",
            endpoint_url=endpoint,
            region_name="us-east-1",
            **options,
        )
        outbox.store.create_table()

        @outbox.handler("order.created", name=f"h-{uuid.uuid4().hex[:6]}")
        def handle(event: Event) -> None:
            """A handler that is never run here."""

        made.append(outbox)
        return outbox

    yield factory
    for outbox in made:
        outbox.store.delete_table()


class TestEmitsNudge:
    """With nudge on, every committed emit names its events in a nudge."""

    def test_emit_publish_each_and_transaction_nudge(
        self, app_outbox: Callable[..., Outbox], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Direct emits, publish_each and transactions all nudge after commit."""
        outbox = app_outbox(nudge=True)
        poked: list[list[str]] = []
        monkeypatch.setattr(
            outbox, "nudge", lambda events=(): poked.append([e.id for e in events])
        )
        one = outbox.emit("order.created", {"n": 1})
        each = [Event.new("order.created", {"n": i}) for i in range(3)]
        outbox.publish_each(each)
        with outbox.transaction() as tx:
            tx.put(outbox.config.table_name, {"id": "not-an-event"})
            two = outbox.emit("order.created", {"n": 2})
        assert poked == [[one.id], [e.id for e in each], [two.id]]

    def test_no_nudge_by_default(
        self, app_outbox: Callable[..., Outbox], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With nudge off (the default) emits send nothing."""
        outbox = app_outbox()
        poked: list[Any] = []
        monkeypatch.setattr(outbox, "nudge", lambda events=(): poked.append(events))
        outbox.emit("order.created")
        assert poked == []

    def test_a_nudged_claim_takes_only_fresh_events(
        self, app_outbox: Callable[..., Outbox]
    ) -> None:
        """The nudged drain leases named events once; a claimed one is skipped."""
        outbox = app_outbox()
        events = [outbox.emit("order.created", {"n": i}) for i in range(3)]
        named = [e.as_dict() for e in events]
        first = nudges.drain_emitted(outbox, named)
        assert first == {"claimed": 3, "skipped": 0, "dispatched": 3}
        assert all(outbox.store.status_of(e.id) is Status.ACTIVE for e in events)
        again = nudges.drain_emitted(outbox, named)
        assert again == {"claimed": 0, "skipped": 3, "dispatched": 0}


# -- with a real worker ------------------------------------------------------


@pytest.fixture
def worker(
    ddb_local_endpoint: str, redis_url: str, queue_name: str
) -> Iterator[Callable[..., Any]]:
    """Start a worker (no beat) of benchmarks.app on a fresh table."""
    import redis

    conn = redis.Redis.from_url(redis_url)
    procs: list[subprocess.Popen[bytes]] = []
    keys: list[str] = []

    def start(**options: Any) -> Any:
        from benchmarks.app import make_app

        key = f"test-{uuid.uuid4().hex[:8]}"
        env = {
            "BENCH_BROKER": redis_url,
            "BENCH_QUEUE": queue_name,
            "BENCH_KEY": key,
            "BENCH_TABLE": key,
            "BENCH_ENDPOINT": ddb_local_endpoint,
            "BENCH_OUTBOX": json.dumps(options),
        }
        keys.append(key)
        app, outbox = make_app(env)
        outbox.store.create_table()
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "benchmarks.app",
                    "worker",
                    "-P",
                    "threads",
                    "-c",
                    "2",
                    "-Q",
                    queue_name,
                    "-l",
                    "WARNING",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                ],
                cwd=ROOT,
                env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_until(lambda: conn.get(f"{key}:ready") is not None, "the worker")
        done = lambda: int(conn.get(f"{key}:done") or 0)  # noqa: E731
        return app, outbox, done

    try:
        yield start
    finally:
        # Importing benchmarks.app hooks boto3's default session to count
        # requests; leave no hook behind for the tests that follow.
        from benchmarks import counting

        counting.uninstall()
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    for key in keys:
        conn.delete(*conn.scan_iter(f"{key}:*"))
    conn.delete(queue_name)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["item", "partiql"])
def test_a_nudge_runs_events_without_beat(worker: Any, mode: str) -> None:
    """With no beat at all, nudged emits are handled and completed."""
    _, outbox, done = worker(write_mode=mode, nudge=True, poll_interval_ms=60_000)
    events = [outbox.emit("bench.event", {"sent": 0}) for _ in range(5)]
    wait_until(lambda: done() == 5, "the handlers")
    wait_until(
        lambda: all(outbox.store.get_item(e.id) is None for e in events),
        "the completions",
    )


@pytest.mark.integration
def test_follow_ups_drain_a_backlog_from_one_drain(worker: Any) -> None:
    """One beat-like drain over a 120-event backlog drains it all by follow-ups."""
    _, outbox, done = worker(
        write_mode="partiql", batch_size=50, poll_interval_ms=30_000
    )
    for _batch in range(4):
        outbox.publish([Event.new("bench.event", {"sent": 0}) for _ in range(30)])
    outbox.drain_task.apply_async()
    wait_until(lambda: done() == 120, "the handlers")
