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

from celery_outbox import event as ev
from celery_outbox import payload as payloads
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
    "check",
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


def action_size(action: dict[str, Any]) -> int:
    """Estimate the bytes an action adds to a transaction's 4 MB."""
    ((_kind, body),) = action.items()
    return _body_size(body)


def _body_size(body: dict[str, Any]) -> int:
    size = ev.item_size(body.get("Item") or body.get("Key") or {})
    values = body.get("ExpressionAttributeValues") or {}
    size += sum(len(k) + ev.value_size(v) for k, v in values.items())
    for name in ("UpdateExpression", "ConditionExpression"):
        size += len(str(body.get(name, "")).encode("utf-8"))
    return size


def append(collector: Any, actions: Sequence[dict[str, Any]]) -> None:
    """Append outbox ``actions`` to ``collector`` if every limit allows it.

    ``actions`` are event puts from :meth:`OutboxStore.put_action`: their
    table is keyed on ``id``, so another action on the same id, whatever its
    payload, is a duplicate. The collector is changed only when every check
    passes.

    Raises:
        CollectorError: the collector is not a list of actions.
        CollectorFullError: more than 100 actions would result.
        TransactionTooLargeError: more than 4 MB would result.
        DuplicateEventError: an event id would appear twice.
    """
    outbox_tables = {_action_parts(i, a)[1]["TableName"] for i, a in enumerate(actions)}
    _append(collector, actions, {t: (ev.ID,) for t in outbox_tables})


def check(
    actions: Sequence[dict[str, Any]],
    *,
    keys: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """Check a whole transaction against DynamoDB's limits before sending it.

    ``keys`` names the key attributes of tables known in advance.

    Raises:
        CollectorError: an action is malformed, an item appears twice, or a
            limit is broken.
    """
    _append([], actions, dict(keys or {}))


def _append(
    collector: Any,
    actions: Sequence[dict[str, Any]],
    keys: dict[str, tuple[str, ...]],
) -> None:
    """Check ``actions`` against ``collector`` and every limit, then extend it.

    ``keys`` names the key attributes of tables known in advance; those of
    other tables are learnt from the actions that carry a ``Key``, and a put
    on a table whose key is unknown is compared whole.
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
    bodies = [_action_parts(i, a)[1] for i, a in enumerate([*collector, *actions])]
    keys = dict(keys)
    for body in bodies:
        if body.get("Key") and body["TableName"] not in keys:
            keys[body["TableName"]] = tuple(sorted(body["Key"]))
    seen: dict[tuple[str, str], int] = {}
    size = 0
    for index, body in enumerate(bodies):
        identity = (body["TableName"], _identity(body, keys))
        if identity in seen:
            _duplicate(body, identity, seen[identity], keys)
        seen[identity] = index
        size += _body_size(body)
    if size > MAX_TRANSACTION_BYTES:
        raise TransactionTooLargeError(
            f"the transaction would be about {size:,} bytes; DynamoDB allows "
            f"{MAX_TRANSACTION_BYTES:,}"
        )
    collector.extend(actions)


def _identity(body: dict[str, Any], keys: dict[str, tuple[str, ...]]) -> str:
    """The item an action touches, as comparable text."""
    key = body.get("Key")
    if key is None:
        item = body.get("Item") or {}
        names = keys.get(body["TableName"])
        key = {n: item.get(n) for n in names} if names else item
    return json.dumps(key, sort_keys=True, default=str)


def _duplicate(
    body: dict[str, Any],
    identity: tuple[str, str],
    first: int,
    keys: dict[str, tuple[str, ...]],
) -> None:
    table, key = identity
    if keys.get(table) == (ev.ID,):
        event_id = str((body.get("Item") or body.get("Key") or {})[ev.ID].get("S"))
        raise DuplicateEventError(
            event_id,
            f"event {event_id!r} is already in this transaction (at "
            f"collector[{first}]); DynamoDB allows one action per item",
        )
    raise CollectorError(
        f"item {key} of table {table!r} is already in this transaction (at "
        f"collector[{first}]); DynamoDB allows one action per item"
    )


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

    def __len__(self) -> int:
        return len(self.actions)

    def _typed(self, values: dict[str, Any]) -> dict[str, Any]:
        return {k: payloads.to_dynamodb(v, f"item[{k!r}]") for k, v in values.items()}

    def add(self, action: dict[str, Any]) -> None:
        """Add a raw, typed ``TransactWriteItems`` action.

        Raises:
            CollectorError: it is not an action, touches an item already in
                the transaction, or would break a DynamoDB limit.
        """
        _append(self.actions, [action], {})

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
