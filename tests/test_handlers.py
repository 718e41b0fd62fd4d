"""Handlers, dispatch and write-back, with handler tasks run eagerly on moto.

Eager tasks go through Celery's tracer with the drain's task id, headers and
retry count, so the write-back hooks run as they do in a worker; the tests
with real worker processes are in ``tests/integration``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, Task
from celery.exceptions import WorkerLostError

from celery_outbox import (
    ConfigError,
    Event,
    EventError,
    HandlerError,
    Outbox,
    Status,
    StoreError,
    handlers,
    tasks,
)
from celery_outbox import event as ev
from tests.celery_support import eager_outbox


@pytest.fixture
def outbox(moto_endpoint: str) -> Iterator[Outbox]:
    """An eager outbox with short backoffs and three retries."""
    made = eager_outbox(
        moto_endpoint, base_backoff_ms=100, max_backoff_ms=1000, max_retries=3
    )
    yield made
    made.store.delete_table()


def item(outbox: Outbox, event_id: str) -> dict[str, Any]:
    """The stored item of an event, which must exist."""
    found = outbox.store.get_item(event_id)
    assert found is not None, f"event {event_id} is gone"
    return found


def make_due(outbox: Outbox, event_id: str) -> None:
    """Move a retrying event's due time to now, as time passing would."""
    outbox.store.client.update_item(
        TableName=outbox.store.table,
        Key={"id": {"S": event_id}},
        UpdateExpression="SET #sk = :now",
        ExpressionAttributeNames={"#sk": ev.SORT_KEY},
        ExpressionAttributeValues={":now": {"N": str(outbox.store.clock())}},
    )


