"""The bad-input catalogue: each bad input gets a typed error, and nothing changes.

Every case names its area (emit, collector, configuration, table set-up,
management), the call, the error class from ``celery_outbox.errors`` and
words its message must hold. Each store case runs on both backends against
a table holding a waiting event and a leased one, with a caller's collector
already holding a business action and an event; after the refused call the
table and the collector must be exactly as before.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from store_support import FakeClock, on_clock, scan, unique

from celery_outbox import (
    ArgumentError,
    CollectorError,
    CollectorFullError,
    ConfigError,
    DuplicateEventError,
    Event,
    EventError,
    EventExistsError,
    EventNotFoundError,
    EventStatusError,
    ItemTooLargeError,
    Lease,
    Outbox,
    OutboxConfig,
    OutboxError,
    OutboxStore,
    PayloadError,
    TableError,
    Transaction,
    TransactionTooLargeError,
    errors,
)


@dataclass
class Ctx:
    """What a case may use: the store, a producer, a collector and a lease."""

    store: OutboxStore
    outbox: Outbox
    collector: list[dict[str, Any]]
    lease: Lease
    endpoint: str
    tables: list[OutboxStore] = field(default_factory=list)

    def emit(self, *args: Any, **kwargs: Any) -> Any:
        """Emit into the caller's collector."""
        return self.outbox.emit(*args, collector=self.collector, **kwargs)

    def raw_table(self, attributes: dict[str, str], **spec: Any) -> OutboxStore:
        """A store on a table laid out by hand (deleted after the case)."""
        config = OutboxConfig(table_name=unique("bad"), endpoint_url=self.endpoint)
        store = OutboxStore(config)
        store.client.create_table(
            TableName=store.table,
            BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[
                {"AttributeName": n, "AttributeType": t} for n, t in attributes.items()
            ],
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            **spec,
        )
        self.tables.append(store)
        return store


@dataclass(frozen=True)
class Case:
    """One bad input and the error it must get."""

    area: str
    name: str
    call: Callable[[Ctx], Any]
    error: type[OutboxError]
    words: str
    prepare: Callable[[Ctx], Any] | None = None


