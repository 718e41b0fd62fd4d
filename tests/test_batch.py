"""Claims, completions and inserts in conditional PartiQL batches.

PartiQL batches with conditions need real DynamoDB semantics: these tests
run on DynamoDB Local only (moto 5.2 cannot run them).
"""

from __future__ import annotations

import collections
import dataclasses
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from store_support import lose_next_reply

from celery_outbox import (
    Event,
    ItemTooLargeError,
    OutboxConfig,
    OutboxStore,
    Outcome,
    Status,
)
from celery_outbox import event as ev
from celery_outbox.batch import BatchStore
from celery_outbox.config import Completion
from celery_outbox.event import Lease
from celery_outbox.writeback import BatchWriter, make_writer

pytestmark = pytest.mark.integration


class Clock:
    """A settable clock in epoch milliseconds."""

    def __init__(self) -> None:
        self.now = 1_800_000_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def make(ddb_local_endpoint: str) -> Iterator[Any]:
    """Make a store (fresh table) and its batch store on DynamoDB Local."""
    made: list[OutboxStore] = []

    def factory(**options: Any) -> tuple[OutboxStore, BatchStore]:
        clock = options.pop("clock", None)
        config = OutboxConfig(
            table_name=f"test-{uuid.uuid4().hex[:12]}",
            endpoint_url=ddb_local_endpoint,
            **{"write_mode": "partiql", **options},
        )
        store = OutboxStore(config, clock=clock)
        store.create_table()
        made.append(store)
        return store, BatchStore(store)

    yield factory
    for store in made:
        store.delete_table()


def count_requests(store: OutboxStore) -> collections.Counter[str]:
    """Count the store client's requests by operation from now on."""
    counts: collections.Counter[str] = collections.Counter()

    def hook(**kwargs: Any) -> None:
        counts[kwargs["event_name"].rsplit(".", 1)[-1]] += 1

    store.client.meta.events.register("before-send.dynamodb", hook)
    return counts


def publish(store: OutboxStore, n: int) -> list[Event]:
    """Publish ``n`` events, 25 per transaction."""
    events = [Event.new("order.created", {"n": i}) for i in range(n)]
    for start in range(0, n, 25):
        store.publish(events[start : start + 25])
    return events


def test_claim_takes_a_batch_in_few_requests(make: Any) -> None:
    """Thirty due events are leased with one query and two batch requests."""
    store, batches = make()
    events = publish(store, 30)
    counts = count_requests(store)
    result = batches.claim(limit=30)
    assert sorted(lease.event.id for lease in result.leases) == sorted(
        e.id for e in events
    )
    assert result.skipped == 0
    assert counts == {"Query": 2, "BatchExecuteStatement": 2}  # expired + due
    for lease in result.leases:
        item = store.get_item(lease.event.id)
        assert item is not None
        assert item[ev.STATUS]["S"] == Status.ACTIVE.value
        assert item[ev.LEASE_TOKEN]["S"] == lease.token
        assert item[ev.SORT_KEY]["N"] == str(lease.deadline_ms)
        assert lease.event.attempt == 1


def test_claim_skips_events_taken_since_the_query(make: Any) -> None:
    """Items another drain claimed after the index read are skipped, not leased."""
    store, batches = make()
    publish(store, 10)
    snapshot = batches.due(Status.CREATED, 10, store.clock())
    taken = store.claim(limit=4).leases
    batches.due = lambda *args: snapshot if args[0] is Status.CREATED else []  # type: ignore[method-assign]
    result = batches.claim(limit=10)
    assert result.skipped == 4
    assert len(result.leases) == 6
    assert not {lease.event.id for lease in taken} & {
        lease.event.id for lease in result.leases
    }
    for lease in taken:
        item = store.get_item(lease.event.id)
        assert item is not None and item[ev.LEASE_TOKEN]["S"] == lease.token


def test_claim_refuses_a_stale_retry_count(make: Any) -> None:
    """An index read older than the item's last failure cannot lease it."""
    clock = Clock()
    store, batches = make(clock=clock, base_backoff_ms=1, max_backoff_ms=1)
    (event,) = publish(store, 1)
    snapshot = batches.due(Status.CREATED, 1, clock())
    lease = store.claim().leases[0]
    store.fail(lease, "boom")
    clock.now += 10
    batches.due = lambda *args: snapshot if args[0] is Status.CREATED else []  # type: ignore[method-assign]
    assert batches.claim().leases == []
    del batches.due
    (again,) = batches.claim().leases
    assert again.event.id == event.id
    assert again.event.attempt == 2


