"""Helpers for the store tests: a clock to move by hand, raw table reads."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celery_outbox import Event, OutboxStore
from celery_outbox.dynamo import wall_clock_ms
from chaos.faults import FaultInjector


class FakeClock:
    """Milliseconds since the epoch that move only when told to."""

    def __init__(self, start: int | None = None) -> None:
        self.now = wall_clock_ms() if start is None else start

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> int:
        """Move the clock ``ms`` forward and return the new time."""
        self.now += ms
        return self.now


def on_clock(store: OutboxStore, clock: FakeClock | None = None) -> FakeClock:
    """Put ``store`` on a fake clock and return it."""
    clock = clock or FakeClock()
    store.clock = clock
    return clock


def scan(store: OutboxStore, table: str | None = None) -> list[dict[str, Any]]:
    """Every item of the table, strongly consistent, sorted by key."""
    items: list[dict[str, Any]] = []
    request: dict[str, Any] = {
        "TableName": table or store.table,
        "ConsistentRead": True,
    }
    while True:
        response = store.client.scan(**request)
        items.extend(response.get("Items", []))
        if "LastEvaluatedKey" not in response:
            return sorted(items, key=repr)
        request["ExclusiveStartKey"] = response["LastEvaluatedKey"]


def backend(request: pytest.FixtureRequest) -> str:
    """``moto`` or ``dynamodb-local``: the backend the test runs on."""
    return str(request.node.callspec.params["endpoint"])


def events(count: int, type: str = "test.event") -> list[Event]:
    """``count`` fresh events with small payloads."""
    return [Event.new(type, {"n": i}) for i in range(count)]


def publish_many(store: OutboxStore, batch: list[Event]) -> None:
    """Publish any number of events, 100 a transaction."""
    for start in range(0, len(batch), 100):
        store.publish(batch[start : start + 100])


def unique(prefix: str = "t") -> str:
    """A table name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def lose_next_reply(store: OutboxStore, operation: str) -> Iterator[list[str]]:
    """Apply the next ``operation`` request, then answer it with a 500.

    botocore's retry resends the request, which meets its own earlier write,
    as when a connection drops after DynamoDB did the work. Yields the faults
    injected, so a test can check that one was.
    """
    lost: list[str] = []
    injector = FaultInjector(
        1.0, lambda *args, op, **kwargs: lost.append(op), weights=(0, 0, 1)
    )
    name = f"before-send.dynamodb.{operation}"

    def once(**kwargs: Any) -> Any:
        if lost:
            return None
        return injector(**kwargs)

    store.client.meta.events.register(name, once)
    try:
        yield lost
    finally:
        store.client.meta.events.unregister(name, once)
