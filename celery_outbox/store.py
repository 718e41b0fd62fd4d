"""The DynamoDB store: every conditional write of the event lifecycle.

::

    emit ──> created ──claim──> active ──complete──> completed (or deleted)
               ^                  │  └──fail, retries left──> created (due later)
               │                  │  └──fail, none left─────> failed
               │                  └──lease expired──> reclaimed (an attempt
               │                                        if its handler started)
               └───────────── retry (operator) <──── failed

Each transition after emit is an ``UpdateItem`` or ``DeleteItem`` whose
condition names the state it expects: the status and, for an ``active``
event, the lease token. A write whose condition fails lost a race or came
from a stale lease; it changes nothing and is reported, never raised.

:class:`OutboxStore` gathers the parts: the lifecycle here, emits in
:mod:`celery_outbox.emit`, table set-up in :mod:`celery_outbox.table`,
operator calls in :mod:`celery_outbox.inspection`, and low-level access in
:mod:`celery_outbox.dynamo`.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from celery.utils.log import get_logger

from celery_outbox import event as ev
from celery_outbox.config import Completion
from celery_outbox.dynamo import (
    CONDITION_FAILED,
    Clock,
    error_code,
    make_client,
    placeholders,
    wall_clock_ms,
)
from celery_outbox.emit import Emits
from celery_outbox.errors import ArgumentError
from celery_outbox.event import Event, Lease, Status
from celery_outbox.inspection import FailedPage, Inspection, RetryReport, Stats
from celery_outbox.table import TableSetup

__all__ = [
    "ClaimResult",
    "Clock",
    "FailedPage",
    "OutboxStore",
    "Outcome",
    "RetryReport",
    "Stats",
    "make_client",
    "wall_clock_ms",
]

logger = get_logger(__name__)


class Outcome(StrEnum):
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


def _check_lease(lease: Any) -> Lease:
    if not isinstance(lease, Lease):
        raise ArgumentError(
            "lease", f"expected the Lease a claim returned, got {type(lease).__name__}"
        )
    return lease


class OutboxStore(Emits, TableSetup, Inspection):
    """Outbox events in one DynamoDB table, moved through their lifecycle.

    Args:
        config: the table and lifecycle settings.
        client: a boto3 DynamoDB client; one is made from ``config`` if None.
        clock: milliseconds since the epoch; tests and drills shift it.
        rng: the source of backoff jitter.
    """

    def __repr__(self) -> str:
        return f"<OutboxStore table={self.table!r} index={self.index!r}>"

    # -- claim --------------------------------------------------------------

    def due(self, status: Status, limit: int, now: int) -> list[dict[str, Any]]:
        """Items of ``status`` whose sort key is at most ``now``, oldest first.

        Reads at most ``config.max_query_pages`` pages of the status index.
        The index is eventually consistent: every item is a candidate only,
        confirmed by a conditional write before it is used.
        """
        if limit <= 0:
            return []
        items: list[dict[str, Any]] = []
        for value in self.keys.partitions(status):  # one per shard (shards.py)
            for page in self._query_pages(
                "#status = :s AND #sk <= :now",
                {":s": {"S": value}, ":now": {"N": str(now)}},
                limit=limit - len(items),
                max_pages=self.config.max_query_pages,
            ):
                items.extend(page)
            if len(items) >= limit:
                break
        return items[:limit]

    def claim(self, limit: int | None = None) -> ClaimResult:
        """Lease up to ``limit`` due events (default ``config.batch_size``).

        Expired leases are looked at first, so a backlog of new events never
        starves a lost worker's event. Each candidate is confirmed by a
        conditional write: the index is eventually consistent, and other
        drains race for the same events. A lost race counts as skipped.
        """
        if limit is None:
            limit = self.config.batch_size
        elif isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ArgumentError("limit", f"expected a positive integer, got {limit!r}")
        now = self.clock()
        expired = self.due(Status.ACTIVE, limit, now)
        fresh = self.due(Status.CREATED, limit - len(expired), now)
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
            lease = self._lease(
                item[ev.ID]["S"],
                now,
                "#status = :created AND #sk <= :now",
                {":created": self.status_value(Status.CREATED, item[ev.ID]["S"])},
            )
            if lease is None:
                skipped += 1
            else:
                leases.append(lease)
        return ClaimResult(leases, skipped, exhausted)

    def _reclaim(self, item: dict[str, Any], now: int) -> Lease | Outcome | None:
        """Take over an expired lease; a lost attempt counts as a failure.

        The attempt was lost only if its handler started (see :meth:`begin`);
        a lease whose message was lost or delayed in the broker is sent
        again without using up a retry (:meth:`_redispatch`), or else a
        broker backlog longer than the processing timeout would fail events
        that never ran. The condition names the lease token, retry count and
        start the query saw, so what is written never rests on a stale
        index entry.
        """
        event_id = item[ev.ID]["S"]
        seen_retries = item.get(ev.RETRY_COUNT, {}).get("N")
        seen_token = item.get(ev.LEASE_TOKEN, {}).get("S")
        # The TypeScript adapter marks an event active as its handler starts.
        started = ev.RUNNING_SINCE in item or not seen_token
        values: dict[str, Any] = {":active": self.status_value(Status.ACTIVE, event_id)}
        conditions = ["#status = :active", "#sk <= :now"]
        if seen_token:
            conditions.append("#token = :seen")
            conditions.append(
                "attribute_exists(#running)"
                if started
                else "attribute_not_exists(#running)"
            )
            values[":seen"] = {"S": seen_token}
        else:  # an event claimed by the TypeScript adapter has no token
            conditions.append("attribute_not_exists(#token)")
        if seen_retries is None:
            conditions.append("attribute_not_exists(#retry)")
        else:
            conditions.append("#retry = :seen_retry")
            values[":seen_retry"] = {"N": seen_retries}
        condition = " AND ".join(conditions)
        if seen_token and not started:
            return self._redispatch(event_id, seen_token, now, condition, values)
        retries = int(seen_retries or 0) + 1
        lost = (
            f"LeaseExpired: attempt {retries} did not report back within "
            f"{self.config.processing_timeout_ms} ms; its worker was probably lost"
        )
        values[":retry"] = {"N": str(retries)}
        values[":err"] = {"S": self.short_error(lost)}
        if retries <= self.config.max_retries:
            lease = self._lease(
                event_id,
                now,
                condition,
                values,
                extra_set=", #retry = :retry, #error = :err",
            )
            if lease is not None:
                logger.warning(
                    "Reclaimed event %r: its lease expired, so attempt %d counts "
                    "as failed; running it again",
                    event_id,
                    retries,
                )
            return lease
        done = self._update(
            event_id,
            "SET #status = :failed, #sk = :now, #retry = :retry, #error = :err "
            "REMOVE #token",
            condition,
            {**values, ":failed": {"S": Status.FAILED.value}, ":now": {"N": str(now)}},
        )
        if done is None:
            return None
        logger.warning(
            "Event %r (%s) failed: the lease of its last attempt (%d) expired",
            event_id,
            item.get(ev.TYPE, {}).get("S"),
            retries,
        )
        return Outcome.FAILED

    def _redispatch(
        self,
        event_id: str,
        token: str,
        now: int,
        condition: str,
        values: dict[str, Any],
    ) -> Lease | None:
        """Extend a lease whose handler never started, keeping its token.

        Its message was lost or is still waiting in the broker. The lease is
        sent again with a new deadline; whichever copy reaches a worker first
        starts the attempt (:meth:`begin`) and the others are skipped, so a
        backlog longer than the processing timeout delays events instead of
        starving them, and costs no retry.
        """
        deadline = now + self.config.processing_timeout_ms
        item = self._update(
            event_id,
            "SET #sk = :deadline, #started = :now",
            condition,
            {**values, ":deadline": {"N": str(deadline)}, ":now": {"N": str(now)}},
            returns="ALL_NEW",
        )
        if item is None:
            return None
        logger.warning(
            "Dispatching event %r again: its lease expired before its handler "
            "started (the message was lost or is still waiting in the broker)",
            event_id,
        )
        return Lease(Event.from_item(item), token, deadline, now, resent=True)

    def _lease(
        self,
        event_id: str,
        now: int,
        condition: str,
        values: dict[str, Any],
        *,
        extra_set: str = "",
    ) -> Lease | None:
        token = uuid.uuid4().hex
        deadline = now + self.config.processing_timeout_ms
        item = self._update(
            event_id,
            "SET #status = :lease, #sk = :deadline, #token = :token, "
            "#started = :now" + extra_set + " REMOVE #running, #copy",
            condition,
            {
                **values,
                ":lease": self.status_value(Status.ACTIVE, event_id),
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

    def begin(self, lease: Lease) -> Lease | None:
        """Mark that ``lease``'s handler starts now; None if it must not run.

        The deadline restarts from now, so the handler has the whole
        processing timeout however long its message waited, and from here a
        reclaim counts the attempt as failed. None means the lease is no
        longer live (the event was reclaimed or written back while the
        message waited) or another copy of its message already started it:
        nothing was written, and running the handler could run the event
        twice. A lease that names its delivery (``copy``) may write its mark
        again, so a resend after a lost reply still starts it.
        """
        lease = _check_lease(lease)
        now = self.clock()
        deadline = now + self.config.processing_timeout_ms
        values = {
            ":active": self.status_value(Status.ACTIVE, lease.event.id),
            ":token": {"S": lease.token},
            ":deadline": {"N": str(deadline)},
            ":now": {"N": str(now)},
        }
        update = "SET #sk = :deadline, #running = :now"
        unstarted = "attribute_not_exists(#running)"
        if lease.copy is not None:
            update += ", #copy = :copy"
            values[":copy"] = {"S": lease.copy}
            # A resend of this very write (its reply was lost) finds its own
            # mark: the handler has not run yet and must not be skipped.
            unstarted = f"({unstarted} OR #copy = :copy)"
        done = self._update(
            lease.event.id,
            update,
            f"#status = :active AND #token = :token AND {unstarted}",
            values,
        )
        if done is None:
            return None
        return dataclasses.replace(lease, deadline_ms=deadline)

    def complete(self, lease: Lease) -> Outcome:
        """Record that ``lease``'s attempt succeeded.

        Deletes the event, or keeps it as ``completed`` with a TTL, by
        ``config.completion``. A stale lease changes nothing.
        """
        lease = _check_lease(lease)
        condition = "#status = :active AND #token = :token"
        values = {
            ":active": self.status_value(Status.ACTIVE, lease.event.id),
            ":token": {"S": lease.token},
        }
        if self.config.completion is Completion.DELETE:
            try:
                self.client.delete_item(
                    TableName=self.table,
                    Key={ev.ID: {"S": lease.event.id}},
                    ConditionExpression=condition,
                    ExpressionAttributeNames=placeholders(condition),
                    ExpressionAttributeValues=values,
                )
            except ClientError as exc:
                if error_code(exc) != CONDITION_FAILED:
                    raise self._error("complete", exc) from exc
                return self._stale(lease, "complete")
            except BotoCoreError as exc:
                raise self._error("complete", exc) from exc
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
        own_start: bool = False,
        unstarted: bool = True,
    ) -> Outcome:
        """Record that ``lease``'s attempt failed with ``error``.

        The event is due again after ``delay_ms`` (default: the backoff), or
        ``failed`` when its retries are spent or ``final`` is set; a failed
        event stays in the index, sorted by failure time. A stale lease
        changes nothing. With ``own_start``, neither does a lease whose
        handler another delivery of its message started (``runningBy`` is
        not ``lease.copy``): that delivery's run is not this failure's. With
        ``unstarted=False`` too, a lease with no start mark is left alone as
        well: its handler never ran, so the attempt must not count, and the
        lease's expiry sends the event again.
        """
        lease = _check_lease(lease)
        if delay_ms is not None and (
            isinstance(delay_ms, bool) or not isinstance(delay_ms, int) or delay_ms < 0
        ):
            raise ArgumentError(
                "delay_ms", f"expected a whole number >= 0, got {delay_ms!r}"
            )
        retries = lease.retry_count + 1
        now = self.clock()
        final = bool(final) or retries > self.config.max_retries
        if final:
            status, sort_key = Status.FAILED, now
        else:
            delay = self.backoff_ms(retries) if delay_ms is None else delay_ms
            status, sort_key = Status.CREATED, now + delay
        condition = "#status = :active AND #token = :token"
        values = {
            ":active": self.status_value(Status.ACTIVE, lease.event.id),
            ":token": {"S": lease.token},
            ":status": self.status_value(status, lease.event.id),
            ":sk": {"N": str(sort_key)},
            ":retry": {"N": str(retries)},
            ":err": {"S": self.short_error(error)},
        }
        if own_start:
            own = "#copy = :copy"
            if unstarted:
                own = f"(attribute_not_exists(#running) OR {own})"
            condition += f" AND {own}"
            values[":copy"] = {"S": lease.copy or ""}
        done = self._update(
            lease.event.id,
            "SET #status = :status, #sk = :sk, #retry = :retry, #error = :err "
            "REMOVE #token",
            condition,
            values,
        )
        if done is None:
            return self._stale(lease, "fail")
        return Outcome.FAILED if final else Outcome.RETRYING

    def release(self, lease: Lease) -> Outcome:
        """Give a lease back unused (its dispatch failed): due now, no attempt.

        Returns ``RETRYING`` when released, ``STALE`` when the lease had
        already gone.
        """
        lease = _check_lease(lease)
        done = self._update(
            lease.event.id,
            "SET #status = :created, #sk = :now REMOVE #token",
            "#status = :active AND #token = :token",
            {
                ":active": self.status_value(Status.ACTIVE, lease.event.id),
                ":token": {"S": lease.token},
                ":created": self.status_value(Status.CREATED, lease.event.id),
                ":now": {"N": str(self.clock())},
            },
        )
        return Outcome.RETRYING if done is not None else self._stale(lease, "release")

    def backoff_ms(self, retries: int) -> int:
        """The delay before retry number ``retries`` (1 for the first).

        Exponential from ``base_backoff_ms`` (doubled for each retry),
        capped at ``max_backoff_ms``, with "equal jitter": a uniform draw
        from the upper half of that delay. It spreads retries of events that
        failed together, never drops below half the delay (so never to zero,
        and at least 1 ms) and never exceeds the cap.
        """
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 1:
            raise ArgumentError("retries", f"counts from 1, got {retries!r}")
        base, cap = self.config.base_backoff_ms, self.config.max_backoff_ms
        delay: int = min(cap, base * 2 ** min(retries - 1, 62))
        half = delay / 2
        return max(1, min(cap, round(half + self._rng.uniform(0, half))))

    def _stale(self, lease: Lease, what: str) -> Outcome:
        logger.info(
            "Ignored %s of event %r: lease %s is no longer live (reclaimed or "
            "already written back)",
            what,
            lease.event.id,
            lease.token,
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