@pytest.mark.parametrize("write_mode", ["partiql", "item"])
def test_claim_refuses_a_copy_from_before_an_operator_retry(
    make: Any, write_mode: str
) -> None:
    """A retried event reads like a stale copy of its last round; the round
    in the condition keeps the copy from naming the lease's event."""
    clock = Clock()
    store, _ = make(clock=clock, write_mode=write_mode)
    writer = make_writer(store)
    (event,) = publish(store, 1)
    stale = store.get_item(event.id)
    assert stale is not None
    store.fail(store.claim().leases[0], "boom", final=True)
    store.retry([event.id])
    clock.now += 10
    assert writer.claim_items([stale]).leases == []
    (lease,) = writer.claim_items([store.get_item(event.id) or {}]).leases
    assert (lease.event.attempt, lease.event.operator_retries) == (1, 1)


def test_a_reclaim_refuses_an_unleased_copy_from_before_an_operator_retry(
    make: Any,
) -> None:
    """An event the TypeScript adapter holds active has no token to pin the
    round: a stale copy of the round before an operator retry (active, same
    retry count) must not reclaim it as that round."""
    clock = Clock()
    store, batches = make(clock=clock)
    stale = {
        ev.ID: {"S": "ts-1"},
        ev.TYPE: {"S": "user.created"},
        ev.PAYLOAD: {"M": {}},
        ev.OCCURRED_AT: {"S": "2026-12-03T13:51:00.123Z"},
        ev.STATUS: {"S": "active"},
        ev.SORT_KEY: {"N": str(clock.now - 1)},
        ev.RETRY_COUNT: {"N": "0"},
    }
    now = {**stale, ev.OPERATOR_RETRIES: {"N": "1"}}
    store.client.put_item(TableName=store.table, Item=now)
    assert batches.claim_items([], expired=[stale]).leases == []
    (lease,) = batches.claim_items([], expired=[now]).leases
    assert (lease.event.attempt, lease.event.operator_retries) == (2, 1)


def test_start_marks_name_their_delivery_until_the_next_claim(make: Any) -> None:
    """Both kinds of start write ``runningBy``; a reclaim clears it."""
    clock = Clock()
    store, batches = make(clock=clock, processing_timeout_ms=1000)
    publish(store, 2)
    first, second = (
        dataclasses.replace(lease, copy=f"copy-{n}")
        for n, lease in enumerate(batches.claim().leases)
    )
    assert batches.begin(first)[0] is not None  # written before the handler
    assert batches.write_back([second], []) == ([True], [], [])  # deferred
    for lease in (first, second):
        stored = store.get_item(lease.event.id) or {}
        assert stored[ev.RUNNING_BY] == {"S": lease.copy}
    clock.now += 10_000
    reclaimed = batches.claim().leases
    assert len(reclaimed) == 2
    for lease in reclaimed:
        stored = store.get_item(lease.event.id) or {}
        assert ev.RUNNING_BY not in stored and ev.RUNNING_SINCE not in stored


def test_start_marks_resent_after_a_lost_reply_still_start(make: Any) -> None:
    """A resent batch finds each delivery's own mark; another delivery's
    start is still refused."""
    store, batches = make()
    publish(store, 2)
    first, second = (
        dataclasses.replace(lease, copy=f"copy-{n}")
        for n, lease in enumerate(batches.claim().leases)
    )
    with lose_next_reply(store, "BatchExecuteStatement") as lost:
        assert batches.write_back([first, second], []) == ([True, True], [], [])
    assert lost == ["BatchExecuteStatement"]
    other = dataclasses.replace(first, copy="copy-other")
    assert batches.write_back([other], []) == ([False], [other], [])


def test_expired_leases_are_redispatched_reclaimed_then_failed(make: Any) -> None:
    """An unstarted expired lease is sent again under its token; a started one
    counts as an attempt, and fails the event when none are left."""
    clock = Clock()
    store, batches = make(clock=clock, max_retries=1, processing_timeout_ms=1000)
    (event,) = publish(store, 1)
    first = batches.claim().leases[0]
    clock.now += 5000
    (again,) = batches.claim().leases  # its message never started
    assert again.token == first.token and again.event.attempt == 1
    started, _ = batches.begin(again)
    assert started is not None
    clock.now += 5000
    (second,) = batches.claim().leases
    assert second.event.id == event.id and second.event.attempt == 2
    assert second.token != first.token
    item = store.get_item(event.id)
    assert item is not None and "LeaseExpired" in item[ev.LAST_ERROR]["S"]
    assert ev.RUNNING_SINCE not in item
    assert batches.complete([first]) == [Outcome.STALE]
    assert batches.begin(second)[0] is not None
    clock.now += 5000
    result = batches.claim()
    assert result.leases == [] and result.exhausted == 1
    assert store.status_of(event.id) is Status.FAILED


