"""The management tasks, run eagerly against moto's DynamoDB."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_outbox import ArgumentError, Event, Outbox, OutboxConfig, Status
from celery_outbox import management as mgmt


def make_outbox(endpoint: str, **options: Any) -> Outbox:
    """An eager Celery app with an outbox on a fresh table."""
    table = f"mgmt-{uuid.uuid4().hex[:10]}"
    app = Celery(table, broker="memory://", set_as_current=False)
    app.conf.task_always_eager = True
    config = OutboxConfig(
        table_name=table, endpoint_url=endpoint, completion="keep", **options
    )
    outbox = Outbox(app, config=config)
    outbox.store.create_table()
    return outbox


def fail_events(outbox: Outbox, *events: Event) -> None:
    """Publish ``events`` and move each to ``failed``."""
    outbox.store.publish(list(events))
    for lease in outbox.store.claim().leases:
        outbox.store.fail(lease, "ValueError: card declined", final=True)


@pytest.fixture
def outbox(moto_endpoint: str) -> Iterator[Outbox]:
    """An installed outbox on a fresh moto table."""
    made = make_outbox(moto_endpoint)
    yield made
    made.store.delete_table()


def run(outbox: Outbox, name: str, **kwargs: Any) -> Any:
    """Run management task ``name`` and return its result, checked as JSON."""
    result = outbox.app.tasks[name].apply_async(kwargs=kwargs).get()
    assert json.loads(json.dumps(result)) == result
    return result


def test_tasks_are_registered_under_their_names(outbox: Outbox) -> None:
    """Installing an outbox registers the four management tasks by name."""
    assert set(mgmt.TASK_NAMES) <= set(outbox.app.tasks)
    assert mgmt.installed(outbox.app) is outbox
    for name in mgmt.TASK_NAMES:
        assert outbox.app.tasks[name].ignore_result is False


def test_failed_events_pages_and_redacts(outbox: Outbox) -> None:
    """failed_events pages by cursor and shows payload keys, never values."""
    events = [
        Event.new("order.created", {"email": f"user{i}@example.com"}) for i in range(3)
    ]
    fail_events(outbox, *events)
    first = run(outbox, mgmt.FAILED_EVENTS, limit=2)
    rest = run(outbox, mgmt.FAILED_EVENTS, limit=2, cursor=first["cursor"])
    assert rest["cursor"] is None
    listed = first["events"] + rest["events"]
    assert sorted(e["id"] for e in listed) == sorted(e.id for e in events)
    assert all(e["payload"] == {"email": "<str>"} for e in listed)
    assert "example.com" not in json.dumps(listed)
    assert listed[0]["last_error"] == "ValueError: card declined"


def test_failed_events_filters_by_type(outbox: Outbox) -> None:
    """failed_events with a type lists only failed events of that type."""
    fail_events(outbox, Event.new("a.one"), Event.new("b.two"))
    result = run(outbox, mgmt.FAILED_EVENTS, type="b.two")
    assert [e["type"] for e in result["events"]] == ["b.two"]


def test_retry_failed_by_ids(outbox: Outbox) -> None:
    """retry_failed with ids retries those and reports unknown ones."""
    kept, retried = Event.new("a.one"), Event.new("a.one")
    fail_events(outbox, kept, retried)
    report = run(outbox, mgmt.RETRY_FAILED, ids=[retried.id, "missing"])
    assert report == {"retried": [retried.id], "missing": ["missing"], "not_failed": []}
    assert outbox.store.status_of(retried.id) is Status.CREATED
    assert outbox.store.status_of(kept.id) is Status.FAILED


def test_retry_failed_by_type(outbox: Outbox) -> None:
    """retry_failed with a type retries every failed event of that type only."""
    one, two = Event.new("a.one"), Event.new("b.two")
    fail_events(outbox, one, two)
    report = run(outbox, mgmt.RETRY_FAILED, type="b.two")
    assert report["retried"] == [two.id]
    assert outbox.store.status_of(one.id) is Status.FAILED


def test_retry_failed_without_arguments_retries_all(outbox: Outbox) -> None:
    """retry_failed with no arguments retries every failed event."""
    events = [Event.new("a.one"), Event.new("b.two")]
    fail_events(outbox, *events)
    report = run(outbox, mgmt.RETRY_FAILED)
    assert sorted(report["retried"]) == sorted(e.id for e in events)


def test_stats_counts_statuses(outbox: Outbox) -> None:
    """stats counts events per status and reports the due ones."""
    fail_events(outbox, Event.new("a.one"))
    outbox.emit("a.one")
    result = run(outbox, mgmt.STATS)
    assert result["counts"]["failed"] == 1
    assert result["counts"]["created"] == 1
    assert result["due"] == 1
    assert result["oldest_due_age_ms"] >= 0


def test_purge_completed_deletes_old_completed(outbox: Outbox) -> None:
    """purge_completed deletes kept completed events older than the age given."""
    event = outbox.emit("a.one")
    (lease,) = outbox.store.claim().leases
    outbox.store.complete(lease)
    assert run(outbox, mgmt.PURGE_COMPLETED, older_than_ms=3_600_000) == {"purged": 0}
    assert run(outbox, mgmt.PURGE_COMPLETED, older_than_ms=0) == {"purged": 1}
    assert outbox.store.status_of(event.id) is None


def test_retry_failed_with_an_empty_id_list_retries_nothing(outbox: Outbox) -> None:
    """An empty list of ids names no event: it must not retry every failed one."""
    event = Event.new("a.one")
    fail_events(outbox, event)
    report = run(outbox, mgmt.RETRY_FAILED, ids=[])
    assert report == {"retried": [], "missing": [], "not_failed": []}
    assert outbox.store.status_of(event.id) is Status.FAILED


def test_retry_failed_refuses_ids_with_a_type(outbox: Outbox) -> None:
    """A type does not filter ids (as in the CLI): refused, nothing retried."""
    one, two = Event.new("a.one"), Event.new("b.two")
    fail_events(outbox, one, two)
    with pytest.raises(ArgumentError, match="type"):
        run(outbox, mgmt.RETRY_FAILED, ids=[one.id], type="b.two")
    assert outbox.store.status_of(one.id) is Status.FAILED
    assert outbox.store.status_of(two.id) is Status.FAILED
