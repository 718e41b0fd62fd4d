"""The lifecycle on both backends: claim, leases, write-backs and the poison cap."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import pytest
from store_support import lose_next_reply, on_clock, publish_many, scan

from celery_outbox import (
    ClaimResult,
    Completion,
    Event,
    OutboxConfig,
    OutboxStore,
    Outcome,
    Status,
)

Factory = Callable[..., OutboxStore]


def claim_one(store: OutboxStore) -> Any:
    """Claim and return the single lease a claim must take."""
    (lease,) = store.claim().leases
    return lease


class TestClaim:
    """Claims lease due events through the index, oldest first."""

    def test_claim_leases_due_events(self, store: OutboxStore) -> None:
        """A claim moves due events to active with a token, deadline and start."""
        clock = on_clock(store)
        event = Event.new("a.b", {"n": 1})
        store.publish([event])
        lease = claim_one(store)
        assert lease.event == event
        assert lease.deadline_ms == clock.now + store.config.processing_timeout_ms
        item = store.get_item(event.id)
        assert item is not None
        assert item["status"] == {"S": "active"}
        assert item["leaseToken"] == {"S": lease.token}
        assert item["gsiSortKey"] == {"N": str(lease.deadline_ms)}
        assert item["startedOn"] == {"N": str(clock.now)}

    def test_claim_respects_the_batch_size(self, store_factory: Factory) -> None:
        """A claim takes at most ``batch_size`` events, oldest first."""
        store = store_factory(batch_size=3)
        clock = on_clock(store)
        batch = [Event.new("a.b", n) for n in range(5)]
        for event in batch:
            clock.advance(1)
            store.publish([event])
        result = store.claim()
        assert [lease.event.id for lease in result.leases] == [e.id for e in batch[:3]]

    def test_claim_follows_pages(self, store_factory: Factory) -> None:
        """With one item a page, a claim still fills its batch within its pages."""
        store = store_factory(batch_size=4, max_query_pages=5)
        publish_many(store, [Event.new("a.b", n) for n in range(6)])
        pages: list[int] = []
        original = store.client.query

        def one_a_page(**request: Any) -> Any:
            request["Limit"] = 1
            pages.append(1)
            return original(**request)

        store.client.query = one_a_page
        assert len(store.claim().leases) == 4
        # one page of expired leases (empty), then four of due events
        assert len(pages) == 5

    def test_claim_stops_after_its_page_limit(self, store_factory: Factory) -> None:
        """A claim reads a bounded number of pages, even when the batch is not full."""
        store = store_factory(batch_size=10, max_query_pages=2)
        publish_many(store, [Event.new("a.b", n) for n in range(6)])
        original = store.client.query
        store.client.query = lambda **r: original(**{**r, "Limit": 1})
        assert len(store.claim().leases) == 2

    def test_future_events_are_not_due(self, store: OutboxStore) -> None:
        """An event rescheduled into the future is not claimed before its time."""
        clock = on_clock(store)
        store.publish([Event.new("a.b")])
        lease = claim_one(store)
        store.fail(lease, "boom", delay_ms=5000)
        assert store.claim().leases == []
        clock.advance(5000)
        assert claim_one(store).event.id == lease.event.id

    def test_claimed_events_are_not_claimed_again(self, store: OutboxStore) -> None:
        """A live lease keeps the event from every other claim."""
        on_clock(store)
        store.publish([Event.new("a.b")])
        claim_one(store)
        assert store.claim() == ClaimResult([], 0, 0)


def test_two_drains_race(store: OutboxStore) -> None:
    """Two drains that both saw 50 due events claim each exactly once."""
    batch = [Event.new("race", {"n": n}) for n in range(50)]
    publish_many(store, batch)
    barrier = threading.Barrier(2, timeout=60)
    drains = [OutboxStore(store.config) for _ in range(2)]  # own clients
    for drain in drains:
        query = drain.due

        def due_then_wait(
            status: Status, limit: int, now: int, query: Any = query
        ) -> Any:
            found = query(status, limit, now)
            if status is Status.CREATED:
                assert len(found) == 50  # both saw every event before either claims
                barrier.wait()
            return found

        drain.due = due_then_wait  # type: ignore[method-assign]
    results: dict[int, ClaimResult] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.update({i: drains[i].claim()}))
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    first, second = (results[0], results[1])
    ids = [[lease.event.id for lease in r.leases] for r in (first, second)]
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted(e.id for e in batch)
    assert first.skipped == len(ids[1]) and second.skipped == len(ids[0])
    tokens = {lease.event.id: lease.token for lease in first.leases + second.leases}
    for item in scan(store):
        assert item["status"] == {"S": "active"}
        assert item["leaseToken"] == {"S": tokens[item["id"]["S"]]}


class TestWriteBack:
    """Complete, fail and release, each conditional on the lease."""

    @pytest.mark.parametrize("mode", [Completion.DELETE, Completion.KEEP])
    def test_stale_lease_is_a_no_op(
        self, store_factory: Factory, mode: Completion
    ) -> None:
        """Writes from a reclaimed lease change nothing and raise nothing."""
        store = store_factory(processing_timeout_ms=1000, completion=mode)
        clock = on_clock(store)
        store.publish([Event.new("a.b")])
        old = claim_one(store)
        assert store.begin(old) is not None  # its worker starts, then stalls
        clock.advance(1000)
        new = claim_one(store)
        assert new.token != old.token
        before = scan(store)
        assert store.complete(old) is Outcome.STALE
        assert store.fail(old, "late worker") is Outcome.STALE
        assert store.fail(old, "late worker", final=True) is Outcome.STALE
        assert store.release(old) is Outcome.STALE
        assert scan(store) == before
        assert store.complete(new) is Outcome.COMPLETED
        assert store.complete(new) is Outcome.STALE

    def test_complete_deletes(self, store: OutboxStore) -> None:
        """In delete mode a completed event is gone from the table."""
        store.publish([Event.new("a.b")])
        lease = claim_one(store)
        assert store.complete(lease) is Outcome.COMPLETED
        assert scan(store) == []

    def test_complete_keeps_with_ttl(self, store_factory: Factory) -> None:
        """In keep mode a completed event stays, indexed, with its TTL set."""
        store = store_factory(completion=Completion.KEEP, retention_ms=3_600_000)
        clock = on_clock(store)
        store.publish([Event.new("a.b", {"n": 1})])
        lease = claim_one(store)
        clock.advance(250)
        assert store.complete(lease) is Outcome.COMPLETED
        (item,) = scan(store)
        assert item["status"] == {"S": "completed"}
        assert item["completedOn"] == {"N": str(clock.now)}
        assert item["gsiSortKey"] == {"N": str(clock.now)}
        assert item["expiresAt"] == {"N": str(clock.now // 1000 + 3600)}
        assert "leaseToken" not in item
        assert store.stats().counts[Status.COMPLETED] == 1

    def test_fail_reschedules_with_backoff(self, store: OutboxStore) -> None:
        """A failure with retries left makes the event due after the backoff."""
        clock = on_clock(store)
        store.publish([Event.new("a.b")])
        lease = claim_one(store)
        assert store.fail(lease, ValueError("bad\nthing")) is Outcome.RETRYING
        item = store.get_item(lease.event.id)
        assert item is not None
        delay = int(item["gsiSortKey"]["N"]) - clock.now
        assert 500 <= delay <= 1000  # equal jitter on the 1 s base
        assert item["status"] == {"S": "created"}
        assert item["retryCount"] == {"N": "1"}
        assert item["lastError"] == {"S": "ValueError: bad thing"}
        assert "leaseToken" not in item
        clock.advance(delay)
        again = claim_one(store)
        assert again.event.attempt == 2 and again.retry_count == 1

    def test_fail_with_explicit_delay(self, store: OutboxStore) -> None:
        """``delay_ms`` overrides the backoff (0: due at once)."""
        on_clock(store)
        store.publish([Event.new("a.b")])
        store.fail(claim_one(store), "x", delay_ms=0)
        assert claim_one(store).retry_count == 1

    def test_retries_spent_end_in_failed(self, store_factory: Factory) -> None:
        """The failure after ``max_retries`` retries moves the event to failed."""
        store = store_factory(max_retries=2)
        clock = on_clock(store)
        store.publish([Event.new("a.b")])
        outcomes = []
        for _ in range(3):
            outcomes.append(store.fail(claim_one(store), "boom", delay_ms=0))
        assert outcomes == [Outcome.RETRYING, Outcome.RETRYING, Outcome.FAILED]
        (item,) = scan(store)
        assert item["status"] == {"S": "failed"}
        assert item["gsiSortKey"] == {"N": str(clock.now)}  # still in the index
        assert item["retryCount"] == {"N": "3"}
        assert [f.event.id for f in store.failed().events] == [item["id"]["S"]]

    def test_final_failure(self, store: OutboxStore) -> None:
        """``final=True`` fails the event at once, whatever retries are left."""
        store.publish([Event.new("a.b")])
        assert store.fail(claim_one(store), "no handler", final=True) is Outcome.FAILED
        assert store.stats().counts[Status.FAILED] == 1

    def test_long_errors_are_cut(self, store_factory: Factory) -> None:
        """``lastError`` holds at most ``max_error_chars`` characters, on one line."""
        store = store_factory(max_error_chars=40)
        store.publish([Event.new("a.b")])
        lease = claim_one(store)
        store.fail(lease, "Traceback\n" + "x" * 500, final=True)
        item = store.get_item(lease.event.id)
        assert item is not None
        error = item["lastError"]["S"]
        assert len(error) == 40 and error.endswith("…") and "\n" not in error

    def test_release_gives_the_event_back(self, store: OutboxStore) -> None:
        """A released lease makes the event due now without using an attempt."""
        on_clock(store)
        store.publish([Event.new("a.b")])
        assert store.release(claim_one(store)) is Outcome.RETRYING
        assert claim_one(store).retry_count == 0


class TestPoisonCap:
    """A lost worker's attempt counts, so a poison event ends in failed."""

    def test_reclaim_counts_as_a_failed_attempt(self, store_factory: Factory) -> None:
        """Each reclaim after an expired lease adds one to the retry count."""
        store = store_factory(max_retries=2, processing_timeout_ms=1000)
        clock = on_clock(store)
        store.publish([Event.new("poison")])
        first = claim_one(store)
        assert first.retry_count == 0
        assert store.begin(first) is not None  # its handler starts, then dies
        clock.advance(999)
        assert store.claim().leases == []  # the lease still holds
        for expected in (1, 2):
            clock.advance(1)
            lease = claim_one(store)
            assert lease.retry_count == expected
            assert lease.event.attempt == expected + 1
            assert store.begin(lease) is not None
            clock.advance(999)
        clock.advance(1)
        result = store.claim()
        assert result.leases == [] and result.exhausted == 1
        (item,) = scan(store)
        assert item["status"] == {"S": "failed"}
        assert item["retryCount"] == {"N": "3"}
        assert item["gsiSortKey"] == {"N": str(clock.now)}
        assert item["lastError"]["S"].startswith("LeaseExpired: attempt 3")
        assert "leaseToken" not in item

    def test_failures_and_lost_workers_add_up(self, store_factory: Factory) -> None:
        """Reported failures and lost attempts share the one retry budget."""
        store = store_factory(max_retries=1, processing_timeout_ms=1000)
        clock = on_clock(store)
        store.publish([Event.new("poison")])
        store.fail(claim_one(store), "boom", delay_ms=0)
        store.begin(claim_one(store))  # attempt 2 starts, its worker dies
        clock.advance(1000)
        assert store.claim().exhausted == 1
        assert store.stats().counts[Status.FAILED] == 1

    def test_unstarted_lease_costs_no_attempt(self, store_factory: Factory) -> None:
        """A lease whose handler never started is sent again without a retry."""
        store = store_factory(max_retries=0, processing_timeout_ms=1000)
        clock = on_clock(store)
        store.publish([Event.new("queued")])
        first = claim_one(store)  # its message waits in the broker
        clock.advance(1000)
        again = claim_one(store)
        assert again.event.attempt == 1 and again.token == first.token
        assert again.deadline_ms == clock.now + 1000
        assert store.begin(first) is not None  # the first copy to arrive runs
        assert store.begin(again) is None  # the other one must not

    def test_a_start_mark_resent_after_a_lost_reply_still_starts(
        self, store: OutboxStore
    ) -> None:
        """botocore's resend finds the delivery's own mark and starts it; a
        second delivery of the same lease still may not."""
        store.publish([Event.new("mark")])
        lease = dataclasses.replace(claim_one(store), copy="first")
        with lose_next_reply(store, "UpdateItem") as lost:
            started = store.begin(lease)
        assert lost == ["UpdateItem"] and started is not None
        item = store.get_item(lease.event.id) or {}
        assert item["runningBy"] == {"S": "first"}
        assert store.begin(dataclasses.replace(lease, copy="second")) is None

    def test_expired_leases_go_first(self, store_factory: Factory) -> None:
        """A lost worker's event is reclaimed before newer due events."""
        store = store_factory(batch_size=1, processing_timeout_ms=1000)
        clock = on_clock(store)
        store.publish([Event.new("lost")])
        lost = claim_one(store)
        store.publish([Event.new("fresh")])
        clock.advance(1000)
        assert claim_one(store).event.id == lost.event.id


