"""Emitting on both backends: ids, payloads, atomic publishes and collectors."""

from __future__ import annotations

import copy
import math
import re
import uuid
from typing import Any

import pytest
from store_support import scan

from celery_outbox import (
    Event,
    EventExistsError,
    Outbox,
    OutboxStore,
    PayloadError,
    Status,
    TableError,
    TransactionCancelledError,
)

ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def producer(store: OutboxStore) -> Outbox:
    """A producer-only outbox on the store's table and client."""
    return Outbox(config=store.config, client=store.client)


def orders_table(store: OutboxStore) -> str:
    """A business table beside the outbox, keyed on ``order_id``."""
    name = f"orders-{uuid.uuid4().hex[:8]}"
    store.client.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "order_id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "order_id", "KeyType": "HASH"}],
    )
    return name


def test_generated_ids(store: OutboxStore) -> None:
    """Events emitted without an id get distinct UUIDs and are stored under them."""
    outbox = producer(store)
    emitted = [outbox.emit("order.created", {"n": n}) for n in range(3)]
    ids = [e.id for e in emitted]
    assert len(set(ids)) == 3
    assert all(uuid.UUID(i) for i in ids)
    assert sorted(i["id"]["S"] for i in scan(store)) == sorted(ids)


def test_item_layout_is_the_typescript_adapters(store: OutboxStore) -> None:
    """A stored event carries DESIGN.md's attributes, names and types, and no more."""
    event = Event.new("order.created", {"total": 30.4, "lines": [1, 2]})
    before = store.clock()
    store.publish([event])
    item = store.get_item(event.id)
    assert item is not None
    assert {name: next(iter(value)) for name, value in item.items()} == {
        "id": "S",
        "type": "S",
        "payload": "M",
        "occurredAt": "S",
        "status": "S",
        "gsiSortKey": "N",
        "retryCount": "N",
    }
    assert item["type"] == {"S": "order.created"}
    assert item["status"] == {"S": "created"}
    assert item["retryCount"] == {"N": "0"}
    assert ISO_MS.fullmatch(item["occurredAt"]["S"])
    assert before <= int(item["gsiSortKey"]["N"]) <= store.clock()
    assert item["payload"]["M"]["total"] == {"N": "30.4"}


def test_existing_id_is_never_overwritten(store: OutboxStore) -> None:
    """Publishing an id that is stored raises and leaves the stored event alone."""
    store.publish([Event.new("a.b", {"v": 1}, id="e-1")])
    before = scan(store)
    with pytest.raises(EventExistsError) as caught:
        store.publish([Event.new("a.b", {"v": 2}, id="e-1")])
    assert caught.value.event_ids == ["e-1"]
    assert scan(store) == before


def test_publish_of_many_is_atomic(store: OutboxStore) -> None:
    """One stored id among many makes the whole publish fail, writing nothing."""
    store.publish([Event.new("a.b", id="taken")])
    before = scan(store)
    batch = [Event.new("a.b", {"n": n}) for n in range(5)]
    batch.insert(3, Event.new("a.b", id="taken"))
    with pytest.raises(EventExistsError) as caught:
        store.publish(batch)
    assert caught.value.event_ids == ["taken"]
    assert scan(store) == before


def test_publish_of_a_hundred(store: OutboxStore) -> None:
    """A hundred events go out in one publish, all due."""
    batch = [Event.new("a.b", {"n": n}) for n in range(100)]
    store.publish(batch)
    assert store.stats().counts[Status.CREATED] == 100


PAYLOADS: list[tuple[str, Any]] = [
    ("float", 30.4),
    ("int", 3),
    ("bool", True),
    ("large int", 12345678901234567890123456789012345678),
    ("negative float", -0.000123),
    ("nested", {"a": [{"b": {"c": [1, 2.5, None, "x"]}}], "d": {}}),
    ("empty strings", {"e": "", "l": [""]}),
    ("unicode", {"name": "Zoë 東京 🎉"}),
    ("string", "hello"),
    ("list", [1, "a", None]),
    ("null", None),
    ("empty string", ""),
]


@pytest.mark.parametrize(
    "value", [v for _, v in PAYLOADS], ids=[n for n, _ in PAYLOADS]
)
def test_payload_round_trip(store: OutboxStore, value: Any) -> None:
    """A payload comes back from DynamoDB equal and of the same type."""
    store.publish([Event.new("a.b", value)])
    (lease,) = store.claim().leases
    assert lease.event.payload == value
    assert type(lease.event.payload) is type(value)


def test_deepest_payload_is_accepted(store: OutboxStore) -> None:
    """31 nested maps, the most DynamoDB Local takes, are stored and read back."""
    value: Any = "leaf"
    for _ in range(31):
        value = {"k": value}
    store.publish([Event.new("a.b", value)])
    (lease,) = store.claim().leases
    assert lease.event.payload == value


REJECTED: list[tuple[str, Any, str]] = [
    ("nan", {"price": math.nan}, "payload['price']"),
    ("inf", [math.inf], "payload[0]"),
    ("set", {"tags": {"a"}}, "payload['tags']"),
    ("bytes", {"raw": b"\x00"}, "payload['raw']"),
    ("tuple", {"pair": (1, 2)}, "payload['pair']"),
    ("int key", {"m": {2: "x"}}, "payload['m'][2]"),
    ("39-digit int", [10**38], "payload[0]"),
]


