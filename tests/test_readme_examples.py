"""The README's examples of emitting and handling, run as written.

The code blocks are read from the README itself, so an example that stops
working (or stops fitting the other) fails here. They run on both backends
against the business tables they name, ``orders`` and ``stock``, as does
the error a transaction over them gets when DynamoDB refuses it whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from store_support import scan

from celery_outbox import (
    Event,
    Outbox,
    OutboxStore,
    StoreError,
    TransactionCancelledError,
)
from tests.celery_support import ROOT

README = (ROOT / "README.md").read_text()


def block(section: str) -> str:
    """The first ``python`` code block under the README heading ``section``."""
    text = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", text, re.DOTALL)
    assert found, f"no python block under {section!r}"
    return found.group(1)


def table(store: OutboxStore, name: str, key: str) -> None:
    store.client.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": key, "AttributeType": "S"}],
        KeySchema=[{"AttributeName": key, "KeyType": "HASH"}],
    )


@pytest.fixture
def business(store: OutboxStore) -> Iterator[OutboxStore]:
    """The README's ``orders`` and ``stock`` tables beside the outbox's."""
    table(store, "orders", "id")
    table(store, "stock", "sku")
    try:
        yield store
    finally:
        for name in ("orders", "stock"):
            store.client.delete_table(TableName=name)


def names(store: OutboxStore) -> dict[str, Any]:
    """What the emitting example expects to find in scope."""
    return {
        "outbox": Outbox(config=store.config, client=store.client),
        "client": store.client,
        "my_put_action": {"Put": {"TableName": "orders", "Item": {"id": {"S": "o-3"}}}},
    }


def test_the_emitting_example_commits_each_way(business: OutboxStore) -> None:
    """Direct emit, transaction and own collector each land their events."""
    store = business
    store.client.put_item(
        TableName="stock", Item={"sku": {"S": "tea"}, "count": {"N": "1"}}
    )
    exec(block("Emitting events"), names(store))
    events = [i for i in scan(store) if "type" in i]
    placed = sorted(
        i["payload"]["M"]["order_id"]["S"]
        for i in events
        if i["type"]["S"] == "order.placed"
    )
    assert placed == ["o-1", "o-2", "o-3"]
    assert {i["type"]["S"] for i in events} == {"order.placed", "payment.requested"}
    assert sorted(i["id"]["S"] for i in scan(store, "orders")) == ["o-2", "o-3"]
    assert scan(store, "stock")[0]["count"] == {"N": "0"}


def test_the_transaction_example_writes_nothing_without_stock(
    business: OutboxStore,
) -> None:
    """No stock item: the condition cancels the transaction, with a typed
    error, and neither the order nor its events are written."""
    store = business
    code = block("Emitting events")
    transaction = code[code.index("with outbox.transaction()") :]
    transaction = transaction[: transaction.index("# Committed here")]
    scope = names(store)
    exec("order = {'order_id': 'o-1', 'customer': 'c', 'total': 1}", scope)
    with pytest.raises(TransactionCancelledError):
        exec(transaction, scope)
    assert scan(store) == [] and scan(store, "orders") == []


def test_the_handler_example_reads_what_the_emits_send(store: OutboxStore) -> None:
    """The handler example's payload keys are the ones the emits write."""
    sent: list[tuple[Any, ...]] = []

    class Mailer:
        def send(self, *args: Any, **kwargs: Any) -> None:
            sent.append((*args, kwargs))

    app = Celery("readme", broker="memory://")
    scope: dict[str, Any] = {
        "outbox": Outbox(app, config=store.config, client=store.client),
        "mailer": Mailer(),
    }
    exec(block("Handlers"), scope)
    emitted: dict[str, Any] = {}
    exec(block("Emitting events").split("\n\n")[0], {**scope, **names(store)}, emitted)
    scope["send_confirmation"](Event.new("order.placed", emitted["order"]))
    ((customer, options),) = sent
    assert customer == "ada@example.com"
    assert options["template"] == "confirmation" and options["idempotency_key"]


def test_a_rejected_transaction_names_every_table_in_it(
    business: OutboxStore,
) -> None:
    """A transaction refused as a whole may be the caller's action's fault:
    the error names all its tables, not only the outbox's."""
    store = business
    outbox = Outbox(config=store.config, client=store.client)
    with pytest.raises(StoreError) as raised, outbox.transaction() as tx:
        # No stock item: DynamoDB refuses arithmetic on a missing attribute.
        tx.update(
            "stock",
            {"sku": "tea"},
            "SET #n = #n - :one",
            names={"#n": "count"},
            values={":one": 1},
        )
        outbox.emit("order.placed", {"order_id": "o-1"})
    assert not isinstance(raised.value, TransactionCancelledError)
    assert f"{sorted(['stock', store.table])}" in str(raised.value)
    assert scan(store) == []
