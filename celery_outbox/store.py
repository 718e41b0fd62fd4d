"""The DynamoDB store: every read and conditional write of the event lifecycle.

::

    emit ──> created ──claim──> active ──complete──> completed (or deleted)
               ^                  │  └──fail, retries left──> created (due later)
               │                  │  └──fail, none left─────> failed
               │                  └──lease expired──> reclaimed (an attempt)
               └───────────── retry (operator) <──── failed

Each transition after emit is an ``UpdateItem`` or ``DeleteItem`` whose
condition names the state it expects: the status and, for an ``active``
event, the lease token. A write whose condition fails lost a race or came
from a stale lease; it changes nothing and is reported, never raised.

Throttling and transient errors are retried by botocore (``standard`` retry
mode, see :func:`make_client`), not by loops of our own.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from celery_outbox import event as ev
from celery_outbox.config import Completion, OutboxConfig
from celery_outbox.errors import (
    DuplicateEventError,
    EventError,
    EventExistsError,
    ItemTooLargeError,
    OutboxError,
    StoreError,
    TableError,
    UnprocessedItemsError,
)
from celery_outbox.event import Event, FailedEvent, Lease, Status

__all__ = [
    "ClaimResult",
    "FailedPage",
    "OutboxStore",
    "Outcome",
    "RetryReport",
    "Stats",
    "make_client",
]

logger = logging.getLogger("celery_outbox.store")

Clock = Callable[[], int]
CCF = "ConditionalCheckFailedException"

# Every attribute an expression names goes through a placeholder: ``status``,
# ``type`` and ``payload`` are reserved words in DynamoDB.
NAMES = {
    "#id": ev.ID,
    "#type": ev.TYPE,
    "#status": ev.STATUS,
    "#sk": ev.SORT_KEY,
    "#retry": ev.RETRY_COUNT,
    "#started": ev.STARTED_ON,
    "#completed": ev.COMPLETED_ON,
    "#error": ev.LAST_ERROR,
    "#token": ev.LEASE_TOKEN,
    "#expires": ev.EXPIRES_AT,
}


def _names(expression: str) -> dict[str, str]:
    """The placeholders that ``expression`` uses, and nothing else."""
    return {k: v for k, v in NAMES.items() if k in expression}


def _exprs(*expressions: str) -> dict[str, str]:
    return _names(" ".join(expressions))


def wall_clock_ms() -> int:
    """Milliseconds since the epoch, the unit of ``gsiSortKey``."""
    return time.time_ns() // 1_000_000


def make_client(config: OutboxConfig) -> Any:
    """A DynamoDB client for ``config``, with botocore's standard retries.

    ``standard`` mode retries throttling and 5xx errors with jittered
    exponential backoff; ten attempts ride out short throttling bursts.
    """
    return boto3.client(
        "dynamodb",
        endpoint_url=config.endpoint_url,
        region_name=config.region_name or "us-east-1",
        config=BotoConfig(
            retries={"mode": "standard", "max_attempts": 10},
            connect_timeout=5,
            read_timeout=30,
            max_pool_connections=50,
        ),
    )


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class Outcome(str, Enum):
    """What a write-back did."""

    COMPLETED = "completed"
    RETRYING = "retrying"
    FAILED = "failed"
    STALE = "stale"
    """The lease was no longer live; nothing was written."""


@dataclass(frozen=True)
class ClaimResult:
    """The leases one claim took, and the candidates it lost to others."""

    leases: list[Lease]
    skipped: int
    exhausted: int = 0
    """Expired leases moved to ``failed`` instead of reclaimed (poison cap)."""


@dataclass(frozen=True)
class FailedPage:
    """One page of failed events, newest first, and the cursor of the next."""

    events: list[FailedEvent]
    cursor: str | None


@dataclass(frozen=True)
class RetryReport:
    """Which ids an operator retry moved back to ``created``."""

    retried: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    not_failed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        """A JSON-serialisable dict."""
        return {
            "retried": self.retried,
            "missing": self.missing,
            "not_failed": self.not_failed,
        }


@dataclass(frozen=True)
class Stats:
    """Counts per status, and how long the oldest due event has waited."""

    counts: dict[str, int]
    due: int
    oldest_due_age_ms: int | None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "counts": self.counts,
            "due": self.due,
            "oldest_due_age_ms": self.oldest_due_age_ms,
        }


class OutboxStore:
    """Outbox events in one DynamoDB table, moved through their lifecycle.

    Args:
        config: the table and lifecycle settings.
        client: a boto3 DynamoDB client; one is made from ``config`` if None.
        clock: milliseconds since the epoch; tests and drills shift it.
        rng: the source of backoff jitter.
    """

    def __init__(
        self,
        config: OutboxConfig,
        *,
        client: Any = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.client = client if client is not None else make_client(config)
        self.clock: Clock = clock or wall_clock_ms
        self._rng = rng or random.Random()
        self.table = config.table_name
        self.index = config.status_index_name

    def __repr__(self) -> str:
        return f"<OutboxStore table={self.table!r} index={self.index!r}>"

    # -- emit ---------------------------------------------------------------

    def put_action(self, event: Event) -> dict[str, Any]:
        """The ``TransactWriteItems`` action that creates ``event``, due now.

        Raises:
            ItemTooLargeError: the item exceeds DynamoDB's 400 KB.
        """
        item = event.to_item(self.clock())
        size = ev.item_size(item)
        if size > ev.ITEM_LIMIT:
            raise ItemTooLargeError(event.id, size, ev.ITEM_LIMIT)
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

        One event is one ``PutItem``; several are one ``TransactWriteItems``
        (at most 100, DynamoDB's transaction limit).

        Raises:
            EventExistsError: an id is already stored; nothing was written.
        """
        if not events:
            return
        if len(events) > 100:
            raise EventError(
                f"{len(events)} events in one publish; a transaction holds at "
                "most 100, so publish them in several calls"
            )
        ids = [e.id for e in events]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DuplicateEventError(dup, f"event id {dup!r} appears twice")
        actions = [self.put_action(e) for e in events]
        if len(actions) == 1:
            self._put_one(events[0], actions[0]["Put"])
        else:
            self.commit(actions)

    def _put_one(self, event: Event, put: dict[str, Any]) -> None:
        try:
            self.client.put_item(**put)
        except ClientError as exc:
            if _code(exc) != CCF:
                raise self._error("put", exc) from exc
            # botocore may have resent a put whose first try succeeded; that
            # is our own item, not a collision.
            if not self._is_same_event(event):
                raise EventExistsError([event.id]) from None

    def _is_same_event(self, event: Event) -> bool:
        found = self.get_item(event.id)
        return (
            found is not None
            and found.get(ev.OCCURRED_AT, {}).get("S") == event.occurred_at
            and Event.from_item(found).payload == event.payload
        )

    def commit(self, actions: Sequence[dict[str, Any]]) -> None:
        """Run ``actions`` as one ``TransactWriteItems``, idempotently.

        A client request token makes botocore's resends safe: DynamoDB
        applies the transaction once.

        Raises:
            EventExistsError: an outbox event's id already exists.
            StoreError: the transaction was cancelled for another reason.
        """
        if not actions:
            return
        try:
            self.client.transact_write_items(
                TransactItems=list(actions), ClientRequestToken=str(uuid.uuid4())
            )
        except ClientError as exc:
            if _code(exc) != "TransactionCanceledException":
                raise self._error("transaction", exc) from exc
            reasons = exc.response.get("CancellationReasons") or []
            exists = [
                self._action_id(actions[i])
                for i, reason in enumerate(reasons)
                if reason.get("Code") == "ConditionalCheckFailed"
                and self._is_our_put(actions[i])
            ]
            if exists:
                raise EventExistsError(exists) from exc
            codes = [r.get("Code", "None") for r in reasons]
            raise StoreError(
                f"transaction of {len(actions)} actions cancelled: {codes}",
                "TransactionCanceledException",
            ) from exc

    def _is_our_put(self, action: dict[str, Any]) -> bool:
        put = action.get("Put") or {}
        return bool(put.get("TableName") == self.table and ev.STATUS in put.get("Item", {}))

    @staticmethod
    def _action_id(action: dict[str, Any]) -> str:
        (body,) = action.values()
        key = body.get("Item") or body.get("Key") or {}
        return str(key.get(ev.ID, {}).get("S", "?"))

    # -- claim --------------------------------------------------------------

    def due(self, status: Status, limit: int, now: int) -> list[dict[str, Any]]:
        """Items of ``status`` whose sort key is at most ``now``, oldest first.

        Reads at most ``config.max_query_pages`` pages of the status index.
        """
        items: list[dict[str, Any]] = []
        for page in self._query_pages(
            status.value,
            "#status = :s AND #sk <= :now",
            {":s": {"S": status.value}, ":now": {"N": str(now)}},
            limit=limit,
            max_pages=self.config.max_query_pages,
        ):
            items.extend(page)
        return items[:limit]

    def claim(self, limit: int | None = None) -> ClaimResult:
        """Lease up to ``limit`` due events (default ``config.batch_size``).

        Expired leases are looked at first, so a backlog of new events never
        starves a lost worker's event. Each candidate is confirmed by a
        conditional write: the index is eventually consistent, and other
        drains race for the same events.
        """
        limit = self.config.batch_size if limit is None else limit
        now = self.clock()
        expired = self.due(Status.ACTIVE, limit, now)
        fresh = self.due(Status.CREATED, limit - len(expired), now) if (
            len(expired) < limit
        ) else []
        leases: list[Lease] = []
        skipped = exhausted = 0
        for item in expired:
            result = self._reclaim(item, now)
            if isinstance(result, Lease):
                leases.append(result)
            elif result is Outcome.FAILED:
                exhausted += 1
            else:
                skipped += 1
        for item in fresh:
            lease = self._claim_created(item, now)
            if lease is None:
                skipped += 1
            else:
                leases.append(lease)
        return ClaimResult(leases, skipped, exhausted)

    def _claim_created(self, item: dict[str, Any], now: int) -> Lease | None:
        return self._lease(
            item[ev.ID]["S"],
            now,
            "#status = :created AND #sk <= :now",
            {":created": {"S": Status.CREATED.value}},
            extra_set="",
        )

    def _reclaim(self, item: dict[str, Any], now: int) -> Lease | Outcome | None:
        """Take over an expired lease; its lost attempt counts as a failure."""
        event_id = item[ev.ID]["S"]
        retries = int(item.get(ev.RETRY_COUNT, {"N": "0"})["N"]) + 1
        seen = item.get(ev.LEASE_TOKEN, {}).get("S")
        condition = "#status = :active AND #sk <= :now AND " + (
            "#token = :seen" if seen else "attribute_not_exists(#token)"
        )
        values = {":active": {"S": Status.ACTIVE.value}}
        if seen:
            values[":seen"] = {"S": seen}
        lost = (
            f"LeaseExpired: attempt {retries} did not report back within "
            f"{self.config.processing_timeout_ms} ms; its worker was probably lost"
        )
        if retries > self.config.max_retries:
            done = self._update(
                event_id,
                "SET #status = :failed, #sk = :now, #retry = :retry, #error = :err "
                "REMOVE #token",
                condition,
                {
                    **values,
                    ":failed": {"S": Status.FAILED.value},
                    ":now": {"N": str(now)},
                    ":retry": {"N": str(retries)},
                    ":err": {"S": self.short_error(lost)},
                },
            )
            if done is None:
                return None
            logger.warning(
                "Event %r (%s) failed: lease expired on its last attempt (%d)",
                event_id, item.get(ev.TYPE, {}).get("S"), retries,
            )
            return Outcome.FAILED
        logger.warning(
            "Reclaiming event %r: its lease expired (attempt %d lost)",
            event_id, retries,
        )
        return self._lease(
            event_id,
            now,
            condition,
            {**values, ":retry": {"N": str(retries)}, ":err": {"S": self.short_error(lost)}},
            extra_set=", #retry = :retry, #error = :err",
        )

    def _lease(
        self,
        event_id: str,
        now: int,
        condition: str,
        values: dict[str, Any],
        *,
        extra_set: str,
    ) -> Lease | None:
        token = uuid.uuid4().hex
        deadline = now + self.config.processing_timeout_ms
        item = self._update(
            event_id,
            "SET #status = :lease, #sk = :deadline, #token = :token, "
            "#started = :now" + extra_set,
            condition,
            {
                **values,
                ":lease": {"S": Status.ACTIVE.value},
                ":deadline": {"N": str(deadline)},
                ":token": {"S": token},
                ":now": {"N": str(now)},
            },
            returns="ALL_NEW",
        )
        if item is None:
            return None
        return Lease(Event.from_item(item), token, deadline, now)

    # -- write-back ---------------------------------------------------------

    def complete(self, lease: Lease) -> Outcome:
        """Record that ``lease``'s attempt succeeded.

        Deletes the event, or keeps it as ``completed`` with a TTL, by
        ``config.completion``. A stale lease changes nothing.
        """
        condition = "#status = :active AND #token = :token"
        values = {
            ":active": {"S": Status.ACTIVE.value},
            ":token": {"S": lease.token},
        }
        if self.config.completion is Completion.DELETE:
            try:
                self.client.delete_item(
                    TableName=self.table,
                    Key={ev.ID: {"S": lease.event.id}},
                    ConditionExpression=condition,
                    ExpressionAttributeNames=_names(condition),
                    ExpressionAttributeValues=values,
                )
            except ClientError as exc:
                if _code(exc) != CCF:
                    raise self._error("complete", exc) from exc
                return self._stale(lease, "complete")
            return Outcome.COMPLETED
        now = self.clock()
        done = self._update(
            lease.event.id,
            "SET #status = :completed, #sk = :now, #completed = :now, "
            "#expires = :expires REMOVE #token",
            condition,
            {
                **values,
                ":completed": {"S": Status.COMPLETED.value},
                ":now": {"N": str(now)},
                ":expires": {"N": str(now // 1000 + self.config.retention_s)},
            },
        )
        return Outcome.COMPLETED if done is not None else self._stale(lease, "complete")

    def fail(
        self,
        lease: Lease,
        error: str | BaseException,
        *,
        delay_ms: int | None = None,
        final: bool = False,
    ) -> Outcome:
        """Record that ``lease``'s attempt failed with ``error``.

        The event is due again after ``delay_ms`` (default: the backoff), or
        ``failed`` when its retries are spent or ``final`` is set. A stale
        lease changes nothing.
        """
        retries = lease.retry_count + 1
        now = self.clock()
        final = final or retries > self.config.max_retries
        status = Status.FAILED if final else Status.CREATED
        if final:
            sort_key = now
        else:
            sort_key = now + (self.backoff_ms(retries) if delay_ms is None else delay_ms)
        done = self._update(
            lease.event.id,
            "SET #status = :status, #sk = :sk, #retry = :retry, #error = :err "
            "REMOVE #token",
            "#status = :active AND #token = :token",
            {
                ":active": {"S": Status.ACTIVE.value},
                ":token": {"S": lease.token},
                ":status": {"S": status.value},
                ":sk": {"N": str(sort_key)},
                ":retry": {"N": str(retries)},
                ":err": {"S": self.short_error(error)},
            },
        )
        if done is None:
            return self._stale(lease, "fail")
        return Outcome.FAILED if final else Outcome.RETRYING

    def release(self, lease: Lease) -> Outcome:
        """Give a lease back unused (its dispatch failed): due now, no attempt.

        Returns ``RETRYING`` when released, ``STALE`` when the lease had
        already gone.
        """
        done = self._update(
            lease.event.id,
            "SET #status = :created, #sk = :now REMOVE #token",
            "#status = :active AND #token = :token",
            {
                ":active": {"S": Status.ACTIVE.value},
                ":token": {"S": lease.token},
                ":created": {"S": Status.CREATED.value},
                ":now": {"N": str(self.clock())},
            },
        )
        return Outcome.RETRYING if done is not None else self._stale(lease, "release")

    def backoff_ms(self, retries: int) -> int:
        """The delay before retry number ``retries`` (1 for the first).

        Exponential from ``base_backoff_ms``, capped at ``max_backoff_ms``,
        with "equal jitter": a uniform draw from the upper half of that
        delay. It spreads retries of events that failed together, never
        drops below half the delay (so never to zero) and never exceeds the
        cap.
        """
        if retries < 1:
            raise ValueError(f"retries counts from 1, got {retries}")
        base, cap = self.config.base_backoff_ms, self.config.max_backoff_ms
        delay: int = min(cap, base * 2 ** min(retries - 1, 62))
        half = delay / 2
        return max(1, min(cap, round(half + self._rng.uniform(0, half))))

    def _stale(self, lease: Lease, what: str) -> Outcome:
        logger.info(
            "Ignored %s of event %r: lease %s is no longer live (reclaimed or "
            "already written back)", what, lease.event.id, lease.token,
        )
        return Outcome.STALE

    def short_error(self, error: str | BaseException) -> str:
        """``error`` on one line, cut to ``config.max_error_chars``."""
        if isinstance(error, BaseException):
            text = f"{type(error).__name__}: {error}"
        else:
            text = str(error)
        text = " ".join(text.split())  # one line, whatever the traceback held
        limit = self.config.max_error_chars
        return text if len(text) <= limit else text[: limit - 1] + "…"

    # -- inspection ---------------------------------------------------------

    def get_item(self, event_id: str) -> dict[str, Any] | None:
        """The typed item of ``event_id`` (strongly consistent), or None."""
        try:
            response = self.client.get_item(
                TableName=self.table, Key={ev.ID: {"S": event_id}}, ConsistentRead=True
            )
        except ClientError as exc:
            raise self._error("get", exc) from exc
        item: dict[str, Any] | None = response.get("Item")
        return item

    def status_of(self, event_id: str) -> Status | None:
        """The status of ``event_id``, or None when it is not stored."""
        item = self.get_item(event_id)
        return None if item is None else Status(item[ev.STATUS]["S"])

    def failed(
        self,
        *,
        limit: int = 100,
        cursor: str | None = None,
        type: str | None = None,
    ) -> FailedPage:
        """Failed events, newest failure first, ``limit`` at a time.

        Pass the returned ``cursor`` to get the next page; it is None after
        the last one. ``type`` keeps only events of that type.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise EventError(f"limit must be a positive integer, got {limit!r}")
        start = self._decode_cursor(cursor)
        values: dict[str, Any] = {":s": {"S": Status.FAILED.value}}
        kwargs: dict[str, Any] = {"ScanIndexForward": False}
        if type is not None:
            kwargs["FilterExpression"] = "#type = :type"
            values[":type"] = {"S": type}
        found: list[dict[str, Any]] = []
        last: dict[str, Any] | None = start
        while True:
            response = self._query(
                "#status = :s", values, limit=limit - len(found), start=last, **kwargs
            )
            for item in response.get("Items", []):
                found.append(item)
                if len(found) == limit:
                    # Resume right after the last event returned, even when
                    # the page went further.
                    key = {k: item[k] for k in (ev.ID, ev.STATUS, ev.SORT_KEY)}
                    return FailedPage(self._events(found), self._encode_cursor(key))
            last = response.get("LastEvaluatedKey")
            if last is None:
                return FailedPage(self._events(found), None)

    @staticmethod
    def _events(items: list[dict[str, Any]]) -> list[FailedEvent]:
        return [FailedEvent.from_item(i) for i in items]

    def iter_failed(self, *, type: str | None = None) -> Iterator[FailedEvent]:
        """Every failed event, newest first, page by page."""
        cursor: str | None = None
        while True:
            page = self.failed(limit=100, cursor=cursor, type=type)
            yield from page.events
            cursor = page.cursor
            if cursor is None:
                return

    def retry(self, event_ids: Iterable[str]) -> RetryReport:
        """Move failed events back to ``created``, due now, with no retries used.

        Returns which ids were retried, which are not stored and which are
        not ``failed`` (those are left untouched).
        """
        ids = list(event_ids) if not isinstance(event_ids, str) else [event_ids]
        for event_id in ids:
            if not isinstance(event_id, str) or not event_id:
                raise EventError(f"event ids must be non-empty strings, got {event_id!r}")
        report = RetryReport()
        for event_id in dict.fromkeys(ids):
            done = self._update(
                event_id,
                "SET #status = :created, #sk = :now, #retry = :zero "
                "REMOVE #error, #token",
                "#status = :failed",
                {
                    ":created": {"S": Status.CREATED.value},
                    ":failed": {"S": Status.FAILED.value},
                    ":now": {"N": str(self.clock())},
                    ":zero": {"N": "0"},
                },
            )
            if done is not None:
                report.retried.append(event_id)
            elif self.get_item(event_id) is None:
                report.missing.append(event_id)
            else:
                report.not_failed.append(event_id)
        if report.retried:
            logger.info("Retried %d failed events", len(report.retried))
        return report

    def retry_failed(self, *, type: str | None = None) -> RetryReport:
        """Retry every failed event (of ``type``, if given)."""
        ids = [f.event.id for f in self.iter_failed(type=type)]
        return self.retry(ids)

    def stats(self) -> Stats:
        """Counts per status, the due count and the oldest due event's age."""
        now = self.clock()
        counts = {s.value: self._count("#status = :s", {":s": {"S": s.value}}) for s in Status}
        due_values = {":s": {"S": Status.CREATED.value}, ":now": {"N": str(now)}}
        due = self._count("#status = :s AND #sk <= :now", due_values)
        oldest = self._query("#status = :s AND #sk <= :now", due_values, limit=1)
        items = oldest.get("Items", [])
        age = now - int(items[0][ev.SORT_KEY]["N"]) if items else None
        return Stats(counts, due, age)

    def purge_completed(self, older_than_ms: int) -> int:
        """Delete kept ``completed`` events older than ``older_than_ms``.

        ``completed`` is terminal: nothing moves an event out of it, so the
        deletes need no condition and go out as ``BatchWriteItem``.
        """
        if isinstance(older_than_ms, bool) or not isinstance(older_than_ms, int) or (
            older_than_ms < 0
        ):
            raise EventError(f"older_than_ms must be >= 0, got {older_than_ms!r}")
        cutoff = self.clock() - older_than_ms
        purged = 0
        values = {":s": {"S": Status.COMPLETED.value}, ":cut": {"N": str(cutoff)}}
        for page in self._query_pages(
            Status.COMPLETED.value, "#status = :s AND #sk <= :cut", values,
            limit=None, max_pages=None, projection="#id",
        ):
            ids = [i[ev.ID]["S"] for i in page]
            for start in range(0, len(ids), 25):
                chunk = ids[start : start + 25]
                self.batch_delete(chunk)
                purged += len(chunk)
        if purged:
            logger.info("Purged %d completed events older than %d ms", purged, older_than_ms)
        return purged

    def batch_delete(self, event_ids: Sequence[str], attempts: int = 8) -> None:
        """Delete up to 25 items, resending what DynamoDB leaves unprocessed.

        Raises:
            UnprocessedItemsError: items still unprocessed after ``attempts``.
        """
        requests = {
            self.table: [{"DeleteRequest": {"Key": {ev.ID: {"S": i}}}} for i in event_ids]
        }
        for attempt in range(attempts):
            try:
                response = self.client.batch_write_item(RequestItems=requests)
            except ClientError as exc:
                raise self._error("batch write", exc) from exc
            requests = response.get("UnprocessedItems") or {}
            if not requests:
                return
            # Unprocessed items mean throttling; back off before resending.
            time.sleep(min(1.0, 0.05 * 2**attempt) * self._rng.uniform(0.5, 1))
        left = [r["DeleteRequest"]["Key"][ev.ID]["S"] for r in requests[self.table]]
        raise UnprocessedItemsError(left)

    # -- table --------------------------------------------------------------

    def create_table(self, *, wait: bool = True) -> bool:
        """Create the table, its status index and TTL; False if it exists.

        On-demand billing; the index projects every attribute so a drain
        reads whole events from it. TTL is enabled on ``expiresAt``.
        """
        try:
            self.client.create_table(
                TableName=self.table,
                BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[
                    {"AttributeName": ev.ID, "AttributeType": "S"},
                    {"AttributeName": ev.STATUS, "AttributeType": "S"},
                    {"AttributeName": ev.SORT_KEY, "AttributeType": "N"},
                ],
                KeySchema=[{"AttributeName": ev.ID, "KeyType": "HASH"}],
                GlobalSecondaryIndexes=[
                    {
                        "IndexName": self.index,
                        "KeySchema": [
                            {"AttributeName": ev.STATUS, "KeyType": "HASH"},
                            {"AttributeName": ev.SORT_KEY, "KeyType": "RANGE"},
                        ],
                        "Projection": {"ProjectionType": "ALL"},
                    }
                ],
            )
        except ClientError as exc:
            if _code(exc) == "ResourceInUseException":
                return False
            raise self._error("create table", exc) from exc
        if wait:
            self.client.get_waiter("table_exists").wait(
                TableName=self.table, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
            )
        self._enable_ttl()
        logger.info("Created outbox table %r with index %r", self.table, self.index)
        return True

    def _enable_ttl(self) -> None:
        try:
            self.client.update_time_to_live(
                TableName=self.table,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": ev.EXPIRES_AT},
            )
        except ClientError as exc:
            # Enabling twice is refused; anything else is a real problem.
            if "already enabled" not in str(exc).lower():
                raise self._error("enable TTL", exc) from exc

    def verify_table(self) -> list[str]:
        """Check the table and index layout; raise :class:`TableError` if wrong.

        Returns warnings that do not stop the outbox (TTL off, say).
        """
        try:
            table = self.client.describe_table(TableName=self.table)["Table"]
        except ClientError as exc:
            if _code(exc) == "ResourceNotFoundException":
                raise TableError(
                    self.table,
                    f"table {self.table!r} does not exist; create it with "
                    "`celery -A proj outbox create-table` or OutboxStore.create_table()",
                ) from exc
            raise self._error("describe table", exc) from exc
        types = {a["AttributeName"]: a["AttributeType"] for a in table["AttributeDefinitions"]}
        keys = {k["KeyType"]: k["AttributeName"] for k in table["KeySchema"]}
        if keys.get("HASH") != ev.ID or "RANGE" in keys or types.get(ev.ID) != "S":
            raise TableError(
                self.table,
                f"table {self.table!r} must have the partition key 'id' (S) and no "
                f"sort key; it has {keys} with types {types}",
            )
        indexes = {i["IndexName"]: i for i in table.get("GlobalSecondaryIndexes", [])}
        index = indexes.get(self.index)
        if index is None:
            raise TableError(
                self.table,
                f"table {self.table!r} has no index {self.index!r} (it has "
                f"{sorted(indexes) or 'none'}); set status_index_name to the index "
                "on status/gsiSortKey, or add that index",
            )
        ikeys = {k["KeyType"]: k["AttributeName"] for k in index["KeySchema"]}
        if (
            ikeys.get("HASH") != ev.STATUS
            or ikeys.get("RANGE") != ev.SORT_KEY
            or types.get(ev.STATUS) != "S"
            or types.get(ev.SORT_KEY) != "N"
        ):
            raise TableError(
                self.table,
                f"index {self.index!r} must be keyed on 'status' (S) and "
                f"'gsiSortKey' (N); it has {ikeys} with types {types}",
            )
        if index.get("Projection", {}).get("ProjectionType") != "ALL":
            raise TableError(
                self.table,
                f"index {self.index!r} must project ALL attributes so a drain "
                "can read events from it",
            )
        warnings = []
        if index.get("IndexStatus", "ACTIVE") != "ACTIVE":
            warnings.append(
                f"index {self.index!r} is {index['IndexStatus']}; events will not "
                "move until it is ACTIVE"
            )
        if self.config.completion is Completion.KEEP:
            try:
                ttl = self.client.describe_time_to_live(TableName=self.table)
                spec = ttl.get("TimeToLiveDescription", {})
                if spec.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING") or (
                    spec.get("AttributeName") != ev.EXPIRES_AT
                ):
                    warnings.append(
                        f"TTL is not enabled on {ev.EXPIRES_AT!r}; kept completed "
                        "events will never expire"
                    )
            except ClientError:
                warnings.append("could not read the table's TTL settings")
        return warnings

    def delete_table(self) -> None:
        """Delete the table (tests and demos)."""
        try:
            self.client.delete_table(TableName=self.table)
        except ClientError as exc:
            if _code(exc) != "ResourceNotFoundException":
                raise self._error("delete table", exc) from exc

    # -- low level ----------------------------------------------------------

    def _update(
        self,
        event_id: str,
        update: str,
        condition: str,
        values: dict[str, Any],
        *,
        returns: str = "NONE",
    ) -> dict[str, Any] | None:
        """A conditional ``UpdateItem``; None when the condition failed."""
        try:
            response = self.client.update_item(
                TableName=self.table,
                Key={ev.ID: {"S": event_id}},
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeNames=_exprs(update, condition),
                ExpressionAttributeValues=values,
                ReturnValues=returns,
            )
        except ClientError as exc:
            if _code(exc) == CCF:
                return None
            raise self._error("update", exc) from exc
        attributes: dict[str, Any] = response.get("Attributes") or {}
        return attributes

    def _query(
        self,
        key_condition: str,
        values: dict[str, Any],
        *,
        limit: int | None = None,
        start: dict[str, Any] | None = None,
        projection: str | None = None,
        select: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        request: dict[str, Any] = {
            "TableName": self.table,
            "IndexName": self.index,
            "KeyConditionExpression": key_condition,
            "ExpressionAttributeValues": values,
            **kwargs,
        }
        expressions = [key_condition, kwargs.get("FilterExpression", "")]
        if projection:
            request["ProjectionExpression"] = projection
            expressions.append(projection)
        request["ExpressionAttributeNames"] = _exprs(*expressions)
        if limit is not None:
            request["Limit"] = limit
        if start:
            request["ExclusiveStartKey"] = start
        if select:
            request["Select"] = select
        try:
            response: dict[str, Any] = self.client.query(**request)
        except ClientError as exc:
            raise self._error("query", exc) from exc
        return response

    def _query_pages(
        self,
        status: str,
        key_condition: str,
        values: dict[str, Any],
        *,
        limit: int | None,
        max_pages: int | None,
        projection: str | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        start: dict[str, Any] | None = None
        pages = wanted = 0
        while limit is None or wanted < limit:
            response = self._query(
                key_condition,
                values,
                limit=None if limit is None else limit - wanted,
                start=start,
                projection=projection,
            )
            items = response.get("Items", [])
            wanted += len(items)
            pages += 1
            yield items
            start = response.get("LastEvaluatedKey")
            if start is None or (max_pages is not None and pages >= max_pages):
                return

    def _count(self, key_condition: str, values: dict[str, Any]) -> int:
        total = 0
        start: dict[str, Any] | None = None
        while True:
            response = self._query(key_condition, values, start=start, select="COUNT")
            total += int(response.get("Count", 0))
            start = response.get("LastEvaluatedKey")
            if start is None:
                return total

    @staticmethod
    def _encode_cursor(key: dict[str, Any]) -> str:
        raw = json.dumps(key, separators=(",", ":"), sort_keys=True).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @staticmethod
    def _decode_cursor(cursor: str | None) -> dict[str, Any] | None:
        if cursor is None:
            return None
        try:
            padded = cursor + "=" * (-len(cursor) % 4)
            key = json.loads(base64.urlsafe_b64decode(padded.encode()))
            if not isinstance(key, dict) or ev.ID not in key:
                raise ValueError("not a key")
            return key
        except (ValueError, TypeError):
            raise EventError(f"cursor {cursor!r} is not one this outbox returned") from None

    def _error(self, what: str, exc: ClientError | BotoCoreError) -> OutboxError:
        if isinstance(exc, ClientError):
            code = _code(exc)
            if code == "ResourceNotFoundException":
                return TableError(
                    self.table,
                    f"{what} failed: table {self.table!r} or index {self.index!r} "
                    "does not exist (run `celery -A proj outbox check`)",
                )
            message = exc.response.get("Error", {}).get("Message", str(exc))
            return StoreError(f"DynamoDB {what} on {self.table!r} failed: {code}: {message}", code)
        return StoreError(f"DynamoDB {what} on {self.table!r} failed: {exc}")