@pytest.mark.parametrize(
    ("value", "path"), [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED]
)
def test_rejected_payload_writes_nothing(
    store: OutboxStore, value: Any, path: str
) -> None:
    """A payload that is not JSON is refused before the write, naming its path."""
    outbox = producer(store)
    with pytest.raises(PayloadError) as caught:
        outbox.emit("a.b", value)
    assert caught.value.path == path
    assert scan(store) == []


def test_explicit_collector(store: OutboxStore) -> None:
    """An emit into a caller's list appends an action and writes nothing yet."""
    outbox = producer(store)
    items: list[dict[str, Any]] = []
    event = outbox.emit("a.b", {"n": 1}, collector=items)
    assert len(items) == 1
    assert scan(store) == []
    store.commit(items)
    assert store.status_of(event.id) is Status.CREATED


def test_ambient_collector(store: OutboxStore) -> None:
    """Emits inside ``collecting()`` go to the bound list, not to DynamoDB."""
    outbox = producer(store)
    with outbox.collecting() as items:
        first = outbox.emit("a.b", 1)
        second = outbox.emit("a.b", 2)
    assert [a["Put"]["Item"]["id"]["S"] for a in items] == [first.id, second.id]
    assert scan(store) == []
    outbox.emit("a.b", 3)  # outside the block: written at once
    assert len(scan(store)) == 1


def test_transaction_commits_business_items_and_events(store: OutboxStore) -> None:
    """``transaction()`` writes the caller's item and the event together."""
    outbox = producer(store)
    orders = orders_table(store)
    with outbox.transaction() as tx:
        tx.put(orders, {"order_id": "o-1", "total": 30.4})
        event = outbox.emit("order.created", {"order_id": "o-1"})
    assert scan(store, orders) == [{"order_id": {"S": "o-1"}, "total": {"N": "30.4"}}]
    assert store.status_of(event.id) is Status.CREATED


def test_exception_in_transaction_writes_nothing(store: OutboxStore) -> None:
    """An exception inside the block discards the business item and the event."""
    outbox = producer(store)
    orders = orders_table(store)
    with pytest.raises(RuntimeError), outbox.transaction() as tx:
        tx.put(orders, {"order_id": "o-1"})
        outbox.emit("order.created", {"order_id": "o-1"})
        raise RuntimeError("payment declined")
    assert scan(store, orders) == []
    assert scan(store) == []


def test_nested_transaction_joins_the_outer_one(store: OutboxStore) -> None:
    """An inner transaction commits nothing itself; the outer block decides."""
    outbox = producer(store)
    orders = orders_table(store)

    def place(order_id: str) -> None:
        with outbox.transaction() as inner:
            inner.put(orders, {"order_id": order_id})
            outbox.emit("order.created", {"order_id": order_id})

    with pytest.raises(RuntimeError), outbox.transaction():
        place("o-1")
        assert scan(store) == []  # not committed by the inner block
        raise RuntimeError("outer block fails")
    assert scan(store, orders) == []
    assert scan(store) == []


def test_failed_inner_transaction_takes_back_its_own_actions(
    store: OutboxStore,
) -> None:
    """An exception leaving an inner block removes only what it added."""
    outbox = producer(store)
    orders = orders_table(store)
    with outbox.transaction() as outer:
        outer.put(orders, {"order_id": "o-1"})
        kept = outbox.emit("order.created", {"order_id": "o-1"})
        try:
            with outbox.transaction() as inner:
                inner.put(orders, {"order_id": "o-2"})
                outbox.emit("order.created", {"order_id": "o-2"})
                raise ValueError("o-2 is invalid")
        except ValueError:
            pass
        assert len(outer) == 2
    assert scan(store, orders) == [{"order_id": {"S": "o-1"}}]
    assert [item["id"]["S"] for item in scan(store)] == [kept.id]


def test_cancelled_transaction_writes_no_event(store: OutboxStore) -> None:
    """When the caller's own condition fails, the event is not written either."""
    outbox = producer(store)
    orders = orders_table(store)
    store.client.put_item(TableName=orders, Item={"order_id": {"S": "o-1"}})
    with pytest.raises(TransactionCancelledError) as caught, outbox.transaction() as tx:
        tx.put(orders, {"order_id": "o-1"}, condition="attribute_not_exists(order_id)")
        outbox.emit("order.created", {"order_id": "o-1"})
    assert caught.value.reasons == ["ConditionalCheckFailed", "None"]
    assert "action 0 (Put on" in str(caught.value)
    assert scan(store) == []


def test_missing_business_table_is_named(store: OutboxStore) -> None:
    """A transaction on a caller's missing table names it, not only the outbox's."""
    outbox = producer(store)
    with pytest.raises(TableError) as caught, outbox.transaction() as tx:
        tx.put("no-such-orders", {"order_id": "o-1"})
        outbox.emit("order.created", {"order_id": "o-1"})
    assert "'no-such-orders'" in str(caught.value)
    assert scan(store) == []


def test_failed_append_leaves_the_collector_unchanged(store: OutboxStore) -> None:
    """A refused emit leaves the caller's list exactly as it was."""
    outbox = producer(store)
    items: list[dict[str, Any]] = []
    outbox.emit("a.b", 1, id="dup", collector=items)
    before = copy.deepcopy(items)
    with pytest.raises(Exception, match="already in this transaction"):
        outbox.emit("a.b", 2, id="dup", collector=items)
    with pytest.raises(PayloadError):
        outbox.emit("a.b", {"x": {1, 2}}, collector=items)
    assert items == before
    assert scan(store) == []