def test_begin_starts_once_and_carries_completions(make: Any) -> None:
    """A start is one conditional statement; waiting completions ride along."""
    store, batches = make()
    publish(store, 4)
    first, *others = batches.claim().leases
    store.fail(others[0], "moved on")  # a stale completion among the riders
    counts = count_requests(store)
    started, outcomes = batches.begin(first, completing=others)
    assert counts == {"BatchExecuteStatement": 1}
    assert started is not None and started.token == first.token
    assert outcomes == [Outcome.STALE, Outcome.COMPLETED, Outcome.COMPLETED]
    item = store.get_item(first.event.id)
    assert item is not None and ev.RUNNING_SINCE in item
    assert item[ev.SORT_KEY]["N"] == str(started.deadline_ms)
    assert batches.begin(first) == (None, [])  # a second copy must not run
    assert store.get_item(others[1].event.id) is None


def test_a_stale_lease_in_a_batch_is_a_no_op(make: Any) -> None:
    """In one batch, a stale lease changes nothing while the others complete."""
    clock = Clock()
    store, batches = make(clock=clock)
    publish(store, 3)
    one, two, three = batches.claim().leases
    store.fail(two, "handled elsewhere")  # the event moved on: the lease is stale
    before = store.get_item(two.event.id)
    outcomes = batches.complete([one, two, three])
    assert outcomes == [Outcome.COMPLETED, Outcome.STALE, Outcome.COMPLETED]
    assert store.get_item(one.event.id) is None
    assert store.get_item(three.event.id) is None
    assert store.get_item(two.event.id) == before


def test_forged_tokens_do_not_complete(make: Any) -> None:
    """A completion naming the wrong token leaves the event active."""
    store, batches = make()
    publish(store, 1)
    (lease,) = batches.claim().leases
    forged = Lease(lease.event, "not-the-token", lease.deadline_ms, lease.started_ms)
    assert batches.complete([forged]) == [Outcome.STALE]
    assert store.status_of(lease.event.id) is Status.ACTIVE


def test_keep_mode_keeps_completed_events(make: Any) -> None:
    """With completion=keep a batch completion leaves completed items with a TTL."""
    store, batches = make(completion=Completion.KEEP)
    publish(store, 2)
    leases = batches.claim().leases
    assert batches.complete(leases) == [Outcome.COMPLETED] * 2
    for lease in leases:
        item = store.get_item(lease.event.id)
        assert item is not None
        assert item[ev.STATUS]["S"] == Status.COMPLETED.value
        assert ev.LEASE_TOKEN not in item and ev.EXPIRES_AT in item


def test_insert_never_overwrites(make: Any) -> None:
    """Inserts write new ids and report stored ones without changing them."""
    store, batches = make()
    (old,) = publish(store, 1)
    clash = Event.new("order.created", {"other": True}, id=old.id)
    fresh = [Event.new("order.created", {"n": i}) for i in range(30)]
    counts = count_requests(store)
    report = batches.insert([*fresh[:10], clash, *fresh[10:]])
    assert report.existing == [old.id]
    assert sorted(report.written) == sorted(e.id for e in fresh)
    assert counts["BatchExecuteStatement"] == 2
    item = store.get_item(old.id)
    assert item is not None and Event.from_item(item).payload == old.payload
    assert len(batches.claim(limit=100).leases) == 31


def test_insert_again_of_the_same_event_is_not_a_clash(make: Any) -> None:
    """Resending an insert that landed (a lost response) reports it written."""
    _store, batches = make()
    event = Event.new("order.created", {"n": 1})
    assert batches.insert([event]).written == [event.id]
    assert batches.insert([event]).written == [event.id]


