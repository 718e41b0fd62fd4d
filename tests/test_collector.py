"""Collectors: DynamoDB's limits, checked before the caller's list changes."""

from __future__ import annotations

import copy
import re
import threading
from typing import Any

import pytest

from celery_outbox import (
    CollectorError,
    CollectorFullError,
    DuplicateEventError,
    Event,
    ItemTooLargeError,
    OutboxConfig,
    OutboxStore,
    PayloadError,
    Transaction,
    TransactionTooLargeError,
    collecting,
)
from celery_outbox import collector as collectors


@pytest.fixture
def offline() -> OutboxStore:
    """A store that only builds actions: nothing here talks to DynamoDB."""
    return OutboxStore(OutboxConfig(table_name="events"))


def business(n: int, size: int = 10) -> dict[str, Any]:
    """A put of the caller's own item."""
    return {
        "Put": {
            "TableName": "orders",
            "Item": {"order_id": {"S": f"o-{n}"}, "blob": {"S": "x" * size}},
        }
    }


def test_append_adds_the_actions(offline: OutboxStore) -> None:
    """Appending an event's action to a list of the caller's actions extends it."""
    target = [business(1)]
    action = offline.put_action(Event.new("order.created", {"id": 1}))
    collectors.append(target, [action])
    assert target == [business(1), action]


def test_put_action_never_overwrites(offline: OutboxStore) -> None:
    """An event's put is conditional on its id not being stored yet."""
    put = offline.put_action(Event.new("a.b"))["Put"]
    assert put["ConditionExpression"] == "attribute_not_exists(#id)"
    assert put["ExpressionAttributeNames"] == {"#id": "id"}


def test_hundred_actions_fit_but_not_more(offline: OutboxStore) -> None:
    """99 actions take one more event; 100 take none, and stay as they were."""
    target = [business(n) for n in range(99)]
    collectors.append(target, [offline.put_action(Event.new("a.b"))])
    assert len(target) == 100
    before = copy.deepcopy(target)
    with pytest.raises(CollectorFullError, match="101 actions"):
        collectors.append(target, [offline.put_action(Event.new("a.b"))])
    assert target == before


def test_four_megabytes_in_all(offline: OutboxStore) -> None:
    """Actions that would pass 4 MB together are refused; the list is unchanged."""
    target = [business(n, size=390_000) for n in range(10)]
    before = copy.deepcopy(target)
    event = Event.new("a.b", {"blob": "y" * 300_000})
    with pytest.raises(TransactionTooLargeError, match="4,194,304"):
        collectors.append(target, [offline.put_action(event)])
    assert target == before


def test_item_over_400_kb(offline: OutboxStore) -> None:
    """An event over 400 KB is refused when its action is built."""
    event = Event.new("a.b", {"blob": "z" * 410_000})
    with pytest.raises(ItemTooLargeError) as caught:
        offline.put_action(event)
    assert caught.value.event_id == event.id
    assert "400 KB" in str(caught.value) and "S3" in str(caught.value)


def test_duplicate_id_with_another_payload(offline: OutboxStore) -> None:
    """The same id twice is a duplicate even when the payloads differ."""
    target: list[dict[str, Any]] = []
    collectors.append(target, [offline.put_action(Event.new("a.b", 1, id="e-1"))])
    before = copy.deepcopy(target)
    with pytest.raises(DuplicateEventError) as caught:
        collectors.append(target, [offline.put_action(Event.new("a.b", 2, id="e-1"))])
    assert caught.value.event_id == "e-1"
    assert "collector[0]" in str(caught.value)
    assert target == before


def test_duplicate_id_against_an_update(offline: OutboxStore) -> None:
    """An event whose id a caller's update already touches is a duplicate."""
    update = {
        "Update": {
            "TableName": "events",
            "Key": {"id": {"S": "e-2"}},
            "UpdateExpression": "SET #n = :n",
        }
    }
    target = [update]
    with pytest.raises(DuplicateEventError, match="'e-2'"):
        collectors.append(target, [offline.put_action(Event.new("a.b", id="e-2"))])
    assert target == [update]


def test_duplicate_within_one_append(offline: OutboxStore) -> None:
    """Two events with one id in a single append are refused together."""
    target: list[dict[str, Any]] = []
    actions = [offline.put_action(Event.new("a.b", n, id="same")) for n in range(2)]
    with pytest.raises(DuplicateEventError):
        collectors.append(target, actions)
    assert target == []


def test_business_items_compared_by_their_key() -> None:
    """A caller's put and update of one item (key learnt from the update) clash."""
    tx = Transaction()
    tx.update(
        "orders",
        {"order_id": "o-1"},
        "SET #t = :t",
        names={"#t": "total"},
        values={":t": 3},
    )
    with pytest.raises(CollectorError, match="already in this transaction"):
        tx.put("orders", {"order_id": "o-1", "total": 4})
    assert len(tx) == 1


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ((), "must be a list"),
        ({"Put": {}}, "must be a list"),
        (["not an action"], "collector[0] is not a TransactWriteItems action"),
        ([{"Put": {"Item": {}}}], "collector[0] is not a TransactWriteItems action"),
        ([{"Scan": {"TableName": "x"}}], "collector[0] is not a TransactWriteItems"),
    ],
    ids=["tuple", "dict", "string member", "no table", "unknown kind"],
)
def test_wrong_collectors(offline: OutboxStore, target: Any, words: str) -> None:
    """A collector that is not a list of actions is refused and left alone."""
    before = copy.deepcopy(target)
    with pytest.raises(CollectorError, match=re.escape(words)):
        collectors.append(target, [offline.put_action(Event.new("a.b"))])
    assert target == before


def test_collecting_binds_a_list_for_the_block() -> None:
    """``collecting`` binds a list in this context only, and unbinds it after."""
    assert collectors.current() is None
    with collecting() as bound:
        assert collectors.current() is bound
        with collecting([]) as inner:
            assert collectors.current() is inner
        assert collectors.current() is bound
    assert collectors.current() is None


def test_collecting_is_per_thread() -> None:
    """Another thread does not see this thread's collector."""
    seen: list[Any] = []
    with collecting():
        thread = threading.Thread(target=lambda: seen.append(collectors.current()))
        thread.start()
        thread.join()
    assert seen == [None]


def test_collecting_refuses_a_non_list() -> None:
    """Binding something other than a list fails at once."""
    with pytest.raises(CollectorError, match="got str"), collecting("items"):  # type: ignore[arg-type]
        pass


def test_transaction_typed_values() -> None:
    """Transaction helpers turn plain values into DynamoDB's typed ones."""
    tx = Transaction()
    tx.put(
        "orders",
        {"order_id": "o-1", "total": 30.4},
        condition="attribute_not_exists(order_id)",
    )
    tx.delete("carts", {"cart_id": "c-1"})
    tx.condition_check("users", {"user_id": "u-1"}, "attribute_exists(user_id)")
    put = tx.actions[0]["Put"]
    assert put["Item"] == {"order_id": {"S": "o-1"}, "total": {"N": "30.4"}}
    assert [next(iter(a)) for a in tx.actions] == ["Put", "Delete", "ConditionCheck"]


def test_transaction_refuses_bad_values() -> None:
    """A value that is not JSON is refused with its place, and nothing is added."""
    tx = Transaction()
    with pytest.raises(PayloadError, match=r"item\['tags'\]"):
        tx.put("orders", {"order_id": "o-1", "tags": {"a", "b"}})
    assert len(tx) == 0
