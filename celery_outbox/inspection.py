"""Inspection and operator calls: failed events, retries, counts, purges.

Failed events keep their place in the status index (sort key = failure
time), so they are listed newest first straight from it, a page at a time.
A retry moves a failed event back to ``created``, due now, with its retry
count reset, through a write conditional on it still being ``failed``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from celery.utils.log import get_logger

from celery_outbox import event as ev
from celery_outbox.dynamo import DynamoTable
from celery_outbox.errors import (
    ArgumentError,
    EventNotFoundError,
    EventStatusError,
    TransactionCancelledError,
    UnprocessedItemsError,
)
from celery_outbox.event import FailedEvent, Status
from celery_outbox.shards import StatusKeys

__all__ = ["FailedPage", "Inspection", "RetryReport", "Stats"]

logger = get_logger(__name__)

BATCH_WRITE_LIMIT = 25
TRANSACTION_LIMIT = 100


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
    """Counts per status, how many are due, and the oldest due event's age.

    ``expired`` counts ``active`` events whose lease has run out: their
    workers were lost, and the next drain reclaims them.

    Each figure is a query of its own, not one snapshot: an event that moves
    between statuses while they run (a failed attempt goes from ``active``
    back to ``created``) may be counted twice or not at all. To learn that
    nothing is pending, read the events themselves.
    """

    counts: dict[str, int]
    due: int
    oldest_due_age_ms: int | None
    expired: int = 0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "counts": self.counts,
            "due": self.due,
            "oldest_due_age_ms": self.oldest_due_age_ms,
            "expired": self.expired,
        }


def _whole(argument: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(
            argument, f"expected a whole number of at least {minimum}, got {value!r}"
        )
    if maximum is not None and value > maximum:
        raise ArgumentError(
            argument,
            f"expected a whole number from {minimum} to {maximum}, got {value}",
        )
    return value


MAX_PAGE = 1000
"""The largest page of failed events (``failed``'s ``limit``), as in the CLI."""


def encode_cursor(key: dict[str, Any]) -> str:
    """An opaque, URL-safe cursor for an index position."""
    raw = json.dumps(key, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> dict[str, Any] | None:
    """The index position of a cursor from :func:`encode_cursor`."""
    if cursor is None:
        return None
    problem = ArgumentError("cursor", f"{cursor!r} is not a cursor this outbox gave")
    if not isinstance(cursor, str):
        raise problem
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        key = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, binascii.Error):
        raise problem from None
    shape = {ev.ID: "S", ev.STATUS: "S", ev.SORT_KEY: "N"}
    if not (
        isinstance(key, dict)
        and set(key) == set(shape)
        and all(
            isinstance(key[n], dict) and isinstance(key[n].get(t), str)
            for n, t in shape.items()
        )
        and key[ev.STATUS]["S"] == Status.FAILED.value
    ):
        raise problem
    return key


class Inspection(DynamoTable):
    """What operators ask of the outbox, from Flower or the command line."""

    def status_of(self, event_id: str) -> Status | None:
        """The status of ``event_id``, or None when it is not stored."""
        item = self.get_item(event_id)
        return None if item is None else StatusKeys.status(item[ev.STATUS]["S"])

    def failed(
        self,
        *,
        limit: int = 100,
        cursor: str | None = None,
        type: str | None = None,
    ) -> FailedPage:
        """Failed events, newest failure first, ``limit`` at a time.

        Pass the returned ``cursor`` to get the next page; it is None after
        the last one. ``type`` keeps only events of that type. ``limit`` is
        1 to :data:`MAX_PAGE` (1000).
        """
        limit = _whole("limit", limit, 1, MAX_PAGE)
        if type is not None and (not isinstance(type, str) or not type):
            raise ArgumentError("type", f"expected an event type, got {type!r}")
        last = decode_cursor(cursor)
        values: dict[str, Any] = {":s": {"S": Status.FAILED.value}}
        kwargs: dict[str, Any] = {"ScanIndexForward": False}
        if type is not None:
            kwargs["FilterExpression"] = "#type = :type"
            values[":type"] = {"S": type}
        found: list[dict[str, Any]] = []
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
                    return FailedPage(_failed(found), encode_cursor(key))
            last = response.get("LastEvaluatedKey")
            if last is None:
                return FailedPage(_failed(found), None)

    def iter_failed(self, *, type: str | None = None) -> Iterator[FailedEvent]:
        """Every failed event, newest first, page by page."""
        cursor: str | None = None
        while True:
            page = self.failed(limit=100, cursor=cursor, type=type)
            yield from page.events
            cursor = page.cursor
            if cursor is None:
                return

    def retry(self, event_ids: Iterable[str], *, strict: bool = False) -> RetryReport:
        """Move failed events back to ``created``, due now, with no retries used.

        Returns which ids were retried, which are not stored and which are
        not ``failed`` (those are left untouched). With ``strict``, all of at
        most 100 ids are retried in one transaction or none is.

        Raises:
            ArgumentError: an id is not a valid event id.
            EventNotFoundError: (strict) an id is not stored.
            EventStatusError: (strict) an event is not ``failed``.
        """
        ids = list(dict.fromkeys(ev.check_event_ids(event_ids)))
        if strict:
            return self._retry_all(ids)
        report = RetryReport()
        for event_id in ids:
            if self._update(event_id, *self._retry_write(event_id)) is not None:
                report.retried.append(event_id)
            elif self.get_item(event_id) is None:
                report.missing.append(event_id)
            else:
                report.not_failed.append(event_id)
        if report.retried:
            logger.info("Retried %d failed events", len(report.retried))
        return report

    def _retry_write(self, event_id: str) -> tuple[str, str, dict[str, Any]]:
        return (
            "SET #status = :created, #sk = :now, #retry = :zero, "
            "#operator = if_not_exists(#operator, :zero) + :one "
            "REMOVE #error, #token",
            "#status = :failed",
            {
                ":created": self.status_value(Status.CREATED, event_id),
                ":failed": {"S": Status.FAILED.value},
                ":now": {"N": str(self.clock())},
                ":zero": {"N": "0"},
                ":one": {"N": "1"},
            },
        )

    def _retry_all(self, ids: list[str]) -> RetryReport:
        if len(ids) > TRANSACTION_LIMIT:
            raise ArgumentError(
                "event_ids",
                f"a strict retry takes at most {TRANSACTION_LIMIT} ids (one "
                f"transaction), got {len(ids)}",
            )
        if not ids:
            return RetryReport()
        reasons = self._transact(
            [self._update_action(i, *self._retry_write(i)) for i in ids]
        )
        if reasons is None:
            logger.info("Retried %d failed events", len(ids))
            return RetryReport(retried=ids)
        refused = [i for i, r in zip(ids, reasons, strict=False) if r != "None"]
        if any(r != "ConditionalCheckFailed" for r in reasons if r != "None"):
            raise TransactionCancelledError(
                f"the retry of {len(ids)} events was cancelled ({reasons}); "
                "nothing was changed, try again",
                reasons,
            )
        items = {i: self.get_item(i) for i in refused}
        missing = [i for i, item in items.items() if item is None]
        if missing:
            raise EventNotFoundError(missing)
        raise EventStatusError(
            {i: item[ev.STATUS]["S"] for i, item in items.items() if item},
            Status.FAILED.value,
        )

    def retry_failed(self, *, type: str | None = None) -> RetryReport:
        """Retry every failed event (of ``type``, if given)."""
        ids = [f.event.id for f in self.iter_failed(type=type)]
        return self.retry(ids)

    def stats(self) -> Stats:
        """Counts per status, the due count and the oldest due event's age."""
        now = self.clock()
        # With shards (shards.py) a status spans several index partitions.
        counts = {
            s.value: sum(
                self._count("#status = :s", {":s": {"S": value}})
                for value in self.keys.partitions(s, 0)
            )
            for s in Status
        }
        due = expired = 0
        oldest: list[int] = []
        for value in self.keys.partitions(Status.CREATED, 0):
            due_values = {":s": {"S": value}, ":now": {"N": str(now)}}
            due += self._count("#status = :s AND #sk <= :now", due_values)
            first = self._query("#status = :s AND #sk <= :now", due_values, limit=1)
            oldest += [int(i[ev.SORT_KEY]["N"]) for i in first.get("Items", [])]
        for value in self.keys.partitions(Status.ACTIVE, 0):
            expired += self._count(
                "#status = :s AND #sk <= :now",
                {":s": {"S": value}, ":now": {"N": str(now)}},
            )
        age = now - min(oldest) if oldest else None
        return Stats(counts, due, age, expired)

    def purge_completed(self, older_than_ms: int) -> int:
        """Delete kept ``completed`` events that completed ``older_than_ms`` ago.

        ``completed`` is terminal: nothing moves an event out of it, so the
        deletes need no condition and go out as ``BatchWriteItem``.
        """
        older_than_ms = _whole("older_than_ms", older_than_ms, 0)
        cutoff = self.clock() - older_than_ms
        if cutoff < 0:
            return 0  # nothing completed before the epoch
        purged = 0
        values = {":s": {"S": Status.COMPLETED.value}, ":cut": {"N": str(cutoff)}}
        for page in self._query_pages(
            "#status = :s AND #sk <= :cut",
            values,
            limit=None,
            max_pages=None,
            projection="#id",
        ):
            ids = [i[ev.ID]["S"] for i in page]
            self.batch_delete(ids)
            purged += len(ids)
        if purged:
            logger.info(
                "Purged %d completed events older than %d ms", purged, older_than_ms
            )
        return purged

    def batch_delete(self, event_ids: Sequence[str], attempts: int = 8) -> None:
        """Delete events, 25 a request, resending what DynamoDB leaves unprocessed.

        botocore retries a throttled request, but a ``BatchWriteItem`` that
        succeeds with some items unprocessed is ours to resend; it backs off
        between resends and gives up after ``attempts``.

        Raises:
            UnprocessedItemsError: items still unprocessed after ``attempts``.
        """
        ids = list(dict.fromkeys(ev.check_event_ids(event_ids)))
        attempts = _whole("attempts", attempts, 1)
        for start in range(0, len(ids), BATCH_WRITE_LIMIT):
            self._delete_chunk(ids[start : start + BATCH_WRITE_LIMIT], attempts)

    def _delete_chunk(self, ids: list[str], attempts: int) -> None:
        requests = {
            self.table: [{"DeleteRequest": {"Key": {ev.ID: {"S": i}}}} for i in ids]
        }
        for attempt in range(attempts):
            if attempt:
                # Unprocessed items mean throttling: wait before resending.
                delay = min(1.0, 0.05 * 2**attempt)
                self._sleep(delay * self._rng.uniform(0.5, 1))
            try:
                response = self.client.batch_write_item(RequestItems=requests)
            except (ClientError, BotoCoreError) as exc:
                raise self._error("batch write", exc) from exc
            requests = response.get("UnprocessedItems") or {}
            if not requests:
                return
        left = [r["DeleteRequest"]["Key"][ev.ID]["S"] for r in requests[self.table]]
        raise UnprocessedItemsError(left)


def _failed(items: list[dict[str, Any]]) -> list[FailedEvent]:
    return [FailedEvent.from_item(i) for i in items]