def test_buffered_completions_are_written_together(make: Any) -> None:
    """The writer buffers completions and flushes them in one batch request."""
    store, _ = make(flush_interval_ms=60_000)
    writer = BatchWriter(store)
    publish(store, 5)
    leases = writer.claim().leases
    counts = count_requests(store)
    for lease in leases:
        assert writer.complete(lease) is None
    assert all(store.status_of(lease.event.id) is Status.ACTIVE for lease in leases)
    writer.flush()
    assert counts["BatchExecuteStatement"] == 1
    assert all(store.get_item(lease.event.id) is None for lease in leases)


def test_the_flusher_writes_without_being_asked(make: Any) -> None:
    """A buffered completion is written by the flusher thread within its interval."""
    store, _ = make(flush_interval_ms=5)
    writer = BatchWriter(store)
    publish(store, 30)
    leases = writer.claim().leases
    for lease in leases:
        writer.complete(lease)
    deadline = time.monotonic() + 30
    while any(store.get_item(lease.event.id) for lease in leases):
        assert time.monotonic() < deadline, "the flusher never wrote"
        time.sleep(0.02)


def test_the_writer_sends_buffered_completions_with_the_next_start(
    make: Any,
) -> None:
    """Completions waiting in the worker are written by the next start's request."""
    store, _ = make(flush_interval_ms=60_000)
    writer = BatchWriter(store)
    publish(store, 4)
    *done, nxt = writer.claim().leases
    for lease in done:
        writer.complete(lease)
    counts = count_requests(store)
    assert writer.begin(nxt) is not None
    assert counts == {"BatchExecuteStatement": 1}
    assert all(store.get_item(lease.event.id) is None for lease in done)
    writer.flush()
    assert counts["BatchExecuteStatement"] == 1  # nothing was left to flush


def test_a_deferred_start_is_replaced_by_its_completion(make: Any) -> None:
    """A handler that finishes before the flush costs no start write at all."""
    store, _ = make(flush_interval_ms=60_000)
    writer = BatchWriter(store)
    publish(store, 3)
    leases = writer.claim().leases
    counts = count_requests(store)
    for lease in leases:
        assert writer.begin(lease, defer=True) is lease
    assert counts == {}  # nothing written before the handlers run
    for lease in leases:
        writer.complete(lease)
    writer.flush()
    assert counts == {"BatchExecuteStatement": 1}
    assert all(store.get_item(lease.event.id) is None for lease in leases)


def test_a_deferred_start_is_written_while_its_handler_runs(make: Any) -> None:
    """The flusher marks a running handler's start and restarts its deadline."""
    store, _ = make(flush_interval_ms=5)
    writer = BatchWriter(store)
    publish(store, 1)
    (lease,) = writer.claim().leases
    writer.begin(lease, defer=True)
    deadline = time.monotonic() + 30
    while ev.RUNNING_SINCE not in (store.get_item(lease.event.id) or {}):
        assert time.monotonic() < deadline, "the start mark was never written"
        time.sleep(0.02)
    found = store.get_item(lease.event.id)
    assert found is not None
    assert found[ev.STATUS]["S"] == Status.ACTIVE.value
    assert int(found[ev.SORT_KEY]["N"]) >= lease.deadline_ms
    # A second copy of the message must not start it again.
    assert writer.begin(lease) is None
    writer.complete(lease)
    writer.flush()
    assert store.get_item(lease.event.id) is None


def test_a_failure_drops_the_waiting_start(make: Any) -> None:
    """A failure written at once leaves no start mark behind to write later."""
    store, _ = make(flush_interval_ms=60_000)
    writer = BatchWriter(store)
    publish(store, 1)
    (lease,) = writer.claim().leases
    writer.begin(lease, defer=True)
    writer.discard(lease)
    assert store.fail(lease, "boom", delay_ms=0) is Outcome.RETRYING
    counts = count_requests(store)
    writer.flush()
    assert counts == {}
    found = store.get_item(lease.event.id)
    assert found is not None and ev.RUNNING_SINCE not in found


def test_waiting_write_backs_ride_with_a_written_start(make: Any) -> None:
    """A start written now carries deferred starts and completions, 25 at most."""
    store, _ = make(flush_interval_ms=60_000)
    writer = BatchWriter(store)
    publish(store, 30)
    leases = writer.claim().leases
    first, rest = leases[:15], leases[15:]
    for lease in first:
        writer.begin(lease, defer=True)
    for lease in first[:5]:
        writer.complete(lease)
    counts = count_requests(store)
    assert writer.begin(rest[0]) is not None
    assert counts == {"BatchExecuteStatement": 1}
    for lease in first[:5]:
        assert store.get_item(lease.event.id) is None
    for lease in first[5:]:
        assert ev.RUNNING_SINCE in (store.get_item(lease.event.id) or {})