def index(name: str, hash_key: str = "status", projection: str = "ALL") -> Any:
    """A global secondary index on ``hash_key`` and gsiSortKey."""
    return [
        {
            "IndexName": name,
            "KeySchema": [
                {"AttributeName": hash_key, "KeyType": "HASH"},
                {"AttributeName": "gsiSortKey", "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": projection},
        }
    ]


GOOD_TYPES = {"id": "S", "status": "S", "gsiSortKey": "N"}
DEFAULT_INDEX = "status-gsiSortKey-index"


def business(n: int, size: int = 10) -> dict[str, Any]:
    """A caller's own put into a business table."""
    item = {"order_id": {"S": f"o-{n}"}, "blob": {"S": "x" * size}}
    return {"Put": {"TableName": "orders", "Item": item}}


def fill(ctx: Ctx, actions: list[dict[str, Any]]) -> None:
    """Put more of the caller's actions into the collector before the case."""
    ctx.collector.extend(actions)


def publish_raw(ctx: Ctx, items: Any) -> Any:
    """Publish through the store, bypassing the producer's own checks."""
    return ctx.store.publish(items)


EMIT = [
    Case(
        "emit",
        "NaN in payload",
        lambda c: c.emit("a.b", {"x": math.nan}),
        PayloadError,
        "payload['x']: nan is not a JSON number",
    ),
    Case(
        "emit",
        "infinity in a list",
        lambda c: c.emit("a.b", [1, -math.inf]),
        PayloadError,
        "payload[1]: -inf",
    ),
    Case(
        "emit",
        "set in payload",
        lambda c: c.emit("a.b", {"tags": {"a"}}),
        PayloadError,
        "payload['tags']: set is not JSON-compatible; use a list",
    ),
    Case(
        "emit",
        "bytes in payload",
        lambda c: c.emit("a.b", {"raw": b"\x01"}),
        PayloadError,
        "payload['raw']: bytes",
    ),
    Case(
        "emit",
        "datetime in payload",
        lambda c: c.emit("a.b", {"at": datetime(2026, 1, 1)}),
        PayloadError,
        "use an ISO-8601 string",
    ),
    Case(
        "emit",
        "tuple in payload",
        lambda c: c.emit("a.b", {"p": (1, 2)}),
        PayloadError,
        "payload['p']: tuple",
    ),
    Case(
        "emit",
        "Decimal in payload",
        lambda c: c.emit("a.b", Decimal("1.1")),
        PayloadError,
        "payload: Decimal",
    ),
    Case(
        "emit",
        "non-string map key",
        lambda c: c.emit("a.b", {"m": {3: "x"}}),
        PayloadError,
        "payload['m'][3]: map keys must be strings",
    ),
    Case(
        "emit",
        "empty map key",
        lambda c: c.emit("a.b", {"": 1}),
        PayloadError,
        "must not be empty",
    ),
    Case(
        "emit",
        "39-digit integer",
        lambda c: c.emit("a.b", {"n": 10**38}),
        PayloadError,
        "more than 38 digits",
    ),
    Case(
        "emit",
        "float out of range",
        lambda c: c.emit("a.b", 1e300),
        PayloadError,
        "outside DynamoDB's number range",
    ),
    Case(
        "emit",
        "lone surrogate",
        lambda c: c.emit("a.b", {"s": "\ud83d"}),
        PayloadError,
        "not valid Unicode",
    ),
    Case(
        "emit",
        "nested 32 deep",
        lambda c: c.emit("a.b", _deep(32)),
        PayloadError,
        "nested more than 31",
    ),
    Case(
        "emit",
        "object in payload",
        lambda c: c.emit("a.b", [object()]),
        PayloadError,
        "payload[0]: object is not JSON-compatible",
    ),
    Case(
        "emit",
        "item over 400 KB",
        lambda c: c.emit("a.b", "x" * 410_000),
        ItemTooLargeError,
        "400 KB",
    ),
    Case(
        "emit",
        "empty type",
        lambda c: c.emit("", {}),
        EventError,
        "event type must not be empty",
    ),
    Case(
        "emit",
        "type not a string",
        lambda c: c.emit(42, {}),
        EventError,
        "event type must be a string, got int",
    ),
    Case(
        "emit",
        "control character in type",
        lambda c: c.emit("a\nb", {}),
        EventError,
        "control characters",
    ),
    Case(
        "emit",
        "type too long",
        lambda c: c.emit("t" * 300, {}),
        EventError,
        "event type is 300 bytes long; the limit is 256",
    ),
    Case(
        "emit",
        "blank id",
        lambda c: c.emit("a.b", {}, id="  "),
        EventError,
        "event id must not be empty",
    ),
    Case(
        "emit",
        "id too long",
        lambda c: c.emit("a.b", {}, id="i" * 1025),
        EventError,
        "event id is 1025 bytes long",
    ),
    Case(
        "emit",
        "id not a string",
        lambda c: c.emit("a.b", {}, id=7),
        EventError,
        "event id must be a string",
    ),
    Case(
        "emit",
        "naive occurred_at",
        lambda c: c.emit("a.b", {}, occurred_at=datetime(2026, 1, 1)),
        EventError,
        "has no time zone",
    ),
    Case(
        "emit",
        "occurred_at not ISO",
        lambda c: c.emit("a.b", {}, occurred_at="yesterday"),
        EventError,
        "not an ISO-8601 timestamp",
    ),
    Case(
        "emit",
        "occurred_at a number",
        lambda c: c.emit("a.b", {}, occurred_at=1700000000),
        EventError,
        "must be a datetime or ISO string",
    ),
    Case(
        "emit",
        "existing id, direct",
        lambda c: c.outbox.emit("a.b", id="waiting-1"),
        EventExistsError,
        "event 'waiting-1' already exists",
    ),
    Case(
        "emit",
        "publish of a non-event",
        lambda c: publish_raw(c, [{"type": "a"}]),
        EventError,
        "expected an Event",
    ),
    Case(
        "emit",
        "publish with one existing id",
        lambda c: publish_raw(c, [Event.new("a.b"), Event.new("a.b", id="active-1")]),
        EventExistsError,
        "'active-1' already exists",
    ),
    Case(
        "emit",
        "publish of 101 events",
        lambda c: publish_raw(c, [Event.new("a.b") for _ in range(101)]),
        CollectorFullError,
        "101 actions",
    ),
    Case(
        "emit",
        "publish with one id twice",
        lambda c: publish_raw(
            c, [Event.new("a.b", 1, id="d"), Event.new("a.b", 2, id="d")]
        ),
        DuplicateEventError,
        "event 'd' is already in this transaction",
    ),
]

COLLECTOR = [
    Case(
        "collector",
        "101st action",
        lambda c: c.emit("a.b"),
        CollectorFullError,
        "DynamoDB allows 100",
        prepare=lambda c: fill(c, [business(n) for n in range(3, 101)]),
    ),
    Case(
        "collector",
        "over 4 MB",
        lambda c: c.emit("a.b", "y" * 300_000),
        TransactionTooLargeError,
        "4,194,304",
        prepare=lambda c: fill(c, [business(n, 390_000) for n in range(3, 13)]),
    ),
    Case(
        "collector",
        "id already collected",
        lambda c: c.emit("a.b", {"other": "payload"}, id="collected-1"),
        DuplicateEventError,
        "'collected-1' is already in this transaction",
    ),
    Case(
        "collector",
        "collector is a tuple",
        lambda c: c.outbox.emit("a.b", collector=tuple(c.collector)),
        CollectorError,
        "must be a list",
    ),
    Case(
        "collector",
        "collector holds a non-action",
        lambda c: c.emit("a.b"),
        CollectorError,
        "is not a TransactWriteItems action",
        prepare=lambda c: fill(c, ["SELECT 1"]),
    ),  # type: ignore[list-item]
    Case(
        "collector",
        "ambient collector not a list",
        lambda c: c.outbox.collecting("items").__enter__(),
        CollectorError,
        "got str",
    ),
    Case(
        "collector",
        "business item twice",
        lambda c: _transaction_twice(),
        CollectorError,
        "already in this transaction",
    ),
    Case(
        "collector",
        "commit of too many actions",
        lambda c: c.store.commit([business(n) for n in range(101)]),
        CollectorFullError,
        "101 actions",
    ),
]

TABLE = [
    Case(
        "table",
        "missing table",
        lambda c: OutboxStore(
            c.store.config.replace(table_name=unique("gone"))
        ).verify_table(),
        TableError,
        "does not exist; create it",
    ),
    Case(
        "table",
        "no status index",
        lambda c: c.raw_table({"id": "S"}).verify_table(),
        TableError,
        "Add a global secondary index named 'status-gsiSortKey-index'",
    ),
    Case(
        "table",
        "misnamed index",
        lambda c: c.raw_table(
            GOOD_TYPES, GlobalSecondaryIndexes=index("sgi")
        ).verify_table(),
        TableError,
        "set status_index_name",
    ),
    Case(
        "table",
        "sort key of type S",
        lambda c: c.raw_table(
            {**GOOD_TYPES, "gsiSortKey": "S"},
            GlobalSecondaryIndexes=index(DEFAULT_INDEX),
        ).verify_table(),
        TableError,
        "sort key 'gsiSortKey' (N)",
    ),
    Case(
        "table",
        "partition key of type N",
        lambda c: c.raw_table({"id": "N"}).verify_table(),
        TableError,
        "partition key 'id' of type S",
    ),
    Case(
        "table",
        "index keyed on another attribute",
        lambda c: c.raw_table(
            {"id": "S", "state": "S", "gsiSortKey": "N"},
            GlobalSecondaryIndexes=index(DEFAULT_INDEX, "state"),
        ).verify_table(),
        TableError,
        "partition key 'status' (S)",
    ),
    Case(
        "table",
        "keys-only index",
        lambda c: c.raw_table(
            GOOD_TYPES,
            GlobalSecondaryIndexes=index(DEFAULT_INDEX, "status", "KEYS_ONLY"),
        ).verify_table(),
        TableError,
        "projects KEYS_ONLY",
    ),
]

MANAGEMENT = [
    Case(
        "management",
        "strict retry of an unknown id",
        lambda c: c.store.retry(["ghost"], strict=True),
        EventNotFoundError,
        "no outbox event has the id 'ghost'",
    ),
    Case(
        "management",
        "strict retry of a waiting event",
        lambda c: c.store.retry(["waiting-1"], strict=True),
        EventStatusError,
        "'waiting-1' is created",
    ),
    Case(
        "management",
        "strict retry of a leased event",
        lambda c: c.store.retry(["active-1", "waiting-1"], strict=True),
        EventStatusError,
        "'active-1' is active",
    ),
    Case(
        "management",
        "strict retry of 101 ids",
        lambda c: c.store.retry([f"e{n}" for n in range(101)], strict=True),
        ArgumentError,
        "at most 100 ids",
    ),
    Case(
        "management",
        "retry of an empty id",
        lambda c: c.store.retry([""]),
        ArgumentError,
        "event_ids: event id must not be empty",
    ),
    Case(
        "management",
        "retry of a non-string id",
        lambda c: c.store.retry([1]),
        ArgumentError,
        "must be a string, got int",
    ),
    Case(
        "management",
        "retry of a number",
        lambda c: c.store.retry(5),
        ArgumentError,
        "expected event ids, got int",
    ),
    Case(
        "management",
        "failed listing with limit 0",
        lambda c: c.store.failed(limit=0),
        ArgumentError,
        "limit: expected a whole",
    ),
    Case(
        "management",
        "failed listing above 1000",
        lambda c: c.store.failed(limit=2**31),
        ArgumentError,
        "limit: expected a whole number from 1 to 1000",
    ),
    Case(
        "management",
        "foreign cursor",
        lambda c: c.store.failed(cursor="bm90LWEtY3Vyc29y"),
        ArgumentError,
        "is not a cursor this outbox gave",
    ),
    Case(
        "management",
        "empty type filter",
        lambda c: c.store.failed(type=""),
        ArgumentError,
        "type: expected an event type",
    ),
    Case(
        "management",
        "negative purge age",
        lambda c: c.store.purge_completed(-1),
        ArgumentError,
        "older_than_ms",
    ),
    Case(
        "management",
        "negative delay",
        lambda c: c.store.fail(c.lease, "x", delay_ms=-5),
        ArgumentError,
        "delay_ms: expected a whole number >= 0",
    ),
    Case(
        "management",
        "complete without a lease",
        lambda c: c.store.complete("active-1"),
        ArgumentError,
        "expected the Lease a claim returned, got str",
    ),
    Case(
        "management",
        "claim of zero",
        lambda c: c.store.claim(limit=0),
        ArgumentError,
        "limit: expected a positive integer",
    ),
    Case(
        "management",
        "backoff of retry 0",
        lambda c: c.store.backoff_ms(0),
        ArgumentError,
        "retries: counts from 1",
    ),
    Case(
        "management",
        "get of an empty id",
        lambda c: c.store.get_item(""),
        ArgumentError,
        "event_id",
    ),
]

CONFIGURATION: list[tuple[str, dict[str, Any], str]] = [
    ("batch size zero", {"batch_size": 0}, "batch_size: must be at least 1"),
    ("batch size as text", {"batch_size": "50"}, "batch_size: expected a whole"),
    ("negative timeout", {"processing_timeout_ms": -1}, "processing_timeout_ms"),
    ("fractional poll", {"poll_interval_ms": 0.5}, "poll_interval_ms"),
    ("negative retries", {"max_retries": -1}, "max_retries: must be at least 0"),
    ("base above cap", {"base_backoff_ms": 9, "max_backoff_ms": 8}, "above the cap"),
    ("zero error backoff", {"max_error_backoff_ms": 0}, "max_error_backoff_ms"),
    ("unknown completion", {"completion": "archive"}, "'delete' or 'keep'"),
    ("bad table name", {"table_name": "my table"}, "table_name: expected a"),
    ("short index name", {"status_index_name": "ix"}, "status_index_name"),
    ("endpoint without scheme", {"endpoint_url": "localhost:8000"}, "http://"),
    ("empty region", {"region_name": ""}, "region_name"),
    ("tiny error length", {"max_error_chars": 1}, "max_error_chars"),
    ("zero retention", {"retention_ms": 0}, "retention_ms"),
    ("boolean batch size", {"batch_size": True}, "batch_size"),
]

STORE_CASES = EMIT + COLLECTOR + TABLE + MANAGEMENT


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def _transaction_twice() -> None:
    tx = Transaction()
    tx.update(
        "orders",
        {"order_id": "o-1"},
        "SET #n = :n",
        names={"#n": "n"},
        values={":n": 1},
    )
    tx.delete("orders", {"order_id": "o-1"})


@pytest.fixture
def ctx(store: OutboxStore, endpoint: str) -> Iterator[Ctx]:
    """A table with a waiting and a leased event, and a caller's collector."""
    clock = on_clock(store, FakeClock())
    outbox = Outbox(config=store.config, client=store.client, clock=clock)
    store.publish([Event.new("a.b", id="active-1")])
    (lease,) = store.claim().leases
    clock.advance(1)
    store.publish([Event.new("a.b", id="waiting-1")])
    collector = [business(1)]
    outbox.emit("a.b", {"n": 1}, id="collected-1", collector=collector)
    made = Ctx(store, outbox, collector, lease, endpoint)
    yield made
    for table in made.tables:
        table.delete_table()


@pytest.mark.parametrize(
    "case", STORE_CASES, ids=[f"{c.area}: {c.name}" for c in STORE_CASES]
)
def test_bad_input(ctx: Ctx, case: Case) -> None:
    """The bad input gets its typed error, the table and collector stay unchanged."""
    if case.prepare is not None:
        case.prepare(ctx)
    table, collector = scan(ctx.store), copy.deepcopy(ctx.collector)
    with pytest.raises(case.error) as caught:
        case.call(ctx)
    assert case.words in str(caught.value)
    assert scan(ctx.store) == table
    assert ctx.collector == collector


@pytest.mark.parametrize(
    ("options", "words"),
    [c[1:] for c in CONFIGURATION],
    ids=[f"configuration: {c[0]}" for c in CONFIGURATION],
)
def test_bad_configuration(options: dict[str, Any], words: str) -> None:
    """A bad option is refused when the configuration is built, naming it."""
    with pytest.raises(ConfigError) as caught:
        OutboxConfig(**options)
    assert words in str(caught.value)


def test_catalogue_size_and_hierarchy() -> None:
    """Over 30 distinct bad inputs, across every area, all from errors.py."""
    names = [(c.area, c.name) for c in STORE_CASES] + [
        ("configuration", c[0]) for c in CONFIGURATION
    ]
    assert len(names) == len(set(names)) >= 30
    assert {area for area, _ in names} == {
        "emit",
        "collector",
        "configuration",
        "table",
        "management",
    }
    documented = set(errors.__all__)
    for case in STORE_CASES:
        assert case.error.__name__ in documented
        assert case.error.__name__ in (errors.__doc__ or "")


ERROR_SAMPLES: list[OutboxError] = [
    ConfigError("batch_size", "must be at least 1, got 0"),
    ArgumentError("limit", "expected a whole number of at least 1, got 0"),
    PayloadError("payload['a']", "set is not JSON-compatible; use a list"),
    ItemTooLargeError("e-1", 500_000, 409_600),
    DuplicateEventError("e-1", "event 'e-1' twice in one transaction"),
    TableError("outbox", "table 'outbox' does not exist"),
    errors.StoreError("DynamoDB query failed", "ThrottlingException"),
    EventExistsError(["e-1"]),
    EventNotFoundError(["e-1", "e-2"]),
    EventStatusError({"e-1": "active"}, "failed"),
    errors.TransactionCancelledError("cancelled", ["None", "ConditionalCheckFailed"]),
    errors.UnprocessedItemsError(["e-1"]),
    errors.HandlerError("no handler is registered for event type 'x'"),
]


@pytest.mark.parametrize(
    "error", ERROR_SAMPLES, ids=[type(e).__name__ for e in ERROR_SAMPLES]
)
def test_errors_survive_celery_results(error: OutboxError) -> None:
    """An error keeps its class, message and attributes through a result backend.

    A management task's error reaches its caller (Flower, ``.get()``) through
    Celery: the worker pickles it, a JSON backend rebuilds it as
    ``type(error)(*error.args)``. Either way the caller must get the typed
    error, not a bare OutboxError or Exception.
    """
    from celery import Celery
    from celery.utils.serialization import get_pickleable_exception

    backend = Celery("errors", set_as_current=False).backend
    pickled = pickle.loads(pickle.dumps(error))
    traced = get_pickleable_exception(error)
    stored = backend.prepare_exception(error, "json")
    rebuilt = backend.exception_to_python(json.loads(json.dumps(stored)))
    for copy_ in (pickled, traced, rebuilt):
        assert type(copy_) is type(error)
        assert str(copy_) == str(error)
        assert vars(copy_) == vars(error)
