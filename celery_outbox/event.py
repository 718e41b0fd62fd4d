"""Events, leases and their DynamoDB item layout.

The layout is the one of the TypeScript ``outbox-event-bus`` DynamoDB adapter
(``id``, ``type``, ``payload``, ``occurredAt``, ``status``, ``gsiSortKey``,
``retryCount``, ``startedOn``, ``completedOn``, ``lastError``); what this
library adds sits beside it under names of its own (``leaseToken``,
``expiresAt``, ``runningSince``, ``runningBy``, ``operatorRetries``), so items
stay readable by both.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from celery_outbox import payload as payloads
from celery_outbox.errors import ArgumentError, EventError

__all__ = [
    "Event",
    "FailedEvent",
    "Lease",
    "Status",
    "check_event_ids",
    "item_size",
]

# Attribute names. Several are DynamoDB reserved words, so expressions name
# them through ``#placeholders`` only (see store.NAMES).
ID = "id"
TYPE = "type"
PAYLOAD = "payload"
OCCURRED_AT = "occurredAt"
STATUS = "status"
SORT_KEY = "gsiSortKey"
RETRY_COUNT = "retryCount"
STARTED_ON = "startedOn"
COMPLETED_ON = "completedOn"
LAST_ERROR = "lastError"
LEASE_TOKEN = "leaseToken"
EXPIRES_AT = "expiresAt"
"""TTL attribute (epoch seconds) of completed events kept for inspection."""
RUNNING_SINCE = "runningSince"
"""When the current lease's handler started (ms); absent until it starts."""
RUNNING_BY = "runningBy"
"""Which delivery of the lease's message wrote ``runningSince``: a lease sent
twice has two, and a worker reports the loss only of its own."""
OPERATOR_RETRIES = "operatorRetries"
"""How many times an operator retried the event after it failed; absent: 0."""

ITEM_LIMIT = 400 * 1024
MAX_ID_BYTES = 1024
MAX_TYPE_BYTES = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Status(StrEnum):
    """The lifecycle states an event moves through."""

    CREATED = "created"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"


def now_iso() -> str:
    """The current UTC time as the TypeScript adapter writes it."""
    return iso(datetime.now(UTC))


