"""Emits: write events now, or hand their actions to the caller's transaction.

An event is created ``created`` and due at once, by a put that refuses to
overwrite an existing id (``attribute_not_exists``). Several events, or
events with the caller's own actions, go out as one ``TransactWriteItems``;
DynamoDB's limits (100 actions, 4 MB, 400 KB an item, one action an item)
are checked first, so a refused emit writes nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from celery_outbox import collector as collectors
from celery_outbox import event as ev
from celery_outbox.dynamo import CONDITION_FAILED, DynamoTable, error_code
from celery_outbox.errors import (
    EventError,
    EventExistsError,
    ItemTooLargeError,
    TransactionCancelledError,
)
from celery_outbox.event import Event, Status

__all__ = ["Emits"]


@functools.cache  # on every emit's path; one value per max_error_chars
def lifecycle_room(max_error_chars: int) -> int:
    """Bytes an item must leave free for what its lifecycle writes after emit.

    A lease (token, start), a start mark (time, delivery), a retry (count,
    error of up to ``max_error_chars``, 4 bytes a character at most), an
    operator retry, a kept completion, and longer status and sort key
    values. An item with less room is one DynamoDB refuses to claim, start
    or fail: a ValidationError that fails every batch it rides in.
    """
    added = {
        ev.LEASE_TOKEN: 32,
        ev.STARTED_ON: 8,
        ev.RUNNING_SINCE: 8,
        ev.RUNNING_BY: 32,
        ev.RETRY_COUNT: 4,
        ev.LAST_ERROR: 4 * max_error_chars,
        ev.OPERATOR_RETRIES: 4,
        ev.COMPLETED_ON: 8,
        ev.EXPIRES_AT: 8,
    }
    return sum(len(name) + size for name, size in added.items()) + 64


class Emits(DynamoTable):
    """Put events into the outbox table, alone or in a transaction."""

    def put_action(self, event: Event) -> dict[str, Any]:
        """The ``TransactWriteItems`` action that creates ``event``, due now.

        Its condition refuses to overwrite an event with the same id.

        Raises:
            EventError: ``event`` is not an :class:`Event`.
            PayloadError: the payload holds a value that is not JSON.
            ItemTooLargeError: the item exceeds DynamoDB's 400 KB.
        """
        if not isinstance(event, Event):
            raise EventError(
                f"expected an Event (see Event.new), got {type(event).__name__}"
            )
        item = event.to_item(self.clock())
        item[ev.STATUS] = self.status_value(Status.CREATED, event.id)
        size = ev.item_size(item)
        limit = ev.ITEM_LIMIT - lifecycle_room(self.config.max_error_chars)
        if size > limit:
            raise ItemTooLargeError(event.id, size, limit)
        return {
            "Put": {
                "TableName": self.table,
                "Item": item,
                "ConditionExpression": "attribute_not_exists(#id)",
                "ExpressionAttributeNames": {"#id": ev.ID},
            }
        }

    def publish(self, events: Sequence[Event]) -> None:
        """Write ``events`` now, all or none; an existing id is never overwritten.

        One event is one ``PutItem``; several are one ``TransactWriteItems``,
        so at most 100 and 4 MB in all. Every check runs before the write.

        Raises:
            EventError: an event is invalid (see :meth:`put_action`).
            CollectorError: the events break a transaction limit, or one id
                appears twice.
            EventExistsError: an id is already stored; nothing was written.
        """
        events = list(events)
        actions = [self.put_action(e) for e in events]
        collectors.append([], actions)
        if len(actions) == 1:
            self._put_one(events[0], actions[0]["Put"])
        elif actions:
            self.commit(actions)

    def _put_one(self, event: Event, put: dict[str, Any]) -> None:
        try:
            self.client.put_item(**put)
        except ClientError as exc:
            if error_code(exc) != CONDITION_FAILED:
                raise self._error("put", exc) from exc
            # botocore resends a put whose answer was lost; finding our own
            # event there is success, not a collision.
            if not self._is_same_event(event):
                raise EventExistsError([event.id]) from None
        except BotoCoreError as exc:
            raise self._error("put", exc) from exc

    def _is_same_event(self, event: Event) -> bool:
        found = self.get_item(event.id)
        if found is None:
            return False
        stored = Event.from_item(found)
        return (stored.type, stored.occurred_at, stored.payload) == (
            event.type,
            event.occurred_at,
            event.payload,
        )

    def commit(self, actions: Sequence[dict[str, Any]]) -> None:
        """Run ``actions`` (events and the caller's own) as one transaction.

        The limits are checked before anything is sent. A client request
        token makes botocore's resends safe: DynamoDB applies it once.

        Raises:
            CollectorError: the actions break a transaction limit.
            EventExistsError: an outbox event's id already exists.
            TransactionCancelledError: DynamoDB cancelled the transaction for
                another reason (a condition of the caller's, say).
        """
        actions = list(actions)
        collectors.check(actions, keys={self.table: (ev.ID,)})
        if not actions:
            return
        reasons = self._transact(actions)
        if reasons is None:
            return
        exists = [
            _action_id(actions[i])
            for i, reason in enumerate(reasons)
            if reason == "ConditionalCheckFailed" and self._is_event_put(actions[i])
        ]
        if exists:
            raise EventExistsError(exists)
        faults = ", ".join(
            f"action {i} ({next(iter(actions[i]))} on "
            f"{next(iter(actions[i].values()))['TableName']!r}): {reason}"
            for i, reason in enumerate(reasons)
            if reason != "None" and i < len(actions)
        )
        raise TransactionCancelledError(
            f"DynamoDB cancelled the transaction of {len(actions)} actions; "
            f"nothing was written. {faults or 'No reason was given'}",
            reasons,
        )

    def _is_event_put(self, action: dict[str, Any]) -> bool:
        put = action.get("Put") or {}
        item = put.get("Item", {})
        return bool(put.get("TableName") == self.table and ev.STATUS in item)


def _action_id(action: dict[str, Any]) -> str:
    (body,) = action.values()
    key = body.get("Item") or body.get("Key") or {}
    return str(key.get(ev.ID, {}).get("S", "?"))
