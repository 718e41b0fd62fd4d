"""Collectors: the caller's list of ``TransactWriteItems`` actions.

An emit can append its events to a collector instead of writing them, so
that the caller commits business items and events in one transaction. The
collector is either passed explicitly, or bound to the current context with
:func:`collecting` (the Python counterpart of the TypeScript adapter's
``AsyncLocalStorage`` collector); a ``contextvars`` binding follows threads
and asyncio tasks as Python's context does.

Appends are all-or-nothing: every limit is checked on a copy first, and the
caller's list changes only when all of them pass.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Iterator, Sequence
from typing import Any

from boto3.dynamodb.types import TypeSerializer

from celery_outbox import event as ev
from celery_outbox.errors import (
    CollectorError,
    CollectorFullError,
    DuplicateEventError,
    TransactionTooLargeError,
)

__all__ = [
    "MAX_ACTIONS",
    "MAX_TRANSACTION_BYTES",
    "Transaction",
    "append",
    "collecting",
    "current",
]

MAX_ACTIONS = 100
MAX_TRANSACTION_BYTES = 4 * 1024 * 1024
_KINDS = ("Put", "Update", "Delete", "ConditionCheck")

_current: contextvars.ContextVar[list[dict[str, Any]] | None] = contextvars.ContextVar(
    "celery_outbox_collector", default=None
)


def current() -> list[dict[str, Any]] | None:
    """The collector bound to this context, if any."""
    return _current.get()


@contextlib.contextmanager
def collecting(
    collector: list[dict[str, Any]] | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Bind ``collector`` (a new list by default) for emits in this block.

    Emits inside the block append to it instead of writing; the caller
    commits it, e.g. with ``client.transact_write_items(TransactItems=...)``.
    """
    target = [] if collector is None else collector
    if not isinstance(target, list):
        raise CollectorError(
            f"a collector must be a list of TransactWriteItems actions, "
            f"got {type(target).__name__}"
        )
    token = _current.set(target)
    try:
        yield target
    finally:
        _current.reset(token)