class TestBackoff:
    """Exponential backoff with equal jitter: never zero, never above the cap."""

    class Edge:
        """A random source that always draws its lowest or highest value."""

        def __init__(self, high: bool) -> None:
            self.high = high

        def uniform(self, low: float, high: float) -> float:
            return high if self.high else low

    def make(self, high: bool, **options: Any) -> OutboxStore:
        config = OutboxConfig(**options)
        return OutboxStore(config, rng=self.Edge(high))  # type: ignore[arg-type]

    def test_exponential_and_capped(self) -> None:
        """The longest delay doubles from the base until the cap holds it."""
        store = self.make(True, base_backoff_ms=1000, max_backoff_ms=30_000)
        delays = [store.backoff_ms(n) for n in range(1, 9)]
        assert delays == [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]

    def test_jitter_floor_is_half(self) -> None:
        """The shortest delay is half of the longest, never zero."""
        store = self.make(False, base_backoff_ms=1000, max_backoff_ms=30_000)
        delays = [store.backoff_ms(n) for n in range(1, 8)]
        assert delays == [500, 1000, 2000, 4000, 8000, 15000, 15000]

    def test_one_millisecond_base_never_reaches_zero(self) -> None:
        """Even a 1 ms base and cap give at least 1 ms."""
        store = self.make(False, base_backoff_ms=1, max_backoff_ms=1)
        assert [store.backoff_ms(n) for n in (1, 2, 100)] == [1, 1, 1]

    def test_huge_retry_counts_stay_capped(self) -> None:
        """A retry count far past the cap does not overflow or pass the cap."""
        store = self.make(True, base_backoff_ms=1000, max_backoff_ms=300_000)
        assert store.backoff_ms(10_000) == 300_000

    def test_random_draws_stay_in_range(self) -> None:
        """Real draws stay between half the delay and the capped delay."""
        config = OutboxConfig(base_backoff_ms=100, max_backoff_ms=5000)
        store = OutboxStore(config)
        for retries in range(1, 12):
            ceiling = min(5000, 100 * 2 ** (retries - 1))
            for _ in range(200):
                delay = store.backoff_ms(retries)
                assert ceiling / 2 <= delay <= ceiling