def iso(moment: datetime) -> str:
    """``moment`` as ISO-8601 UTC with milliseconds and ``Z``, like JS."""
    if moment.tzinfo is None:
        raise EventError(
            f"occurred_at {moment!r} has no time zone; pass an aware datetime"
        )
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def _check_text(name: str, value: Any, *, max_bytes: int) -> str:
    if not isinstance(value, str):
        raise EventError(f"event {name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise EventError(f"event {name} must not be empty or blank")
    if _CONTROL.search(value):
        raise EventError(f"event {name} {value!r} contains control characters")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise EventError(f"event {name} {value!r} is not valid Unicode") from None
    if size > max_bytes:
        raise EventError(
            f"event {name} is {size} bytes long; the limit is {max_bytes} bytes"
        )
    return value


def check_event_ids(event_ids: Any, argument: str = "event_ids") -> list[str]:
    """``event_ids`` as a list of valid ids, or :class:`ArgumentError`.

    One id alone (a string) is taken as a list of one, since iterating a
    string by mistake would name every character as an id.
    """
    ids = [event_ids] if isinstance(event_ids, str) else event_ids
    try:
        ids = list(ids)
    except TypeError:
        raise ArgumentError(
            argument, f"expected event ids, got {type(event_ids).__name__}"
        ) from None
    for event_id in ids:
        try:
            _check_text("id", event_id, max_bytes=MAX_ID_BYTES)
        except EventError as exc:
            raise ArgumentError(argument, str(exc)) from None
    return ids


@dataclass(frozen=True)
class Event:
    """One outbox event: what happened, as handlers receive it.

    Build new events with :meth:`new`, which validates every field.
    """

    id: str
    type: str
    payload: Any
    occurred_at: str
    """ISO-8601 UTC timestamp, e.g. ``2026-12-03T13:51:00.123Z``."""

    attempt: int = 1
    """1 for the first attempt, 2 for the first retry, and so on."""

    operator_retries: int = 0
    """How many times an operator retried the event after it had failed;
    each such retry starts the attempts again from 1."""

    @classmethod
    def new(
        cls,
        type: str,
        payload: Any = None,
        *,
        id: str | None = None,
        occurred_at: datetime | str | None = None,
    ) -> Event:
        """Validate and build an event; ``id`` defaults to a fresh UUID."""
        _check_text("type", type, max_bytes=MAX_TYPE_BYTES)
        event_id = str(uuid.uuid4()) if id is None else id
        _check_text("id", event_id, max_bytes=MAX_ID_BYTES)
        payloads.validate(payload)
        if occurred_at is None:
            when = now_iso()
        elif isinstance(occurred_at, datetime):
            when = iso(occurred_at)
        elif isinstance(occurred_at, str):
            try:
                when = iso(datetime.fromisoformat(occurred_at))
            except ValueError:
                raise EventError(
                    f"occurred_at {occurred_at!r} is not an ISO-8601 timestamp"
                ) from None
        else:
            raise EventError(
                f"occurred_at must be a datetime or ISO string, got {occurred_at!r}"
            )
        return cls(id=event_id, type=type, payload=payload, occurred_at=when)

    def to_item(self, due_ms: int) -> dict[str, Any]:
        """The typed DynamoDB item of this event, ``created`` and due at ``due_ms``."""
        return {
            ID: {"S": self.id},
            TYPE: {"S": self.type},
            PAYLOAD: payloads.to_dynamodb(self.payload),
            OCCURRED_AT: {"S": self.occurred_at},
            STATUS: {"S": Status.CREATED.value},
            SORT_KEY: {"N": str(due_ms)},
            RETRY_COUNT: {"N": "0"},
        }

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> Event:
        """Read an event from a typed item, ours or the TypeScript adapter's."""
        raw = item.get(PAYLOAD)
        return cls(
            id=item[ID]["S"],
            type=item.get(TYPE, {}).get("S", ""),
            payload=None if raw is None else payloads.from_dynamodb(raw),
            occurred_at=_occurred(item),
            attempt=_int(item, RETRY_COUNT) + 1,
            operator_retries=_int(item, OPERATOR_RETRIES),
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict, as sent to handler tasks."""
        return {
            "id": self.id,
            "type": self.type,
            "payload": self.payload,
            "occurred_at": self.occurred_at,
            "attempt": self.attempt,
            "operator_retries": self.operator_retries,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        """The inverse of :meth:`as_dict`."""
        return cls(
            id=data["id"],
            type=data["type"],
            payload=data.get("payload"),
            occurred_at=data.get("occurred_at", ""),
            attempt=int(data.get("attempt", 1)),
            operator_retries=int(data.get("operator_retries", 0)),
        )


def _int(item: dict[str, Any], name: str, default: int = 0) -> int:
    value = item.get(name)
    return default if value is None else int(value["N"])


def _occurred(item: dict[str, Any]) -> str:
    value = item.get(OCCURRED_AT)
    if value is None:
        return ""
    # The TypeScript adapter may store a string or epoch milliseconds.
    if "N" in value:
        moment = datetime.fromtimestamp(int(value["N"]) / 1000, UTC)
        return iso(moment)
    return str(value.get("S", ""))


@dataclass(frozen=True)
class Lease:
    """A claimed event: the right to run it until ``deadline_ms``.

    Write-backs name ``token``; one from a lease that has since been
    reclaimed matches nothing and changes nothing. ``resent`` marks a lease
    sent again because its handler never started: an earlier copy of its
    message may still be waiting in the broker, so whichever copy runs must
    first win the conditional start.
    """

    event: Event
    token: str
    deadline_ms: int
    started_ms: int
    resent: bool = False
    copy: str | None = None
    """Which delivery of the lease's message this is, named by the worker
    that received it (:class:`~celery_outbox.handlers.HandlerRequest`);
    None outside a worker."""

    @property
    def retry_count(self) -> int:
        """Failed attempts before this one."""
        return self.event.attempt - 1


@dataclass(frozen=True)
class FailedEvent:
    """A ``failed`` event as operators see it."""

    event: Event
    retry_count: int
    last_error: str
    failed_ms: int

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict.

        It has no ``attempt``: a failed event has no next attempt until an
        operator retries it; ``retry_count`` says how many failed.
        """
        failed_at = datetime.fromtimestamp(self.failed_ms / 1000, UTC)
        event = self.event.as_dict()
        del event["attempt"]
        return {
            **event,
            "retry_count": self.retry_count,
            "last_error": self.last_error,
            "failed_at": iso(failed_at),
        }

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> FailedEvent:
        """Read a failed event from its typed item."""
        return cls(
            event=Event.from_item(item),
            retry_count=_int(item, RETRY_COUNT),
            last_error=item.get(LAST_ERROR, {}).get("S", ""),
            failed_ms=_int(item, SORT_KEY),
        )


def item_size(item: dict[str, Any]) -> int:
    """Estimate a typed item's size the way DynamoDB counts it.

    Names and strings count their UTF-8 bytes, numbers about one byte per
    two digits plus one, and each map or list three bytes plus one a member.
    The estimate errs high, so a passing item is under the real limit.
    """
    return sum(len(name.encode("utf-8")) + value_size(v) for name, v in item.items())


def value_size(value: dict[str, Any]) -> int:
    """Estimate the size of one typed value, as :func:`item_size` does."""
    ((kind, inner),) = value.items()
    if kind == "S":
        return len(inner.encode("utf-8"))
    if kind == "N":
        digits = len(inner.lstrip("-").replace(".", "").lstrip("0")) or 1
        return (digits + 1) // 2 + 1
    if kind == "B":
        return len(inner)
    if kind in ("BOOL", "NULL"):
        return 1
    if kind == "L":
        return 3 + sum(1 + value_size(v) for v in inner)
    if kind == "M":
        return 3 + sum(
            1 + len(k.encode("utf-8")) + value_size(v) for k, v in inner.items()
        )
    if kind in ("SS", "NS", "BS"):
        return sum(value_size({kind[0]: v}) for v in inner)
    return len(str(inner))