def test_a_deferred_start_survives_a_failed_flush(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush DynamoDB refuses (throttled, unreachable) keeps the waiting start.

    The handler is already running: a start mark dropped here leaves the lease
    looking unstarted, so at its deadline a drain sends it again under the
    same token (``resent``), whose copy wins the start and runs beside the
    first, and the attempt is never counted.
    """
    from celery_outbox.errors import StoreError

    store, _ = make(flush_interval_ms=60_000)
    writer = BatchWriter(store)
    publish(store, 1)
    (lease,) = writer.claim().leases
    assert writer.begin(lease, defer=True) is lease  # the handler runs
    real = writer.batches.write_back
    refused: list[int] = []

    def refuse_once(*args: Any, **kwargs: Any) -> Any:
        if not refused:
            refused.append(1)
            raise StoreError("DynamoDB kept throttling", "ThrottlingError")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer.batches, "write_back", refuse_once)
    writer.flush()  # refused
    assert refused
    writer.flush()  # DynamoDB answers again
    found = store.get_item(lease.event.id)
    assert found is not None and ev.RUNNING_SINCE in found
    # so a copy sent again under the same lease cannot start it
    assert writer.begin(lease) is None


def test_a_failure_as_the_flush_takes_its_start_is_no_double_run_warning(
    make: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The handler fails just as the flusher takes its start mark.

    The failure is written and the mark then misses: expected, not the
    "it may run twice" warning operators are told to look into.
    """
    import logging

    from celery_outbox import writeback

    store, _ = make(flush_interval_ms=60_000)
    writer = BatchWriter(store)
    publish(store, 1)
    (lease,) = writer.claim().leases
    writer.begin(lease, defer=True)
    real_split = writeback._split

    def fail_meanwhile(entries: Any) -> Any:
        # the handler's failure, between the take and the write
        writer.discard(lease)
        assert store.fail(lease, "boom", delay_ms=0) is Outcome.RETRYING
        return real_split(entries)

    monkeypatch.setattr(writeback, "_split", fail_meanwhile)
    with caplog.at_level(logging.WARNING, logger="celery_outbox.writeback"):
        writer.flush()
    assert "may run twice" not in caplog.text


def _largest_event(store: OutboxStore) -> Event:
    """The largest event emit accepts."""
    low, high = 0, ev.ITEM_LIMIT
    while low < high:
        mid = (low + high + 1) // 2
        try:
            store.put_action(Event.new("order.created", {"p": "x" * mid}))
        except ItemTooLargeError:
            high = mid - 1
        else:
            low = mid
    return Event.new("order.created", {"p": "x" * low})


def test_the_largest_event_emit_accepts_can_be_claimed_started_and_failed(
    make: Any,
) -> None:
    """Emit leaves room for what the lifecycle writes: a big event is no poison.

    An item DynamoDB takes at its limit refuses the claim's, the start's and
    the failure's attributes with a per-statement ValidationError, which
    fails every batch it rides in (the others' claims and write-backs too).
    """
    store, batches = make()
    big = _largest_event(store)
    store.publish([big])
    publish(store, 2)
    claimed = batches.claim()
    assert len(claimed.leases) == 3
    lease = next(le for le in claimed.leases if le.event.id == big.id)
    started, _ = batches.begin(lease)
    assert started is not None
    error = "\u00e9" * store.config.max_error_chars
    assert store.fail(started, error) is Outcome.RETRYING


def test_a_copy_started_after_its_buffered_completion_does_not_run(
    make: Any,
) -> None:
    """A completion waiting in the buffer lands before a start it rides with.

    The first delivery's deferred start was replaced by its completion, so
    the item shows no start mark: a second copy of the message, written at
    once with the waiting completion, must find the event done, not start
    it and run the handler again.
    """
    store, _ = make(flush_interval_ms=60_000)
    writer = BatchWriter(store)
    publish(store, 1)
    (lease,) = writer.claim().leases
    first = dataclasses.replace(lease, copy="first")
    second = dataclasses.replace(lease, copy="second")
    assert writer.begin(first, defer=True) is first
    writer.complete(first)  # the handler ran; its completion waits
    assert writer.begin(second) is None
    assert store.get_item(lease.event.id) is None
