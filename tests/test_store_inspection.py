"""Operator calls on both backends: failed listings, retries, counts and purges."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.stub import Stubber
from store_support import FakeClock, on_clock, publish_many, scan

from celery_outbox import (
    Completion,
    Event,
    EventNotFoundError,
    EventStatusError,
    OutboxConfig,
    OutboxStore,
    Status,
    UnprocessedItemsError,
    tasks,
)


def fail_events(store: OutboxStore, clock: FakeClock, types: list[str]) -> list[str]:
    """One failed event per type, each failing 10 ms after the one before."""
    ids = []
    for n, type in enumerate(types):
        clock.advance(10)
        event = Event.new(type, {"n": n})
        store.publish([event])
        (lease,) = store.claim().leases
        store.fail(lease, f"error {n}", final=True)
        ids.append(event.id)
    return ids


class TestFailedListing:
    """Failed events are listed newest first, a page at a time."""

    def test_pages_newest_first(self, store: OutboxStore) -> None:
        """Pages of three follow each other through cursors, newest failure first."""
        clock = on_clock(store)
        ids = fail_events(store, clock, ["a"] * 7)
        pages, cursor = [], None
        while True:
            page = store.failed(limit=3, cursor=cursor)
            pages.append([f.event.id for f in page.events])
            cursor = page.cursor
            if cursor is None:
                break
        newest_first = ids[::-1]
        assert pages == [newest_first[0:3], newest_first[3:6], newest_first[6:]]

    def test_failed_event_details(self, store: OutboxStore) -> None:
        """A failed event shows its retries, last error and failure time."""
        clock = on_clock(store)
        (event_id,) = fail_events(store, clock, ["order.created"])
        (failed,) = store.failed().events
        assert failed.event.id == event_id
        assert failed.event.type == "order.created"
        assert failed.retry_count == 1
        assert failed.last_error == "error 0"
        assert failed.failed_ms == clock.now
        assert failed.as_dict()["failed_at"].endswith("Z")

    def test_type_filter_across_pages(self, store: OutboxStore) -> None:
        """A type filter keeps its order and page size across pages."""
        clock = on_clock(store)
        types = ["x", "y", "y", "x", "y", "x", "y", "y"]
        ids = fail_events(store, clock, types)
        wanted = [i for i, t in zip(ids, types, strict=True) if t == "y"][::-1]
        first = store.failed(limit=3, type="y")
        assert [f.event.id for f in first.events] == wanted[:3]
        second = store.failed(limit=3, type="y", cursor=first.cursor)
        assert [f.event.id for f in second.events] == wanted[3:]
        assert second.cursor is None

    def test_default_page_is_a_hundred(self, store: OutboxStore) -> None:
        """Without a limit, a page holds 100 failed events, then a cursor."""
        now = on_clock(store).now
        items = []
        for n in range(101):
            item = Event.new("a.b", n).to_item(now)
            item.update(status={"S": "failed"}, gsiSortKey={"N": str(now - n)})
            items.append({"PutRequest": {"Item": item}})
        for start in range(0, len(items), 25):
            store.client.batch_write_item(
                RequestItems={store.table: items[start : start + 25]}
            )
        page = store.failed()
        assert len(page.events) == 100 and page.cursor is not None
        assert len(store.failed(cursor=page.cursor).events) == 1
        assert len(list(store.iter_failed())) == 101


class TestRetry:
    """Operators move failed events back to created."""

    def test_retry_report(self, store: OutboxStore) -> None:
        """A retry reports retried, missing and not-failed ids, and resets retries."""
        clock = on_clock(store)
        failed = fail_events(store, clock, ["a", "a"])
        waiting = Event.new("a.b")
        store.publish([waiting])
        report = store.retry([failed[0], waiting.id, "no-such-id", failed[1]])
        assert report.as_dict() == {
            "retried": failed,
            "missing": ["no-such-id"],
            "not_failed": [waiting.id],
        }
        item = store.get_item(failed[0])
        assert item is not None
        assert item["status"] == {"S": "created"}
        assert item["retryCount"] == {"N": "0"}
        assert item["gsiSortKey"] == {"N": str(clock.now)}
        assert "lastError" not in item
        leases = store.claim().leases
        assert {lease.event.id for lease in leases} == {*failed, waiting.id}

    def test_each_operator_retry_is_counted(self, store: OutboxStore) -> None:
        """Attempts start again from 1; ``operatorRetries`` tells the rounds apart."""
        clock = on_clock(store)
        (event_id,) = fail_events(store, clock, ["a"])
        assert "operatorRetries" not in (store.get_item(event_id) or {})
        for round_ in (1, 2):
            assert store.retry([event_id], strict=round_ == 2).retried == [event_id]
            item = store.get_item(event_id) or {}
            assert item["operatorRetries"] == {"N": str(round_)}
            (lease,) = store.claim().leases
            assert (lease.event.attempt, lease.event.operator_retries) == (1, round_)
            assert tasks.task_id(lease) == f"outbox:{event_id}:1:retry{round_}"
            store.fail(lease, "again", final=True)

    def test_retry_failed_by_type(self, store: OutboxStore) -> None:
        """``retry_failed`` retries every failed event of one type."""
        clock = on_clock(store)
        ids = fail_events(store, clock, ["x", "y", "x"])
        report = store.retry_failed(type="x")
        assert sorted(report.retried) == sorted([ids[0], ids[2]])
        assert [f.event.id for f in store.failed().events] == [ids[1]]

    def test_strict_retry_is_all_or_nothing(self, store: OutboxStore) -> None:
        """A strict retry with one unknown id retries none of the others."""
        clock = on_clock(store)
        ids = fail_events(store, clock, ["a", "a"])
        before = scan(store)
        with pytest.raises(EventNotFoundError) as caught:
            store.retry([ids[0], "ghost", ids[1]], strict=True)
        assert caught.value.event_ids == ["ghost"]
        assert scan(store) == before
        assert store.retry(ids, strict=True).retried == ids

    def test_strict_retry_of_a_waiting_event(self, store: OutboxStore) -> None:
        """A strict retry of an event that is not failed names its status."""
        store.publish([Event.new("a.b", id="waiting")])
        before = scan(store)
        with pytest.raises(EventStatusError) as caught:
            store.retry(["waiting"], strict=True)
        assert caught.value.statuses == {"waiting": "created"}
        assert "'waiting' is created" in str(caught.value)
        assert scan(store) == before


def test_stats(store: OutboxStore) -> None:
    """Stats count each status, the due events, expired leases and the oldest wait."""
    clock = on_clock(store)
    fail_events(store, clock, ["a"])
    store.publish([Event.new("a.b")])
    store.claim()  # now active
    clock.advance(100)
    store.publish([Event.new("a.b")])
    clock.advance(400)
    store.publish([Event.new("a.b")])
    stats = store.stats()
    assert stats.counts == {"created": 2, "active": 1, "completed": 0, "failed": 1}
    assert stats.due == 2
    assert stats.oldest_due_age_ms == 400
    assert stats.expired == 0
    clock.advance(store.config.processing_timeout_ms)
    assert store.stats().expired == 1
    assert store.stats().as_dict()["counts"]["failed"] == 1


def test_stats_of_an_empty_table(store: OutboxStore) -> None:
    """An empty outbox has zero counts and no oldest due event."""
    stats = store.stats()
    assert set(stats.counts.values()) == {0}
    assert stats.due == 0 and stats.oldest_due_age_ms is None


def test_purge_completed(store_factory: Any) -> None:
    """Purging deletes kept completed events older than the cut-off, and only those."""
    store = store_factory(completion=Completion.KEEP)
    clock = on_clock(store)
    publish_many(store, [Event.new("a.b", n) for n in range(30)])
    for lease in store.claim(limit=30).leases:
        store.complete(lease)
    clock.advance(60_000)
    publish_many(store, [Event.new("a.b", n) for n in range(2)])
    for lease in store.claim().leases:
        store.complete(lease)
    store.publish([Event.new("still.waiting")])
    assert store.purge_completed(older_than_ms=30_000) == 30
    assert store.stats().counts == {
        "created": 1,
        "active": 0,
        "completed": 2,
        "failed": 0,
    }
    assert store.purge_completed(older_than_ms=0) == 2


def test_purge_older_than_any_event_purges_nothing(store_factory: Any) -> None:
    """An age beyond the epoch (even past DynamoDB's 38 digits) purges nothing.

    It is a valid whole number: the answer is none, not a DynamoDB error.
    """
    store = store_factory(completion=Completion.KEEP)
    store.publish([Event.new("a.b")])
    for lease in store.claim().leases:
        store.complete(lease)
    assert store.purge_completed(older_than_ms=10**40) == 0
    assert store.purge_completed(older_than_ms=2**63) == 0
    assert store.stats().counts["completed"] == 1


class TestBatchDelete:
    """Batch deletes resend what DynamoDB leaves unprocessed (Stubber)."""

    def stubbed(self) -> tuple[OutboxStore, Stubber]:
        store = OutboxStore(OutboxConfig(table_name="events"))
        store._sleep = lambda seconds: None
        return store, Stubber(store.client)

    @staticmethod
    def request(*ids: str) -> dict[str, Any]:
        return {
            "RequestItems": {
                "events": [{"DeleteRequest": {"Key": {"id": {"S": i}}}} for i in ids]
            }
        }

    def test_unprocessed_items_are_resent(self) -> None:
        """Items DynamoDB leaves unprocessed are sent again, and only those."""
        store, stub = self.stubbed()
        left = self.request("b", "c")["RequestItems"]
        stub.add_response(
            "batch_write_item", {"UnprocessedItems": left}, self.request("a", "b", "c")
        )
        stub.add_response(
            "batch_write_item", {"UnprocessedItems": {}}, self.request("b", "c")
        )
        with stub:
            store.batch_delete(["a", "b", "c"])
        stub.assert_no_pending_responses()

    def test_giving_up_names_the_ids(self) -> None:
        """After its attempts, a batch delete raises naming the unprocessed ids."""
        store, stub = self.stubbed()
        left = self.request("b")["RequestItems"]
        stub.add_response(
            "batch_write_item", {"UnprocessedItems": left}, self.request("a", "b")
        )
        for _ in range(2):
            stub.add_response(
                "batch_write_item", {"UnprocessedItems": left}, self.request("b")
            )
        with stub, pytest.raises(UnprocessedItemsError) as caught:
            store.batch_delete(["a", "b"], attempts=3)
        assert caught.value.event_ids == ["b"]
        assert "'b'" in str(caught.value)

    def test_chunks_of_twenty_five(self) -> None:
        """More than 25 ids go out in requests of at most 25, duplicates once."""
        store, stub = self.stubbed()
        ids = [f"e{n}" for n in range(30)]
        stub.add_response("batch_write_item", {}, self.request(*ids[:25]))
        stub.add_response("batch_write_item", {}, self.request(*ids[25:]))
        with stub:
            store.batch_delete(ids + ids[:3])
        stub.assert_no_pending_responses()


def test_status_of(store: OutboxStore) -> None:
    """``status_of`` gives an event's status, or None for an unknown id."""
    store.publish([Event.new("a.b", id="e-1")])
    assert store.status_of("e-1") is Status.CREATED
    assert store.status_of("unknown") is None
