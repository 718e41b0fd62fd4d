"""Sharded status keys: events spread over index partitions, all drained."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from store_support import FakeClock, on_clock, scan

from celery_outbox import Event, OutboxConfig, OutboxStore, Outcome, Status
from celery_outbox import event as ev
from celery_outbox.batch import BatchStore
from celery_outbox.shards import shard_of

SHARDS = 4


def ids_in_shard(shard: int, count: int) -> list[str]:
    """``count`` fresh event ids that fall in ``shard`` of SHARDS."""
    found: list[str] = []
    while len(found) < count:
        candidate = uuid.uuid4().hex
        if shard_of(candidate, SHARDS) == shard:
            found.append(candidate)
    return found


def publish(store: OutboxStore, ids: list[str]) -> None:
    """Publish events with these ids, 25 per transaction."""
    events = [Event.new("order.created", {"n": i}, id=i) for i in ids]
    for start in range(0, len(events), 25):
        store.publish(events[start : start + 25])


def statuses(store: OutboxStore) -> dict[str, str]:
    """Each stored event's raw status value."""
    return {i[ev.ID]["S"]: i[ev.STATUS]["S"] for i in scan(store)}


def test_one_shard_keeps_the_typescript_layout(store_factory: Any) -> None:
    """Without shards the status values are plain ``created`` and ``active``."""
    store = store_factory()
    publish(store, ["a", "b"])
    assert set(statuses(store).values()) == {"created"}
    store.claim()
    assert set(statuses(store).values()) == {"active"}


def test_emits_go_to_their_shard(store_factory: Any) -> None:
    """Each event is written to ``created#k`` with k fixed by its id."""
    store = store_factory(shards=SHARDS)
    ids = [uuid.uuid4().hex for _ in range(40)]
    publish(store, ids)
    assert statuses(store) == {i: f"created#{shard_of(i, SHARDS)}" for i in ids}
    assert len(set(statuses(store).values())) == SHARDS


def test_every_shard_is_drained(store_factory: Any) -> None:
    """Small claims over a backlog in one shard still reach the other shards."""
    store = store_factory(shards=SHARDS, batch_size=5)
    crowded = ids_in_shard(0, 30)
    lonely = [ids_in_shard(k, 1)[0] for k in (1, 2, 3)]
    publish(store, crowded + lonely)
    claimed: set[str] = set()
    for _ in range(SHARDS):
        claimed |= {lease.event.id for lease in store.claim().leases}
    assert set(lonely) <= claimed
    leased = {i: s for i, s in statuses(store).items() if i in claimed}
    assert leased == {i: f"active#{shard_of(i, SHARDS)}" for i in claimed}


def test_the_whole_lifecycle_works_sharded(store_factory: Any) -> None:
    """Complete, fail, reclaim, release, retry and stats all follow the shards."""
    store = store_factory(shards=SHARDS, max_retries=1, processing_timeout_ms=1000)
    clock = on_clock(store, FakeClock())
    ids = [ids_in_shard(k, 1)[0] for k in range(SHARDS)]
    publish(store, ids)
    assert store.stats().counts[Status.CREATED.value] == SHARDS
    assert store.stats().due == SHARDS
    leases = {lease.event.id: lease for lease in store.claim().leases}
    assert store.status_of(ids[0]) is Status.ACTIVE
    assert store.complete(leases[ids[0]]) is Outcome.COMPLETED
    assert store.release(leases[ids[1]]) is Outcome.RETRYING
    assert store.fail(leases[ids[2]], "boom", delay_ms=0) is Outcome.RETRYING
    assert store.fail(leases[ids[3]], "bad", final=True) is Outcome.FAILED
    assert statuses(store) == {
        ids[1]: f"created#{shard_of(ids[1], SHARDS)}",
        ids[2]: f"created#{shard_of(ids[2], SHARDS)}",
        ids[3]: "failed",
    }
    assert store.retry([ids[3]]).retried == [ids[3]]
    assert store.stats().counts[Status.CREATED.value] == 3
    running = store.claim().leases
    assert {lease.event.id for lease in running} == {ids[1], ids[2], ids[3]}
    assert all(store.begin(lease) is not None for lease in running)
    clock.advance(5000)
    again = store.claim()
    assert {lease.event.id for lease in again.leases} == {ids[1], ids[3]}
    assert again.exhausted == 1  # ids[2] had used its one retry
    assert store.status_of(ids[2]) is Status.FAILED


@pytest.mark.integration
def test_batches_drain_every_shard(ddb_local_endpoint: str) -> None:
    """PartiQL claims and completions work on sharded keys, shard by shard."""
    config = OutboxConfig(
        table_name=f"test-{uuid.uuid4().hex[:12]}",
        endpoint_url=ddb_local_endpoint,
        write_mode="partiql",
        shards=SHARDS,
        batch_size=5,
    )
    store = OutboxStore(config)
    store.create_table()
    try:
        batches = BatchStore(store)
        crowded = ids_in_shard(2, 20)
        lonely = [ids_in_shard(k, 1)[0] for k in (0, 1, 3)]
        publish(store, crowded[:10])
        report = batches.insert(
            [Event.new("order.created", id=i) for i in crowded[10:] + lonely]
        )
        assert sorted(report.written) == sorted(crowded[10:] + lonely)
        leases = []
        for _ in range(SHARDS):
            leases += batches.claim().leases
        assert set(lonely) <= {lease.event.id for lease in leases}
        assert set(batches.complete(leases)) == {Outcome.COMPLETED}
        assert all(store.get_item(lease.event.id) is None for lease in leases)
        while True:
            more = batches.claim().leases
            if not more:
                break
            batches.complete(more)
        assert scan(store) == []
    finally:
        store.delete_table()
