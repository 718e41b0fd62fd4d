"""Claims, completions and inserts in conditional PartiQL batches.

The same transitions as :class:`~celery_outbox.store.OutboxStore` makes item
by item, with the same conditions, sent up to 25 in one request
(:mod:`celery_outbox.partiql`). Used when ``write_mode = "partiql"``.

A claim confirms exactly the item the index returned: its status, that it
is due, its ``retryCount`` and ``operatorRetries`` and, for an expired
lease, the token seen. The
lease handed out is built from that item, so a stale index read can only
make a claim fail, never hand out a lease on different data.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError
from celery.utils.log import get_logger

from celery_outbox import event as ev
from celery_outbox import partiql
from celery_outbox.config import Completion
from celery_outbox.errors import StoreError
from celery_outbox.event import Event, Lease, Status
from celery_outbox.partiql import Statement, quote
from celery_outbox.store import ClaimResult, OutboxStore, Outcome

__all__ = ["BatchStore", "InsertReport"]

logger = get_logger(__name__)

_S, _N = "S", "N"
ID, STATUS, SK = quote(ev.ID), quote(ev.STATUS), quote(ev.SORT_KEY)
TOKEN, RETRY = quote(ev.LEASE_TOKEN), quote(ev.RETRY_COUNT)
STARTED, ERROR = quote(ev.STARTED_ON), quote(ev.LAST_ERROR)
RUNNING = quote(ev.RUNNING_SINCE)
RUNNING_BY = quote(ev.RUNNING_BY)
OPERATOR = quote(ev.OPERATOR_RETRIES)


def _s(value: str) -> dict[str, Any]:
    return {_S: value}


def _n(value: int) -> dict[str, Any]:
    return {_N: str(value)}


@dataclass(frozen=True)
class InsertReport:
    """What a non-atomic insert wrote, and which ids were already stored."""

    written: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)


class BatchStore:
    """An outbox store's lifecycle writes, batched as PartiQL statements.

    Args:
        store: the item store whose table, settings, clock and client this
            uses; its reads (queries) are shared.
    """

    def __init__(self, store: OutboxStore) -> None:
        self.store = store
        self.config = store.config
        self.keys = store.keys
        self.table = quote(store.table)
        self._expired_checked_ms = 0

    def __repr__(self) -> str:
        return f"<BatchStore table={self.store.table!r} shards={self.keys.shards}>"

    def _execute(self, statements: Sequence[Statement]) -> list[str]:
        return partiql.execute(self.store.client, statements, table=self.store.table)

    # -- reads ----------------------------------------------------------------

    def due(self, status: Status, limit: int, now: int) -> list[dict[str, Any]]:
        """Up to ``limit`` items of ``status`` due by ``now``, over every shard.

        Shards are read in turn from a rotating first one, until the batch
        is full: a full shard never keeps the others waiting for long.
        """
        items: list[dict[str, Any]] = []
        for value in self.keys.partitions(status):
            items.extend(self._due_in(value, limit - len(items), now))
            if len(items) >= limit:
                break
        return items[:limit]

    def _due_in(self, value: str, limit: int, now: int) -> list[dict[str, Any]]:
        request: dict[str, Any] = {
            "TableName": self.store.table,
            "IndexName": self.store.index,
            "KeyConditionExpression": "#status = :s AND #sk <= :now",
            "ExpressionAttributeNames": {"#status": ev.STATUS, "#sk": ev.SORT_KEY},
            "ExpressionAttributeValues": {":s": _s(value), ":now": _n(now)},
        }
        items: list[dict[str, Any]] = []
        for _page in range(self.config.max_query_pages):
            request["Limit"] = limit - len(items)
            try:
                response = self.store.client.query(**request)
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                raise StoreError(
                    f"DynamoDB query on {self.store.table!r} failed: {code}", code
                ) from exc
            items.extend(response.get("Items", []))
            start = response.get("LastEvaluatedKey")
            if start is None or len(items) >= limit:
                break
            request["ExclusiveStartKey"] = start
        return items

    # -- claim ----------------------------------------------------------------

    def claim(self, limit: int | None = None) -> ClaimResult:
        """Lease up to ``limit`` due events in as few requests as it can.

        Expired leases come first when found, but are looked for at most
        once per :meth:`expired_check_ms` in a process: a lease lasts
        ``processing_timeout_ms``, far longer than a drain.
        """
        limit = self.config.batch_size if limit is None else limit
        now = self.store.clock()
        expired: list[dict[str, Any]] = []
        if now - self._expired_checked_ms >= self.expired_check_ms:
            self._expired_checked_ms = now
            expired = self.due(Status.ACTIVE, limit, now)
        fresh = (
            self.due(Status.CREATED, limit - len(expired), now)
            if (len(expired) < limit)
            else []
        )
        return self.claim_items(fresh, expired=expired, now=now)

    def claim_items(
        self,
        items: Sequence[dict[str, Any]],
        *,
        expired: Sequence[dict[str, Any]] = (),
        now: int | None = None,
    ) -> ClaimResult:
        """Lease the due ``items`` and reclaim the ``expired`` ones, as read.

        Each claim's condition names the state the item was read in, so an
        item that moved on since (claimed, failed, retried, deleted) is
        skipped. Used by drains with what the index returned, and by nudged
        drains with the events an emit just wrote.
        """
        now = self.store.clock() if now is None else now
        deadline = now + self.config.processing_timeout_ms
        planned: list[tuple[Statement, dict[str, Any], str, str]] = []
        seen: set[str] = set()
        candidates = [(i, True) for i in expired] + [(i, False) for i in items]
        for item, is_expired in candidates:
            event_id = item[ev.ID][_S]
            if event_id in seen:
                continue
            seen.add(event_id)
            token = uuid.uuid4().hex
            if is_expired:
                planned.append(self._reclaim(item, now, deadline, token))
            else:
                statement = self._claim(item, now, deadline, token)
                planned.append((statement, item, token, "claim"))
        results = self._execute([p[0] for p in planned]) if planned else []
        leases: list[Lease] = []
        skipped = exhausted = 0
        for (_, item, token, kind), result in zip(planned, results, strict=True):
            if result != partiql.OK:
                skipped += 1
                continue
            self._log_won(kind, item)
            if kind == "fail":
                exhausted += 1
            else:
                event = Event.from_item(item)
                resent = kind == "redispatch"
                leases.append(Lease(event, token, deadline, now, resent=resent))
        return ClaimResult(leases, skipped, exhausted)

    @staticmethod
    def _log_won(kind: str, item: dict[str, Any]) -> None:
        event_id, retries = item[ev.ID][_S], item.get(ev.RETRY_COUNT, {}).get(_N)
        if kind == "fail":
            logger.warning(
                "Event %r (%s) failed: the lease of its last attempt (%s) expired",
                event_id,
                item.get(ev.TYPE, {}).get(_S),
                retries,
            )
        elif kind == "reclaim":
            logger.warning(
                "Reclaimed event %r: its lease expired, so attempt %s counts "
                "as failed; running it again",
                event_id,
                retries,
            )
        elif kind == "redispatch":
            logger.warning(
                "Dispatching event %r again: its lease expired before its "
                "handler started (the message was lost or is still waiting in "
                "the broker)",
                event_id,
            )

    @property
    def expired_check_ms(self) -> int:
        """How often a process looks for expired leases: a tenth of a lease,
        or the poll interval if that is longer (3 s by default)."""
        config = self.config
        return max(config.poll_interval_ms, config.processing_timeout_ms // 10)

    def _retry_condition(self, item: dict[str, Any]) -> tuple[str, list[Any]]:
        seen = item.get(ev.RETRY_COUNT)
        if seen is None:
            return f"{RETRY} IS MISSING", []
        return f"{RETRY} = ?", [seen]

    @staticmethod
    def _round_condition(item: dict[str, Any]) -> tuple[str, list[Any]]:
        # An operator retry puts an event back exactly as a stale copy of
        # its last round reads (created, due, no retries): the round pins
        # the copy the lease's event is built from.
        seen = item.get(ev.OPERATOR_RETRIES)
        if seen is None:
            return f"{OPERATOR} IS MISSING", []
        return f"{OPERATOR} = ?", [seen]

    def _claim(
        self, item: dict[str, Any], now: int, deadline: int, token: str
    ) -> Statement:
        event_id = item[ev.ID][_S]
        retry, retry_values = self._retry_condition(item)
        round_, round_values = self._round_condition(item)
        return Statement(
            f"UPDATE {self.table} SET {STATUS} = ? SET {SK} = ? SET {TOKEN} = ? "
            f"SET {STARTED} = ? REMOVE {RUNNING} REMOVE {RUNNING_BY} "
            f"WHERE {ID} = ? AND {STATUS} = ? AND {SK} <= ? AND {retry} AND {round_}",
            (
                _s(self.keys.value(Status.ACTIVE, event_id)),
                _n(deadline),
                _s(token),
                _n(now),
                _s(event_id),
                _s(self.keys.value(Status.CREATED, event_id)),
                _n(now),
                *retry_values,
                *round_values,
            ),
            event_id,
        )

    def _reclaim(
        self, item: dict[str, Any], now: int, deadline: int, token: str
    ) -> tuple[Statement, dict[str, Any], str, str]:
        """Take over an expired lease, as :meth:`OutboxStore.claim` does.

        A lease whose handler never started (no ``runningSince``) is sent
        again under its token without using up a retry; a started one counts
        as a failed attempt, and fails the event when it was the last.
        Returns the statement, the item as it will be if it succeeds, the
        lease token and what it does: ``redispatch``, ``reclaim`` or ``fail``.
        """
        event_id = item[ev.ID][_S]
        seen = item.get(ev.LEASE_TOKEN, {}).get(_S)
        # The TypeScript adapter marks an event active as its handler starts.
        started = ev.RUNNING_SINCE in item or not seen
        retry, retry_values = self._retry_condition(item)
        # A token pins the round; an event the TypeScript adapter holds has
        # none, so the round is named as read (see _round_condition).
        round_, round_values = self._round_condition(item)
        where = (
            f"WHERE {ID} = ? AND {STATUS} = ? AND {SK} <= ? AND {retry} "
            f"AND {round_} AND "
        )
        if seen:
            where += f"{TOKEN} = ? AND {RUNNING} IS {'NOT ' if started else ''}MISSING"
        else:
            where += f"{TOKEN} IS MISSING"
        where_values = (
            _s(event_id),
            _s(self.keys.value(Status.ACTIVE, event_id)),
            _n(now),
            *retry_values,
            *round_values,
            *([_s(seen)] if seen else []),
        )
        if seen and not started:
            after = {**item, ev.SORT_KEY: _n(deadline), ev.STARTED_ON: _n(now)}
            text = f"UPDATE {self.table} SET {SK} = ? SET {STARTED} = ? {where}"
            values = (_n(deadline), _n(now), *where_values)
            return Statement(text, values, event_id), after, seen, "redispatch"
        retries = int(item.get(ev.RETRY_COUNT, {_N: "0"})[_N]) + 1
        lost = self.store.short_error(
            f"LeaseExpired: attempt {retries} did not report back within "
            f"{self.config.processing_timeout_ms} ms; its worker was probably lost"
        )
        if retries > self.config.max_retries:
            after = {
                **item,
                ev.STATUS: _s(Status.FAILED.value),
                ev.RETRY_COUNT: _n(retries),
            }
            text = (
                f"UPDATE {self.table} SET {STATUS} = ? SET {SK} = ? SET {RETRY} = ? "
                f"SET {ERROR} = ? REMOVE {TOKEN} {where}"
            )
            values = (
                _s(Status.FAILED.value),
                _n(now),
                _n(retries),
                _s(lost),
                *where_values,
            )
            return Statement(text, values, event_id), after, token, "fail"
        after = {**item, ev.RETRY_COUNT: _n(retries), ev.LAST_ERROR: _s(lost)}
        text = (
            f"UPDATE {self.table} SET {STATUS} = ? SET {SK} = ? SET {TOKEN} = ? "
            f"SET {STARTED} = ? SET {RETRY} = ? SET {ERROR} = ? "
            f"REMOVE {RUNNING} REMOVE {RUNNING_BY} {where}"
        )
        values = (
            _s(self.keys.value(Status.ACTIVE, event_id)),
            _n(deadline),
            _s(token),
            _n(now),
            _n(retries),
            _s(lost),
            *where_values,
        )
        return Statement(text, values, event_id), after, token, "reclaim"

    # -- write-back -----------------------------------------------------------

    def begin(
        self,
        lease: Lease,
        *,
        completing: Sequence[Lease] = (),
        starting: Sequence[Lease] = (),
    ) -> tuple[Lease | None, list[Outcome]]:
        """Start ``lease``'s attempt; other write-backs ride in the same request.

        The start is :meth:`OutboxStore.begin`'s conditional write as a
        statement: it restarts the deadline and sets ``runningSince``, only
        while the lease is live and not started by another copy. Deferred
        starts (``starting``) and completions (``completing``) waiting in
        the worker ride along, so under load they cost no request of their
        own. Returns the started lease (None: do not run it) and the
        completions' outcomes.
        """
        now = self.store.clock()
        deadline = now + self.config.processing_timeout_ms
        started, _, outcomes = self.write_back([lease, *starting], completing, now=now)
        lease_started = None
        if started[0]:
            lease_started = dataclasses.replace(lease, deadline_ms=deadline)
        return lease_started, outcomes

    def write_back(
        self,
        starting: Sequence[Lease],
        completing: Sequence[Lease],
        *,
        now: int | None = None,
    ) -> tuple[list[bool], list[Lease], list[Outcome]]:
        """Start and complete leases in one request (at most 25 in all).

        Returns whether each start was written, the leases whose start
        found the lease gone or already started, and the completions'
        outcomes.
        """
        if len(starting) + len(completing) > partiql.BATCH_LIMIT:
            raise ValueError(f"at most {partiql.BATCH_LIMIT} write-backs a request")
        if not starting and not completing:
            return [], [], []
        now = self.store.clock() if now is None else now
        deadline = now + self.config.processing_timeout_ms
        # Completions first: one naming a start's item (another copy of the
        # same lease, its own deferred start replaced) must land before it.
        statements = [self._complete(lease) for lease in completing]
        statements += [self._start(lease, now, deadline) for lease in starting]
        results = self._execute(statements)
        started = [result == partiql.OK for result in results[len(completing) :]]
        missed = [lease for lease, ok in zip(starting, started, strict=True) if not ok]
        outcomes = self._outcomes(completing, results[: len(completing)])
        return started, missed, outcomes

    def _start(self, lease: Lease, now: int, deadline: int) -> Statement:
        event_id = lease.event.id
        by = ""
        unstarted = f"{RUNNING} IS MISSING"
        by_values: tuple[dict[str, Any], ...] = ()
        own: tuple[dict[str, Any], ...] = ()
        if lease.copy is not None:
            by, by_values = f"SET {RUNNING_BY} = ? ", (_s(lease.copy),)
            # A resent batch (its reply was lost) finds this delivery's own
            # mark: the handler has not run yet and must not be skipped.
            unstarted = f"({unstarted} OR {RUNNING_BY} = ?)"
            own = (_s(lease.copy),)
        return Statement(
            f"UPDATE {self.table} SET {SK} = ? SET {RUNNING} = ? {by}"
            f"WHERE {ID} = ? AND {STATUS} = ? AND {TOKEN} = ? AND {unstarted}",
            (
                _n(deadline),
                _n(now),
                *by_values,
                _s(event_id),
                _s(self.keys.value(Status.ACTIVE, event_id)),
                _s(lease.token),
                *own,
            ),
            event_id,
        )

    def complete(self, leases: Sequence[Lease]) -> list[Outcome]:
        """Complete each lease's event; a stale lease is a no-op (``STALE``).

        Deletes the events, or keeps them as ``completed`` with a TTL, by
        ``config.completion``, exactly as the item store does.
        """
        if not leases:
            return []
        results = self._execute([self._complete(lease) for lease in leases])
        return self._outcomes(leases, results)

    @staticmethod
    def _outcomes(leases: Sequence[Lease], results: Sequence[str]) -> list[Outcome]:
        outcomes = []
        for lease, result in zip(leases, results, strict=True):
            if result == partiql.OK:
                outcomes.append(Outcome.COMPLETED)
            else:
                logger.info(
                    "Ignored complete of event %r: lease %s is no longer live "
                    "(reclaimed or already written back)",
                    lease.event.id,
                    lease.token,
                )
                outcomes.append(Outcome.STALE)
        return outcomes

    def _complete(self, lease: Lease) -> Statement:
        event_id = lease.event.id
        where = f"WHERE {ID} = ? AND {STATUS} = ? AND {TOKEN} = ?"
        where_values = (
            _s(event_id),
            _s(self.keys.value(Status.ACTIVE, event_id)),
            _s(lease.token),
        )
        if self.config.completion is Completion.DELETE:
            return Statement(
                f"DELETE FROM {self.table} {where}", where_values, event_id
            )
        now = self.store.clock()
        return Statement(
            f"UPDATE {self.table} SET {STATUS} = ? SET {SK} = ? "
            f"SET {quote(ev.COMPLETED_ON)} = ? SET {quote(ev.EXPIRES_AT)} = ? "
            f"REMOVE {TOKEN} {where}",
            (
                _s(Status.COMPLETED.value),
                _n(now),
                _n(now),
                _n(now // 1000 + self.config.retention_s),
                *where_values,
            ),
            event_id,
        )

    # -- emit -----------------------------------------------------------------

    def insert(self, events: Sequence[Event]) -> InsertReport:
        """Write ``events`` due now, 25 to a request, each on its own.

        Not atomic: each event is written or found existing independently.
        ``INSERT`` never overwrites a stored key, so an existing id is left
        as it is and reported in ``existing``.

        Raises:
            ItemTooLargeError: an event's item exceeds 400 KB; nothing written.
        """
        statements = []
        for event in events:
            item = self.store.put_action(event)["Put"]["Item"]
            names = ", ".join(f"'{name}': ?" for name in item)
            statements.append(
                Statement(
                    f"INSERT INTO {self.table} VALUE {{{names}}}",
                    tuple(item.values()),
                    event.id,
                )
            )
        results = self._execute(statements)
        report = InsertReport()
        for event, result in zip(events, results, strict=True):
            if result == partiql.OK or self._is_same_event(event):
                # A resend of an insert that had landed finds our own item.
                report.written.append(event.id)
            else:
                report.existing.append(event.id)
        return report

    def _is_same_event(self, event: Event) -> bool:
        found = self.store.get_item(event.id)
        return (
            found is not None
            and found.get(ev.OCCURRED_AT, {}).get(_S) == event.occurred_at
            and Event.from_item(found).payload == event.payload
        )