class TestTypeScriptCompatibility:
    """Items written by the TypeScript adapter drain here unchanged."""

    def ts_item(self, event_id: str, now: int, **extra: Any) -> dict[str, Any]:
        """An event exactly as the TypeScript adapter writes it."""
        return {
            "id": {"S": event_id},
            "type": {"S": "user.created"},
            "payload": {"M": {"name": {"S": "Ada"}, "age": {"N": "36"}}},
            "occurredAt": {"S": "2026-12-03T13:51:00.123Z"},
            "status": {"S": "created"},
            "gsiSortKey": {"N": str(now)},
            "retryCount": {"N": "0"},
            **extra,
        }

    def test_claimed_and_completed_unchanged(self, store_factory: Factory) -> None:
        """A TypeScript item is claimed and completed with its fields as written."""
        store = store_factory(completion=Completion.KEEP)
        clock = on_clock(store)
        raw = self.ts_item("ts-1", clock.now)
        store.client.put_item(TableName=store.table, Item=raw)
        lease = claim_one(store)
        assert lease.event == Event(
            id="ts-1",
            type="user.created",
            payload={"name": "Ada", "age": 36},
            occurred_at="2026-12-03T13:51:00.123Z",
        )
        assert store.complete(lease) is Outcome.COMPLETED
        (item,) = scan(store)
        for name in ("id", "type", "payload", "occurredAt", "retryCount"):
            assert item[name] == raw[name]
        assert item["status"] == {"S": "completed"}
        assert item["completedOn"] == {"N": str(clock.now)}

    def test_typescript_active_item_is_reclaimed(self, store: OutboxStore) -> None:
        """An event the TypeScript adapter left active (no lease token) is reclaimed."""
        clock = on_clock(store)
        raw = self.ts_item("ts-2", clock.now - 1, status={"S": "active"})
        store.client.put_item(TableName=store.table, Item=raw)
        lease = claim_one(store)
        assert lease.event.id == "ts-2" and lease.retry_count == 1
        assert store.complete(lease) is Outcome.COMPLETED
        assert scan(store) == []

    def test_item_without_retry_count(self, store: OutboxStore) -> None:
        """An active item with no retry count at all is reclaimed as attempt 2."""
        clock = on_clock(store)
        raw = self.ts_item("ts-3", clock.now - 1, status={"S": "active"})
        del raw["retryCount"]
        store.client.put_item(TableName=store.table, Item=raw)
        assert claim_one(store).retry_count == 1