class TestDecorator:
    """``@outbox.handler`` makes ordinary Celery tasks."""

    def test_options_keep_their_meaning(self, outbox: Outbox) -> None:
        """bind, acks_late, time_limit and name reach the Celery task unchanged."""

        @outbox.handler(
            "order.created", bind=True, acks_late=True, time_limit=5, name="h.orders"
        )
        def handle(self: Task, event: Event) -> str:
            return f"{self.name}:{event.type}"

        assert handle.name == "h.orders"
        assert handle.acks_late is True
        assert handle.time_limit == 5
        assert outbox.app.tasks["h.orders"].name == handle.name
        assert isinstance(handle, handlers.HandlerTask)
        assert handle(Event.new("order.created")) == "h.orders:order.created"

    def test_handler_queue_applies_to_handlers_nothing_routes(
        self, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """outbox_handler_queue is the queue of handlers no route sends elsewhere."""
        outbox = eager_outbox(moto_endpoint, handler_queue="outbox-handlers")
        outbox.app.conf.task_routes = {"h.routed": {"queue": "routed"}}
        try:

            @outbox.handler("a.b", name="h.plain")
            def plain(event: Event) -> None: ...

            @outbox.handler("c.d", name="h.routed")
            def routed(event: Event) -> None: ...

            queues: dict[str, str | None] = {}
            for task in (plain, routed):
                monkeypatch.setattr(
                    task,
                    "apply_async",
                    lambda name=task.name, **kw: queues.update({name: kw.get("queue")}),
                )
            outbox.emit("a.b")
            outbox.emit("c.d")
            outbox.drain()
            assert queues == {"h.plain": "outbox-handlers", "h.routed": None}
        finally:
            outbox.store.delete_table()

    def test_base_class_hooks_still_run(self, outbox: Outbox) -> None:
        """A base= task class keeps its own hooks after the outbox's write-back."""
        seen: list[str] = []

        class Audited(Task):  # type: ignore[misc]
            def on_success(self, retval: Any, task_id: str, args: Any, kw: Any) -> None:
                seen.append(task_id)

        @outbox.handler("order.created", base=Audited)
        def handle(event: Event) -> None: ...

        emitted = outbox.emit("order.created", {"n": 1})
        outbox.drain()
        assert seen == [f"outbox:{emitted.id}:1"]
        assert outbox.store.status_of(emitted.id) is None

    def test_base_class_retry_settings_are_kept(self, outbox: Outbox) -> None:
        """max_retries and default_retry_delay of a base= class still apply."""

        class Patient(Task):  # type: ignore[misc]
            max_retries = 1
            default_retry_delay = 7

        @outbox.handler("order.created", base=Patient)
        def handle(event: Event) -> None: ...

        @outbox.handler("order.paid")
        def plain(event: Event) -> None: ...

        assert (handle.max_retries, handle.default_retry_delay) == (1, 7)
        assert (plain.max_retries, plain.default_retry_delay) == (None, None)

    def test_rejects_bad_registrations(self, outbox: Outbox) -> None:
        """A bare decorator, a second handler or retry_on_worker_lost is refused."""
        with pytest.raises(HandlerError, match="event type first"):
            outbox.handler(lambda e: None)  # type: ignore[arg-type]

        @outbox.handler("order.created")
        def first(event: Event) -> None: ...

        with pytest.raises(HandlerError, match="already has the handler"):
            outbox.handler("order.created")
        with pytest.raises(HandlerError, match="retry_on_worker_lost"):
            outbox.handler("order.paid", retry_on_worker_lost=True)(lambda e: None)

    def test_producer_only_outbox_has_no_handlers(self) -> None:
        """An outbox without an app refuses handlers with a clear error."""
        with pytest.raises(HandlerError, match="producer-only"):
            Outbox().handler("order.created")


class TestDispatch:
    """The drain sends one plain message per claimed event."""

    def test_message_names_event_and_attempt(
        self, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Task id, headers and retries identify the event; no ETA or countdown."""

        @outbox.handler("order.created")
        def handle(event: Event) -> None: ...

        sent: list[dict[str, Any]] = []
        monkeypatch.setattr(handle, "apply_async", lambda **kw: sent.append(kw))
        emitted = outbox.emit("order.created", {"n": 1})
        summary = outbox.drain()
        assert summary["dispatched"] == 1
        (message,) = sent
        assert message["task_id"] == f"outbox:{emitted.id}:1"
        assert message["retries"] == 0
        assert message["args"][0]["id"] == emitted.id
        headers = message["headers"]
        assert headers[handlers.HEADER_EVENT_ID] == emitted.id
        assert headers[handlers.HEADER_EVENT_TYPE] == "order.created"
        assert headers[handlers.HEADER_ATTEMPT] == 1
        assert (
            headers[handlers.HEADER_LEASE]
            == item(outbox, emitted.id)["leaseToken"]["S"]
        )
        assert not {"eta", "countdown"} & set(message)

    def test_broker_error_releases_the_lease(
        self, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A refused send gives the event back, due now, with no attempt used."""

        @outbox.handler("order.created")
        def handle(event: Event) -> None: ...

        def refuse(**kwargs: Any) -> None:
            raise ConnectionError("broker down")

        monkeypatch.setattr(handle, "apply_async", refuse)
        emitted = outbox.emit("order.created")
        assert outbox.drain()["released"] == 1
        stored = item(outbox, emitted.id)
        assert stored["status"]["S"] == "created"
        assert stored["retryCount"]["N"] == "0"

    def test_unknown_type_fails_then_succeeds_after_retry(self, outbox: Outbox) -> None:
        """No handler: failed with a clear error; retried once one exists: done."""
        emitted = outbox.emit("invoice.sent", {"n": 1})
        assert outbox.drain()["failed"] == 1
        (failed,) = outbox.store.failed().events
        assert failed.event.id == emitted.id
        assert "no handler is registered for event type 'invoice.sent'" in (
            failed.last_error
        )
        calls: list[int] = []

        @outbox.handler("invoice.sent")
        def handle(event: Event) -> None:
            calls.append(event.attempt)

        assert outbox.store.retry([emitted.id]).retried == [emitted.id]
        outbox.drain()
        assert calls == [1]
        assert outbox.store.status_of(emitted.id) is None


class FakeProducer:
    """A kombu producer that records its publish batches."""

    def __init__(self, fail_flush: bool = False) -> None:
        self.fail_flush = fail_flush
        self.batches: list[str] = []

    @contextlib.contextmanager
    def batch(self, max_size: int) -> Iterator[None]:
        self.batches.append("open")
        yield
        if self.fail_flush:
            raise ConnectionError("broker went away")
        self.batches.append("flushed")


class TestDispatchBatch:
    """A drain's messages share one producer and one publish batch."""

    def use(
        self, outbox: Outbox, monkeypatch: pytest.MonkeyPatch, producer: FakeProducer
    ) -> list[dict[str, Any]]:
        """Publish through ``producer``; return what each send was given."""
        outbox.app.conf.task_always_eager = False

        @contextlib.contextmanager
        def acquire(*args: Any) -> Iterator[FakeProducer]:
            yield producer

        monkeypatch.setattr(outbox.app, "producer_or_acquire", acquire)

        @outbox.handler("order.created")
        def handle(event: Event) -> None: ...

        sent: list[dict[str, Any]] = []

        def send(**kwargs: Any) -> None:
            assert producer.batches[-1:] == ["open"], "sent outside the batch"
            sent.append(kwargs)

        monkeypatch.setattr(handle, "apply_async", send)
        return sent

    def test_one_producer_one_batch(
        self, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Every message of a drain goes through the same producer and batch."""
        producer = FakeProducer()
        sent = self.use(outbox, monkeypatch, producer)
        emitted = [outbox.emit("order.created", {"n": n}) for n in range(3)]
        summary = outbox.drain()
        assert (summary["dispatched"], summary["released"]) == (3, 0)
        assert producer.batches == ["open", "flushed"]
        assert all(message["producer"] is producer for message in sent)
        assert {m["args"][0]["id"] for m in sent} == {e.id for e in emitted}

    def test_failed_batch_holds_its_leases_where_starts_are_deferred(
        self, ddb_local_endpoint: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """In partiql mode a copy that arrived anyway keeps the event's lease.

        Its start may be deferred, so it would not notice a new lease: the
        lease is held until it expires, and then sent again unused.
        """
        outbox = eager_outbox(ddb_local_endpoint, write_mode="partiql")
        try:
            producer = FakeProducer(fail_flush=True)
            self.use(outbox, monkeypatch, producer)
            emitted = outbox.emit("order.created")
            summary = outbox.drain()
            assert (summary["dispatched"], summary["held"]) == (0, 1)
            stored = item(outbox, emitted.id)
            assert stored["status"]["S"] == "active"
            assert "runningSince" not in stored
            # At the lease's expiry the event is sent again, no attempt used.
            deadline = int(stored["gsiSortKey"]["N"])
            outbox.store.clock = lambda: deadline + 1
            outbox.writer.batches._expired_checked_ms = 0  # type: ignore[attr-defined]
            producer.fail_flush = False
            summary = outbox.drain()
            assert summary["dispatched"] == 1, summary
            assert item(outbox, emitted.id)["retryCount"]["N"] == "0"
        finally:
            outbox.store.delete_table()

    def test_failed_batch_releases_its_leases(
        self, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A batch the broker refused gives every event back, no attempt used."""
        producer = FakeProducer(fail_flush=True)
        sent = self.use(outbox, monkeypatch, producer)
        emitted = [outbox.emit("order.created", {"n": n}) for n in range(3)]
        summary = outbox.drain()
        assert (summary["dispatched"], summary["released"]) == (0, 3)
        assert len(sent) == 3
        for event in emitted:
            stored = item(outbox, event.id)
            assert stored["status"]["S"] == "created"
            assert stored["retryCount"]["N"] == "0"

    def test_store_error_still_sends_what_was_dispatched(
        self, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A DynamoDB error mid-drain flushes the messages sent before it."""
        producer = FakeProducer()
        sent = self.use(outbox, monkeypatch, producer)
        first = outbox.emit("order.created")
        time.sleep(0.01)  # due after the first: claimed, and dispatched, second
        outbox.emit("no.handler")

        def down(*args: Any, **kwargs: Any) -> None:
            raise StoreError("DynamoDB is down", "InternalServerError")

        monkeypatch.setattr(outbox.store, "fail", down)
        assert outbox.drain()["paused"] == 1
        assert producer.batches == ["open", "flushed"]
        assert [m["args"][0]["id"] for m in sent] == [first.id]

    def test_without_batches_the_producer_is_still_shared(
        self, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A kombu without publish batches sends each message at once."""

        class Plain:
            """A producer of a kombu before 5.7."""

        producer = Plain()
        outbox.app.conf.task_always_eager = False

        @contextlib.contextmanager
        def acquire(*args: Any) -> Iterator[Plain]:
            yield producer

        monkeypatch.setattr(outbox.app, "producer_or_acquire", acquire)

        @outbox.handler("order.created")
        def handle(event: Event) -> None: ...

        sent: list[dict[str, Any]] = []
        monkeypatch.setattr(handle, "apply_async", lambda **kw: sent.append(kw))
        outbox.emit("order.created")
        outbox.emit("order.created")
        assert outbox.drain()["dispatched"] == 2
        assert [m["producer"] for m in sent] == [producer, producer]

    def test_real_broker_gets_every_message(
        self, moto_endpoint: str, redis_url: str, queue_name: str
    ) -> None:
        """Through kombu and Redis, a batched drain queues one message per event."""
        import redis

        outbox = eager_outbox(moto_endpoint, handler_queue=queue_name)
        outbox.app.conf.task_always_eager = False
        outbox.app.conf.broker_url = redis_url
        client = redis.Redis.from_url(redis_url)
        try:

            @outbox.handler("order.created")
            def handle(event: Event) -> None: ...

            emitted = {outbox.emit("order.created", {"n": n}).id for n in range(30)}
            assert outbox.drain()["dispatched"] == 30
            messages = [json.loads(m) for m in client.lrange(queue_name, 0, -1)]
            assert {m["headers"][handlers.HEADER_EVENT_ID] for m in messages} == (
                emitted
            )
        finally:
            client.delete(queue_name)
            outbox.store.delete_table()


class TestWriteBack:
    """Handler outcomes move the event through its lifecycle."""

    def test_success_completes(self, outbox: Outbox) -> None:
        """A handler that returns completes (deletes) its event."""
        received: list[Event] = []

        @outbox.handler("order.created")
        def handle(event: Event) -> None:
            received.append(event)

        emitted = outbox.emit("order.created", {"total": 30.4})
        outbox.drain()
        assert [(e.id, e.payload, e.attempt) for e in received] == [
            (emitted.id, {"total": 30.4}, 1)
        ]
        assert received[0].occurred_at == emitted.occurred_at
        assert outbox.store.status_of(emitted.id) is None

    def test_exception_reschedules_with_backoff_then_fails(
        self, outbox: Outbox
    ) -> None:
        """Each failure is due again later; past max_retries the event is failed."""
        attempts: list[int] = []

        @outbox.handler("order.created")
        def handle(event: Event) -> None:
            attempts.append(event.attempt)
            raise ValueError(f"warehouse said no to {event.id}")

        emitted = outbox.emit("order.created")
        for attempt in range(1, 5):
            before = outbox.store.clock()
            outbox.drain()
            stored = item(outbox, emitted.id)
            assert stored["retryCount"]["N"] == str(attempt)
            if attempt <= 3:
                assert stored["status"]["S"] == "created"
                # equal jitter: at least half of base * 2**(n-1)
                assert int(stored["gsiSortKey"]["N"]) >= before + 50 * 2 ** (
                    attempt - 1
                )
                make_due(outbox, emitted.id)
        assert attempts == [1, 2, 3, 4]
        assert stored["status"]["S"] == "failed"
        assert (
            stored["lastError"]["S"] == f"ValueError: warehouse said no to {emitted.id}"
        )

    def test_self_retry_waits_in_dynamodb(self, outbox: Outbox) -> None:
        """self.retry(countdown=) makes the event due then, as the next attempt."""
        seen: list[tuple[int, int]] = []

        @outbox.handler("order.created", bind=True)
        def handle(self: Task, event: Event) -> None:
            seen.append((event.attempt, self.request.retries))
            if event.attempt == 1:
                raise self.retry(exc=TimeoutError("gateway slow"), countdown=30)

        emitted = outbox.emit("order.created")
        before = outbox.store.clock()
        outbox.drain()
        stored = item(outbox, emitted.id)
        assert stored["status"]["S"] == "created"
        assert int(stored["gsiSortKey"]["N"]) >= before + 30_000
        assert stored["lastError"]["S"] == "TimeoutError: gateway slow"
        assert outbox.drain()["claimed"] == 0  # not due yet
        make_due(outbox, emitted.id)
        outbox.drain()
        assert seen == [(1, 0), (2, 1)]
        assert outbox.store.status_of(emitted.id) is None

    def test_autoretry_and_handler_max_retries(self, outbox: Outbox) -> None:
        """autoretry_for retries through the outbox; max_retries lowers its limit."""
        attempts: list[int] = []

        @outbox.handler(
            "order.created", autoretry_for=(ConnectionError,), max_retries=1
        )
        def handle(event: Event) -> None:
            attempts.append(event.attempt)
            raise ConnectionError("ERP offline")

        emitted = outbox.emit("order.created")
        outbox.drain()
        assert item(outbox, emitted.id)["status"]["S"] == "created"
        make_due(outbox, emitted.id)
        outbox.drain()
        stored = item(outbox, emitted.id)
        assert attempts == [1, 2]
        assert stored["status"]["S"] == "failed"
        assert stored["retryCount"]["N"] == "2"
        assert stored["lastError"]["S"] == "ConnectionError: ERP offline"

    def test_expired_lease_skips_the_handler(self, outbox: Outbox) -> None:
        """A message whose lease was reclaimed while it waited runs nothing."""
        calls: list[str] = []

        @outbox.handler("order.created")
        def handle(event: Event) -> None:
            calls.append(event.id)

        outbox.emit("order.created")
        (lease,) = outbox.store.claim().leases
        started = outbox.store.begin(lease)  # a worker started it, then died
        assert started is not None
        outbox.store.clock = lambda: started.deadline_ms  # the lease expired
        (new,) = outbox.store.claim().leases
        handle.apply(
            args=[lease.event.as_dict()],
            headers={
                handlers.HEADER_LEASE: lease.token,
                handlers.HEADER_DEADLINE: lease.deadline_ms,
            },
        )
        assert calls == []
        stored = item(outbox, lease.event.id)
        assert stored["status"]["S"] == "active"
        assert stored["leaseToken"]["S"] == new.token
        assert "runningSince" not in stored

    def test_lost_worker_reports_write_nothing(self, outbox: Outbox) -> None:
        """Celery's report of a lost child leaves the event to its lease."""

        @outbox.handler("order.created")
        def handle(event: Event) -> None: ...

        outbox.emit("order.created")
        (lease,) = outbox.store.claim().leases
        args = [lease.event.as_dict()]
        handle.push_request(
            args=args,
            headers={handlers.HEADER_LEASE: lease.token},
            called_directly=False,
        )
        try:
            handle.on_failure(WorkerLostError("SIGKILL"), "t", args, {}, None)
        finally:
            handle.pop_request()
        assert item(outbox, lease.event.id)["status"]["S"] == "active"

    def test_main_process_report_of_a_lost_child_fails_the_attempt(
        self, outbox: Outbox
    ) -> None:
        """``lost`` (the main process's report) counts a started attempt at
        once."""

        @outbox.handler("order.created")
        def handle(event: Event) -> None: ...

        outbox.emit("order.created")
        (lease,) = outbox.store.claim().leases
        lease = dataclasses.replace(lease, copy="a")
        assert outbox.store.begin(lease) is not None  # the child started it
        handle.lost(lease, WorkerLostError("signal 9 (SIGKILL)"))
        stored = item(outbox, lease.event.id)
        assert stored["status"]["S"] == "created"
        assert stored["retryCount"]["N"] == "1"
        assert stored["lastError"]["S"].startswith("WorkerLost: WorkerLostError")
        handle.lost(lease, WorkerLostError("again"))  # a stale report: no-op
        assert item(outbox, lease.event.id)["retryCount"]["N"] == "1"

    def test_a_lost_delivery_fails_only_a_start_of_its_own(
        self, outbox: Outbox
    ) -> None:
        """A resent lease has two deliveries: losing one that never started
        leaves the run of the other alone."""

        @outbox.handler("order.created")
        def handle(event: Event) -> None: ...

        outbox.emit("order.created")
        (lease,) = outbox.store.claim().leases
        a, b = (dataclasses.replace(lease, copy=c) for c in ("a", "b"))
        assert outbox.store.begin(b) is not None  # delivery b runs the handler
        assert item(outbox, lease.event.id)["runningBy"] == {"S": "b"}
        handle.lost(a, WorkerLostError("signal 9 (SIGKILL)"))  # a never started
        stored = item(outbox, lease.event.id)
        assert stored["status"]["S"] == "active" and stored["retryCount"]["N"] == "0"
        handle.lost(b, WorkerLostError("signal 9 (SIGKILL)"))
        stored = item(outbox, lease.event.id)
        assert stored["status"]["S"] == "created" and stored["retryCount"]["N"] == "1"

    @pytest.mark.parametrize("started_by", ["a", None, "b"])
    def test_a_failure_ends_only_a_run_of_its_own(
        self, outbox: Outbox, started_by: str | None
    ) -> None:
        """A handler's own failure is written over its own start mark or none
        (a deferred mark may still wait), never over another delivery's."""

        @outbox.handler("order.created")
        def handle(event: Event) -> None: ...

        outbox.emit("order.created")
        (lease,) = outbox.store.claim().leases
        if started_by is not None:
            started = dataclasses.replace(lease, copy=started_by)
            assert outbox.store.begin(started) is not None
        args = [lease.event.as_dict()]
        handle.push_request(
            args=args,
            headers={handlers.HEADER_LEASE: lease.token, handlers.HEADER_COPY: "a"},
            called_directly=False,
        )
        try:
            handle.on_failure(RuntimeError("boom"), "t", args, {}, None)
        finally:
            handle.pop_request()
        stored = item(outbox, lease.event.id)
        if started_by == "b":  # the other delivery's run goes on
            assert stored["status"]["S"] == "active"
            assert stored["runningBy"] == {"S": "b"}
            assert stored["retryCount"]["N"] == "0"
        else:
            assert stored["status"]["S"] == "created"
            assert stored["retryCount"]["N"] == "1"

    @pytest.mark.parametrize(
        ("write_mode", "counted"), [("item", False), ("partiql", True)]
    )
    def test_a_child_lost_before_its_start_mark(
        self, moto_endpoint: str, write_mode: str, counted: bool
    ) -> None:
        """With starts never deferred (item mode), no start mark means the
        handler never ran: the loss costs no attempt and the lease stays for
        its expiry to send again. In partiql mode the mark may be on its way
        while the handler runs, so the loss counts."""
        outbox = eager_outbox(moto_endpoint, write_mode=write_mode)
        try:

            @outbox.handler("order.created")
            def handle(event: Event) -> None: ...

            outbox.emit("order.created")
            (lease,) = outbox.store.claim().leases
            handle.lost(dataclasses.replace(lease, copy="c"), WorkerLostError("oom"))
            stored = item(outbox, lease.event.id)
            assert stored["retryCount"]["N"] == ("1" if counted else "0")
            assert stored["status"]["S"] == ("created" if counted else "active")
            assert ("leaseToken" in stored) is not counted
        finally:
            outbox.store.delete_table()

    @pytest.mark.parametrize("why", ["resent", "acks_late"])
    def test_a_partiql_child_that_could_not_defer_its_mark(
        self, moto_endpoint: str, why: str
    ) -> None:
        """A resent lease, or a task acknowledged late, never defers its start
        mark (``may_defer``): in partiql mode too, a child lost with no mark
        never ran the handler, and the loss costs no attempt."""
        outbox = eager_outbox(moto_endpoint, write_mode="partiql")
        try:

            @outbox.handler("order.created", acks_late=why == "acks_late")
            def handle(event: Event) -> None: ...

            outbox.emit("order.created")
            (lease,) = outbox.store.claim().leases
            lease = dataclasses.replace(lease, copy="c", resent=why == "resent")
            handle.lost(lease, WorkerLostError("oom"))
            stored = item(outbox, lease.event.id)
            assert stored["retryCount"]["N"] == "0"
            assert stored["status"]["S"] == "active" and "leaseToken" in stored
        finally:
            outbox.store.delete_table()

    def test_the_main_process_gives_up_its_report_within_seconds(
        self, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The lost child's failure goes through a client that does not wait
        out an outage: the main process takes no messages while it writes."""
        prompt = outbox.prompt_store
        config = prompt.client.meta.config
        assert config.retries["total_max_attempts"] == 2
        assert (config.connect_timeout, config.read_timeout) == (2, 5)
        usual = outbox.store.client.meta.config
        assert usual.retries["total_max_attempts"] == 10
        assert outbox.prompt_store is prompt  # made once per process
        monkeypatch.setattr("os.getpid", lambda: -1)  # as in a forked child
        assert outbox.prompt_store is not prompt

    def test_start_is_deferred_only_when_safe(
        self, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Deferred only in a prefork child, for a fresh lease sent once."""
        from celery_outbox import writeback

        @outbox.handler("order.created")
        def handle(event: Event) -> None: ...

        outbox.emit("order.created")
        (lease,) = outbox.store.claim().leases
        assert not handle.may_defer(lease)  # not a pool child
        monkeypatch.setattr(writeback, "_pool_child", True)
        assert handle.may_defer(lease)
        resent = ev.Lease(lease.event, lease.token, lease.deadline_ms, 0, resent=True)
        assert not handle.may_defer(resent)
        half = outbox.config.processing_timeout_ms // 2
        outbox.store.clock = lambda: lease.deadline_ms - half  # arrived late
        assert not handle.may_defer(lease)

    def test_a_deferred_start_lands_before_the_lease_can_be_sent_again(
        self, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A mark that waits up to ``flush_interval_ms`` must still land in time.

        With a flush interval near half the lease, a handler that started in
        the first half gets its mark after the deadline: a drain has sent the
        lease again (same token, unstarted) and that copy runs beside it.
        """
        from celery_outbox import writeback

        outbox = eager_outbox(
            moto_endpoint, processing_timeout_ms=10_000, flush_interval_ms=8_000
        )
        try:

            @outbox.handler("order.created")
            def handle(event: Event) -> None: ...

            outbox.emit("order.created")
            (lease,) = outbox.store.claim().leases
            monkeypatch.setattr(writeback, "_pool_child", True)
            # 1 s into a 10 s lease: the mark would land at 9 s, 1 s before
            # the deadline at best, after it with any delay in the flusher.
            outbox.store.clock = lambda: lease.deadline_ms - 9_000
            assert not handle.may_defer(lease)
            # Even at the claim, an 8 s wait leaves less than half the lease.
            outbox.store.clock = lambda: lease.deadline_ms - 10_000
            assert not handle.may_defer(lease)
        finally:
            outbox.store.delete_table()

    def test_start_is_not_deferred_for_a_message_that_can_come_back(
        self, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """acks_late (requeue on a lost child, Reject) or a redelivery: no deferral.

        Another copy of the same message, under the same lease, may arrive;
        only the conditional start written before the handler refuses it.
        """
        from celery_outbox import writeback

        @outbox.handler("order.created", acks_late=True, reject_on_worker_lost=True)
        def late(event: Event) -> None: ...

        @outbox.handler("order.updated")
        def early(event: Event) -> None: ...

        outbox.emit("order.created")
        (lease,) = outbox.store.claim().leases
        monkeypatch.setattr(writeback, "_pool_child", True)
        assert not late.may_defer(lease)
        early.push_request(delivery_info={"redelivered": True})
        try:
            assert not early.may_defer(lease)
        finally:
            early.pop_request()
        assert early.may_defer(lease)

    def test_stale_write_back_changes_nothing(self, outbox: Outbox) -> None:
        """A late success under a reclaimed lease leaves the new lease alone."""

        @outbox.handler("order.created")
        def handle(event: Event) -> None: ...

        outbox.emit("order.created")
        (old,) = outbox.store.claim().leases
        started = outbox.store.begin(old)  # its worker starts, then stalls
        assert started is not None
        outbox.store.clock = lambda: started.deadline_ms + 1  # the lease expired
        (new,) = outbox.store.claim().leases
        handle.apply(
            args=[old.event.as_dict()],
            headers={handlers.HEADER_LEASE: old.token},
        )
        stored = item(outbox, new.event.id)
        assert stored["status"]["S"] == "active"
        assert stored["leaseToken"]["S"] == new.token

    def test_called_directly_writes_nothing(self, outbox: Outbox) -> None:
        """Calling a handler with an Event (a unit test) runs only the function."""

        @outbox.handler("order.created")
        def handle(event: Event) -> int:
            return event.attempt

        assert handle(Event.new("order.created")) == 1


class TestEmit:
    """Application code emits through the installed outbox."""

    def test_direct_collector_and_transaction(self, outbox: Outbox) -> None:
        """Direct emits write; collector and transaction emits commit together."""
        store = outbox.store
        direct = outbox.emit("order.created", {"n": 1})
        assert store.status_of(direct.id) is Status.CREATED

        with outbox.collecting() as actions:
            collected = outbox.emit("order.created", {"n": 2})
        assert store.status_of(collected.id) is None
        store.commit(actions)
        assert store.status_of(collected.id) is Status.CREATED

        with outbox.transaction() as tx:
            tx.put(store.table, {"id": "order#1", "kind": "order", "total": 12})
            in_tx = outbox.emit("order.created", {"order_id": "order#1"})
        assert store.status_of(in_tx.id) is Status.CREATED
        assert store.get_item("order#1") is not None

    def test_failed_transaction_writes_nothing(self, outbox: Outbox) -> None:
        """An exception inside the block discards business items and events."""
        with pytest.raises(RuntimeError), outbox.transaction() as tx:
            tx.put(outbox.store.table, {"id": "order#2", "kind": "order"})
            emitted = outbox.emit("order.created")
            raise RuntimeError("payment declined")
        assert outbox.store.get_item("order#2") is None
        assert outbox.store.status_of(emitted.id) is None


def test_task_id_names_event_and_attempt() -> None:
    """The task id of an attempt is outbox:<event id>:<attempt>."""
    event = Event.new("order.created", id="e-1")
    lease = ev.Lease(Event(**{**event.__dict__, "attempt": 3}), "tok", 0, 0)
    assert tasks.task_id(lease) == "outbox:e-1:3"


def test_task_id_after_operator_retries() -> None:
    """After an operator retry, attempts from 1 again get ids of their own."""
    event = Event.new("order.created", id="e-1")
    again = Event(**{**event.__dict__, "operator_retries": 2})
    assert tasks.task_id(ev.Lease(again, "tok", 0, 0)) == "outbox:e-1:1:retry2"
    assert Event.from_dict(again.as_dict()) == again
    # a message from before the field existed reads as no operator retry
    old = {k: v for k, v in again.as_dict().items() if k != "operator_retries"}
    assert Event.from_dict(old).operator_retries == 0


class TestDrainErrors:
    """A failing DynamoDB pauses drains instead of failing every tick."""

    def test_pause_doubles_and_resets(
        self, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Failed drains pause for longer each time, capped; success resets."""
        calls: list[int] = []

        def broken_claim(limit: int | None = None) -> Any:
            calls.append(1)
            raise StoreError("DynamoDB query failed: ThrottlingException", "Throttling")

        real_claim = outbox.store.claim
        monkeypatch.setattr(outbox.store, "claim", broken_claim)
        pauses = []
        for _ in range(4):
            outbox.drain_paused_until = 0.0  # the previous pause has passed
            before = time.monotonic()
            assert outbox.drain()["paused"] == 1
            pauses.append(outbox.drain_paused_until - before)
        assert len(calls) == 4
        # the poll interval (1 s) doubled for each failure in a row
        assert [round(p) for p in pauses] == [2, 4, 8, 16]
        assert outbox.drain()["paused"] == 1  # still paused: claim not called
        assert len(calls) == 4
        monkeypatch.setattr(outbox.store, "claim", real_claim)
        outbox.drain_paused_until = 0.0
        assert outbox.drain()["paused"] == 0
        assert outbox.drain_errors == 0

    def test_pause_is_capped(
        self, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The pause never exceeds max_error_backoff_ms."""

        def broken_claim(limit: int | None = None) -> Any:
            raise StoreError("down")

        monkeypatch.setattr(outbox.store, "claim", broken_claim)
        outbox.drain_errors = 20
        before = time.monotonic()
        outbox.drain()
        cap_s = outbox.config.max_error_backoff_ms / 1000
        assert outbox.drain_paused_until - before <= cap_s + 0.1
        assert outbox.drain_paused_until - before >= cap_s - 0.1


def test_failed_write_back_leaves_the_event_to_its_lease(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """DynamoDB refusing a completion is logged; the event stays active."""

    @outbox.handler("order.created")
    def handle(event: Event) -> None: ...

    def refuse(lease: Any) -> Any:
        raise StoreError("DynamoDB delete on 't' failed: InternalServerError")

    monkeypatch.setattr(outbox.store, "complete", refuse)
    emitted = outbox.emit("order.created")
    assert outbox.drain()["dispatched"] == 1
    assert item(outbox, emitted.id)["status"]["S"] == "active"
    assert "Could not write back the completion" in caplog.text


def test_publish_of_one_event_not_in_a_list_is_refused() -> None:
    """publish given a bare Event raises EventError instead of a TypeError."""
    with pytest.raises(EventError, match="list of Event objects"):
        Outbox().publish(Event.new("order.created"))  # type: ignore[arg-type]


def test_second_outbox_on_one_app_is_refused() -> None:
    """A second Outbox(app) raises ConfigError, since its drain would never run."""
    app = Celery("twice", set_as_current=False)
    Outbox(app)
    with pytest.raises(ConfigError, match="already has an Outbox"):
        Outbox(app)
    assert Outbox(Celery("other", set_as_current=False)).app is not app


def test_handlers_report_lost_children_through_their_request_class() -> None:
    """Handler tasks get the outbox's Request class, under a base's own."""
    from celery.worker.request import Request

    class Audited(Request):  # type: ignore[misc]
        pass

    class AuditedTask(Task):  # type: ignore[misc]
        Request = Audited

    app = Celery("requests", broker="memory://")
    outbox = Outbox(app, table_name="t")

    @outbox.handler("plain")
    def plain(event: Event) -> None: ...

    @outbox.handler("audited", base=AuditedTask)
    def audited(event: Event) -> None: ...

    assert plain.Request is handlers.HandlerRequest
    assert issubclass(audited.Request, handlers.HandlerRequest)
    assert issubclass(audited.Request, Audited)
    assert handlers.request_class(audited.Request) is audited.Request
    with pytest.raises(TypeError):
        handlers.request_class(object)


def test_each_delivery_is_named_for_its_main_process_and_child() -> None:
    """The worker names a drain message's delivery in the request; the lease
    read in the main process and the one read in the child carry it."""
    from celery.app.task import Context
    from kombu.message import Message
    from kombu.utils.json import dumps

    app = Celery("deliveries", broker="memory://")
    outbox = Outbox(app, table_name="t")

    @outbox.handler("order.created")
    def handle(event: Event) -> None: ...

    task = app.tasks[handle.name]
    event = Event.new("order.created")
    sent = app.amqp.as_task_v2("outbox:e:1", task.name, args=[event.as_dict()])
    headers = {
        **sent.headers,
        handlers.HEADER_LEASE: "tok",
        handlers.HEADER_DEADLINE: 9,
    }
    leases = []
    for _ in range(2):
        message = Message(
            body=dumps(sent.body),
            headers=headers,
            content_type="application/json",
            content_encoding="utf-8",
            properties=sent.properties,
            delivery_info={"exchange": "", "routing_key": "celery"},
        )
        request = task.Request(message, app=app, task=task)
        main = handlers._lease(request.request_dict.get, request.args)
        child_request = Context(request.request_dict)
        child = handlers._lease(
            lambda name, r=child_request: handlers._header(r, name), request.args
        )
        assert main is not None and child is not None
        assert main.copy is not None and main.copy == child.copy
        leases.append(main)
    assert leases[0].copy != leases[1].copy  # the same message, delivered twice


def test_a_lost_child_is_failed_before_its_message_can_be_requeued(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """acks_late + reject_on_worker_lost: Celery requeues the lost message.

    The main process must write the lost attempt's failure first: a requeued
    copy that arrives before it finds the lease live and, if the lost child
    had not marked its start yet, starts it, and the failure written after
    that reschedules the event under a running handler.
    """
    from billiard.einfo import ExceptionInfo
    from celery.worker.request import Request

    app = Celery("requeue-order", broker="memory://")
    outbox = Outbox(app, table_name="t")

    @outbox.handler("order.created", acks_late=True, reject_on_worker_lost=True)
    def handle(event: Event) -> None: ...

    task = app.tasks[handle.name]
    order: list[str] = []

    def celery_on_failure(self: Any, *args: Any, **kwargs: Any) -> None:
        order.append("requeued")  # Celery's Request.on_failure rejects, requeue

    monkeypatch.setattr(Request, "on_failure", celery_on_failure)
    monkeypatch.setattr(
        type(task), "lost", lambda self, lease, reason: order.append("failed")
    )
    request = task.Request.__new__(task.Request)
    request._request_dict = {handlers.HEADER_LEASE: "tok", "args": []}
    request._args = [Event.new("order.created").as_dict()]
    monkeypatch.setattr(type(request), "task", property(lambda self: task))
    try:
        raise WorkerLostError("signal 9 (SIGKILL)")
    except WorkerLostError:
        exc_info = ExceptionInfo()
    request.on_failure(exc_info)
    assert order == ["failed", "requeued"]
