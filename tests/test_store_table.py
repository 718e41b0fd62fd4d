"""Table set-up on both backends: create, and verify with errors that say the fix."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from store_support import unique

from celery_outbox import Completion, OutboxConfig, OutboxStore, TableError
from celery_outbox.table import index_definition


def test_create_table(store: OutboxStore) -> None:
    """A created table is on demand, keyed on id, with the status index and TTL."""
    table = store.client.describe_table(TableName=store.table)["Table"]
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert table["KeySchema"] == [{"AttributeName": "id", "KeyType": "HASH"}]
    (index,) = table["GlobalSecondaryIndexes"]
    assert index["IndexName"] == "status-gsiSortKey-index"
    assert index["KeySchema"] == index_definition(store.index)["KeySchema"]
    assert index["Projection"] == {"ProjectionType": "ALL"}
    types = {
        a["AttributeName"]: a["AttributeType"] for a in table["AttributeDefinitions"]
    }
    assert types == {"id": "S", "status": "S", "gsiSortKey": "N"}
    ttl = store.client.describe_time_to_live(TableName=store.table)
    assert ttl["TimeToLiveDescription"] == {
        "TimeToLiveStatus": "ENABLED",
        "AttributeName": "expiresAt",
    }


def test_create_table_twice(store: OutboxStore) -> None:
    """Creating an existing table is not an error; it reports False."""
    assert store.create_table() is False


def test_verify_a_good_table(store_factory: Any) -> None:
    """A table made by create_table verifies without errors or warnings."""
    store = store_factory(completion=Completion.KEEP)
    assert store.verify_table() == []


def test_verify_warns_when_ttl_is_off(endpoint: str) -> None:
    """Keeping completed events on a table without TTL gives a warning."""
    config = OutboxConfig(
        table_name=unique(), endpoint_url=endpoint, completion=Completion.KEEP
    )
    store = OutboxStore(config)
    store.create_table(wait=False)
    try:
        (warning,) = store.verify_table()
        assert "TTL is not enabled on 'expiresAt'" in warning
    finally:
        store.delete_table()


@pytest.fixture
def raw_table(endpoint: str) -> Iterator[Any]:
    """Create tables laid out by hand; a store on each is returned."""
    made: list[OutboxStore] = []

    def create(index_name: str = "status-gsiSortKey-index", **spec: Any) -> OutboxStore:
        config = OutboxConfig(
            table_name=unique(), endpoint_url=endpoint, status_index_name=index_name
        )
        store = OutboxStore(config)
        attributes = spec.pop("attributes", {"id": "S"})
        store.client.create_table(
            TableName=store.table,
            BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[
                {"AttributeName": n, "AttributeType": t} for n, t in attributes.items()
            ],
            KeySchema=spec.pop("key", [{"AttributeName": "id", "KeyType": "HASH"}]),
            **spec,
        )
        made.append(store)
        return store

    yield create
    for store in made:
        store.delete_table()


def gsi(name: str, hash_key: str, range_key: str, projection: str = "ALL") -> Any:
    """A global secondary index definition."""
    return {
        "IndexName": name,
        "KeySchema": [
            {"AttributeName": hash_key, "KeyType": "HASH"},
            {"AttributeName": range_key, "KeyType": "RANGE"},
        ],
        "Projection": {"ProjectionType": projection},
    }


STATUS_TYPES = {"id": "S", "status": "S", "gsiSortKey": "N"}


def test_missing_table(endpoint: str) -> None:
    """A table that does not exist is named, with how to create it."""
    store = OutboxStore(OutboxConfig(table_name=unique(), endpoint_url=endpoint))
    with pytest.raises(TableError) as caught:
        store.verify_table()
    assert caught.value.table == store.table
    assert "does not exist" in str(caught.value)
    assert "create_table()" in str(caught.value)


def test_table_without_index(raw_table: Any) -> None:
    """A table with no status index is refused, with the index to add."""
    store = raw_table()
    with pytest.raises(TableError) as caught:
        store.verify_table()
    message = str(caught.value)
    assert "has no index 'status-gsiSortKey-index'" in message
    assert "its indexes: none" in message
    assert "partition key 'status' (S), sort key 'gsiSortKey' (N)" in message


def test_misnamed_index(raw_table: Any) -> None:
    """An index on status/gsiSortKey under another name is pointed out by name."""
    store = raw_table(
        attributes=STATUS_TYPES,
        GlobalSecondaryIndexes=[gsi("by-status", "status", "gsiSortKey")],
    )
    with pytest.raises(TableError) as caught:
        store.verify_table()
    message = str(caught.value)
    assert "has no index 'status-gsiSortKey-index'" in message
    assert "set status_index_name (outbox_status_index_name) to 'by-status'" in message


def test_index_on_other_attributes(raw_table: Any) -> None:
    """An index of the configured name but other keys is refused."""
    store = raw_table(
        attributes={"id": "S", "state": "S", "gsiSortKey": "N"},
        GlobalSecondaryIndexes=[gsi("status-gsiSortKey-index", "state", "gsiSortKey")],
    )
    with pytest.raises(TableError, match="hash key 'state'"):
        store.verify_table()


def test_sort_key_of_the_wrong_type(raw_table: Any) -> None:
    """A gsiSortKey of type S is refused, naming the type it must have."""
    store = raw_table(
        attributes={"id": "S", "status": "S", "gsiSortKey": "S"},
        GlobalSecondaryIndexes=[gsi("status-gsiSortKey-index", "status", "gsiSortKey")],
    )
    with pytest.raises(TableError) as caught:
        store.verify_table()
    message = str(caught.value)
    assert "range key 'gsiSortKey' (S)" in message
    assert "sort key 'gsiSortKey' (N)" in message


def test_partition_key_of_the_wrong_type(raw_table: Any) -> None:
    """A table keyed on a numeric id is refused."""
    store = raw_table(attributes={"id": "N"})
    with pytest.raises(TableError) as caught:
        store.verify_table()
    assert "hash key 'id' (N)" in str(caught.value)
    assert "partition key 'id' of type S" in str(caught.value)


def test_table_with_a_sort_key(raw_table: Any) -> None:
    """A table with a sort key is refused: events are keyed on id alone."""
    store = raw_table(
        attributes={"id": "S", "version": "N"},
        key=[
            {"AttributeName": "id", "KeyType": "HASH"},
            {"AttributeName": "version", "KeyType": "RANGE"},
        ],
    )
    with pytest.raises(TableError, match="no sort key"):
        store.verify_table()


def test_index_projecting_keys_only(raw_table: Any) -> None:
    """An index that does not project every attribute is refused."""
    store = raw_table(
        attributes=STATUS_TYPES,
        GlobalSecondaryIndexes=[
            gsi("status-gsiSortKey-index", "status", "gsiSortKey", "KEYS_ONLY")
        ],
    )
    with pytest.raises(TableError) as caught:
        store.verify_table()
    assert "projects KEYS_ONLY" in str(caught.value)
    assert "ProjectionType ALL" in str(caught.value)


def test_delete_table_twice(store_factory: Any) -> None:
    """Deleting a table that is gone is not an error."""
    store = store_factory()
    store.delete_table()
    store.delete_table()