def _action_parts(index: int, action: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(action, dict) or len(action) != 1:
        raise CollectorError(
            f"collector[{index}] is not a TransactWriteItems action "
            f"(a dict with one of {', '.join(_KINDS)}): {action!r:.80}"
        )
    ((kind, body),) = action.items()
    if kind not in _KINDS or not isinstance(body, dict) or "TableName" not in body:
        raise CollectorError(
            f"collector[{index}] is not a TransactWriteItems action: "
            f"{kind!r} with {type(body).__name__}"
        )
    return kind, body


def _key(body: dict[str, Any]) -> str:
    # Only the item's key matters for "one action per item"; the outbox
    # table's key is ``id``, other tables' keys are compared whole.
    key = body.get("Key") or body.get("Item") or {}
    return json.dumps(key, sort_keys=True, default=str)


def action_size(action: dict[str, Any]) -> int:
    """Estimate the bytes an action adds to a transaction's 4 MB."""
    ((_kind, body),) = action.items()
    size = ev.item_size(body.get("Item") or body.get("Key") or {})
    values = body.get("ExpressionAttributeValues") or {}
    size += sum(len(k) + ev._value_size(v) for k, v in values.items())
    for name in ("UpdateExpression", "ConditionExpression"):
        size += len(str(body.get(name, "")).encode("utf-8"))
    return size


def append(collector: Any, actions: Sequence[dict[str, Any]]) -> None:
    """Append outbox ``actions`` to ``collector`` if every limit allows it.

    Raises:
        CollectorError: the collector is not a list of actions.
        CollectorFullError: more than 100 actions would result.
        TransactionTooLargeError: more than 4 MB would result.
        DuplicateEventError: an event id (or item) would appear twice.
    """
    if not isinstance(collector, list):
        raise CollectorError(
            f"a collector must be a list of TransactWriteItems actions, "
            f"got {type(collector).__name__}"
        )
    total = len(collector) + len(actions)
    if total > MAX_ACTIONS:
        raise CollectorFullError(
            f"the transaction would hold {total} actions ({len(collector)} already "
            f"collected); DynamoDB allows {MAX_ACTIONS}. Commit and start another, "
            "or emit fewer events"
        )
    seen: dict[tuple[str, str], int] = {}
    size = 0
    for index, action in enumerate(collector):
        _kind, body = _action_parts(index, action)
        seen[(body["TableName"], _key(body))] = index
        size += action_size(action)
    for action in actions:
        _kind, body = _action_parts(len(collector), action)
        key = (body["TableName"], _key(body))
        if key in seen:
            event_id = _item_id(body)
            raise DuplicateEventError(
                event_id,
                f"event {event_id!r} is already in this transaction (at "
                f"collector[{seen[key]}]); DynamoDB allows one action per item",
            )
        seen[key] = -1
        size += action_size(action)
    if size > MAX_TRANSACTION_BYTES:
        raise TransactionTooLargeError(
            f"the transaction would be about {size:,} bytes; DynamoDB allows "
            f"{MAX_TRANSACTION_BYTES:,}"
        )
    collector.extend(actions)


def _item_id(body: dict[str, Any]) -> str:
    key = body.get("Item") or body.get("Key") or {}
    return str(key.get(ev.ID, {}).get("S", key))


class Transaction:
    """Business actions and outbox events, committed as one transaction.

    Made by :meth:`celery_outbox.Outbox.transaction`. Inside its ``with``
    block, emits append to it; ``put``, ``update``, ``delete`` and
    ``condition_check`` add the caller's own actions with plain Python
    values. Leaving the block without an exception commits everything in one
    ``TransactWriteItems``; an exception discards it all.
    """

    def __init__(self) -> None:
        self.actions: list[dict[str, Any]] = []
        self._serializer = TypeSerializer()

    def __len__(self) -> int:
        return len(self.actions)

    def _typed(self, values: dict[str, Any]) -> dict[str, Any]:
        from celery_outbox.payload import to_dynamodb

        return {k: to_dynamodb(v, f"item[{k!r}]") for k, v in values.items()}

    def add(self, action: dict[str, Any]) -> None:
        """Add a raw, typed ``TransactWriteItems`` action."""
        append(self.actions, [action])

    def put(
        self,
        table: str,
        item: dict[str, Any],
        *,
        condition: str | None = None,
        names: dict[str, str] | None = None,
        values: dict[str, Any] | None = None,
    ) -> None:
        """Put ``item`` (plain Python values) into ``table``."""
        body: dict[str, Any] = {"TableName": table, "Item": self._typed(item)}
        self._conditions(body, condition, names, values)
        self.add({"Put": body})

    def update(
        self,
        table: str,
        key: dict[str, Any],
        expression: str,
        *,
        condition: str | None = None,
        names: dict[str, str] | None = None,
        values: dict[str, Any] | None = None,
    ) -> None:
        """Update the item at ``key`` in ``table`` with ``expression``."""
        body: dict[str, Any] = {
            "TableName": table,
            "Key": self._typed(key),
            "UpdateExpression": expression,
        }
        self._conditions(body, condition, names, values)
        self.add({"Update": body})

    def delete(
        self,
        table: str,
        key: dict[str, Any],
        *,
        condition: str | None = None,
        names: dict[str, str] | None = None,
        values: dict[str, Any] | None = None,
    ) -> None:
        """Delete the item at ``key`` in ``table``."""
        body: dict[str, Any] = {"TableName": table, "Key": self._typed(key)}
        self._conditions(body, condition, names, values)
        self.add({"Delete": body})

    def condition_check(
        self,
        table: str,
        key: dict[str, Any],
        condition: str,
        *,
        names: dict[str, str] | None = None,
        values: dict[str, Any] | None = None,
    ) -> None:
        """Require ``condition`` on the item at ``key`` for the commit."""
        body: dict[str, Any] = {"TableName": table, "Key": self._typed(key)}
        self._conditions(body, condition, names, values)
        self.add({"ConditionCheck": body})

    def _conditions(
        self,
        body: dict[str, Any],
        condition: str | None,
        names: dict[str, str] | None,
        values: dict[str, Any] | None,
    ) -> None:
        if condition:
            body["ConditionExpression"] = condition
        if names:
            body["ExpressionAttributeNames"] = dict(names)
        if values:
            body["ExpressionAttributeValues"] = self._typed(values)
