"""Writers: how a process claims events and writes completions back.

``write_mode = "item"`` (:class:`ItemWriter`) sends one conditional request
per claim and per completion, through the store. ``write_mode = "partiql"``
(:class:`BatchWriter`) claims in PartiQL batches and buffers completions
for up to ``flush_interval_ms`` (or until 25 wait), then writes them in one
batch from a flusher thread of the worker process.

A buffered completion is safe to lose: if the process dies before the flush,
the lease deadline brings the event back, as for any worker lost mid-task
(its handler then runs again: the outbox delivers at least once). Buffers
are flushed when a worker process or the worker shuts down, and at exit.
A handler's start (:meth:`OutboxStore.begin`) must be written before it
runs; in ``partiql`` mode the completions waiting in the process ride in
the same request, so under load completions cost no request of their own.
Failures, retries and releases are rare and written at once, item by item,
so their outcome is known (and logged) where they happen.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import uuid
import weakref
from typing import Any, Protocol

from botocore.exceptions import ClientError
from celery import signals
from celery.utils.log import get_logger

from celery_outbox import event as ev
from celery_outbox.batch import BatchStore, InsertReport
from celery_outbox.config import WriteMode
from celery_outbox.errors import EventExistsError, OutboxError, StoreError
from celery_outbox.event import Event, Lease, Status
from celery_outbox.partiql import BATCH_LIMIT
from celery_outbox.store import ClaimResult, OutboxStore, Outcome

__all__ = ["BatchWriter", "CompletionBuffer", "ItemWriter", "Writer", "make_writer"]

logger = get_logger(__name__)

CCF = "ConditionalCheckFailedException"
_CLAIM_NAMES = {
    "#status": ev.STATUS,
    "#sk": ev.SORT_KEY,
    "#token": ev.LEASE_TOKEN,
    "#started": ev.STARTED_ON,
    "#retry": ev.RETRY_COUNT,
    "#running": ev.RUNNING_SINCE,
}


class Writer(Protocol):
    """What the drain and the handlers need from a write mode."""

    store: OutboxStore

    def claim(self) -> ClaimResult:
        """Lease a batch of due events."""

    def claim_items(self, items: list[dict[str, Any]]) -> ClaimResult:
        """Lease these fresh items, as an emit wrote them (nudged drains)."""

    def begin(self, lease: Lease) -> Lease | None:
        """Start ``lease``'s attempt; None when the handler must not run."""

    def complete(self, lease: Lease) -> Outcome | None:
        """Complete ``lease``'s event; None when the write is buffered."""

    def insert(self, events: list[Event]) -> InsertReport:
        """Write ``events``, each on its own, never overwriting a stored id."""

    def flush(self) -> None:
        """Write whatever is buffered, now."""


class ItemWriter:
    """One conditional request per claim and per completion (the store's)."""

    def __init__(self, store: OutboxStore) -> None:
        self.store = store

    def __repr__(self) -> str:
        return f"<ItemWriter {self.store!r}>"

    def claim(self) -> ClaimResult:
        """The store's claim."""
        return self.store.claim()

    def claim_items(self, items: list[dict[str, Any]]) -> ClaimResult:
        """One conditional ``UpdateItem`` per item, with the batch claim's condition."""
        now = self.store.clock()
        leases = [
            lease for item in items if (lease := self._claim_one(item, now)) is not None
        ]
        return ClaimResult(leases, len(items) - len(leases))

    def _claim_one(self, item: dict[str, Any], now: int) -> Lease | None:
        store = self.store
        event_id = item[ev.ID]["S"]
        token = uuid.uuid4().hex
        deadline = now + store.config.processing_timeout_ms
        values = {
            ":active": store.status_value(Status.ACTIVE, event_id),
            ":created": store.status_value(Status.CREATED, event_id),
            ":deadline": {"N": str(deadline)},
            ":token": {"S": token},
            ":now": {"N": str(now)},
        }
        retry = "attribute_not_exists(#retry)"
        if ev.RETRY_COUNT in item:
            retry, values[":seen"] = "#retry = :seen", item[ev.RETRY_COUNT]
        try:
            store.client.update_item(
                TableName=store.table,
                Key={ev.ID: item[ev.ID]},
                UpdateExpression="SET #status = :active, #sk = :deadline, "
                "#token = :token, #started = :now REMOVE #running",
                ConditionExpression=f"#status = :created AND #sk <= :now AND {retry}",
                ExpressionAttributeNames=_CLAIM_NAMES,
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == CCF:
                return None
            raise StoreError(
                f"DynamoDB claim on {store.table!r} failed: {exc}", code
            ) from exc
        return Lease(Event.from_item(item), token, deadline, now)

    def begin(self, lease: Lease) -> Lease | None:
        """The store's start of an attempt."""
        return self.store.begin(lease)

    def complete(self, lease: Lease) -> Outcome:
        """The store's completion, written now."""
        return self.store.complete(lease)

    def insert(self, events: list[Event]) -> InsertReport:
        """One conditional ``PutItem`` per event, after checking them all."""
        for event in events:
            self.store.put_action(event)  # every check before any write
        report = InsertReport()
        for event in events:
            try:
                self.store.publish([event])
            except EventExistsError:
                report.existing.append(event.id)
            else:
                report.written.append(event.id)
        return report

    def flush(self) -> None:
        """Nothing is buffered."""


class CompletionBuffer:
    """Completions waiting to be written together by a flusher thread.

    Args:
        batches: the PartiQL writer that writes them.
        interval_ms: the longest a completion waits for others.
    """

    def __init__(self, batches: BatchStore, interval_ms: int) -> None:
        self.batches = batches
        self.interval_s = interval_ms / 1000
        self._pending: list[tuple[float, Lease]] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._busy = False
        self._pid = os.getpid()
        _live.add(self)

    def __repr__(self) -> str:
        return f"<CompletionBuffer pending={len(self._pending)}>"

    def add(self, lease: Lease) -> None:
        """Queue ``lease``'s completion; the flusher writes it soon."""
        with self._cond:
            self._pending.append((time.monotonic(), lease))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="outbox-flusher", daemon=True
                )
                self._thread.start()
            if len(self._pending) in (1, BATCH_LIMIT):
                self._cond.notify_all()

    def take(self, limit: int) -> list[Lease]:
        """Up to ``limit`` pending completions, for the caller to write."""
        with self._cond:
            taken = self._pending[:limit]
            del self._pending[:limit]
        return [lease for _, lease in taken]

    def put_back(self, leases: list[Lease]) -> None:
        """Return completions a caller took but could not write."""
        with self._cond:
            now = time.monotonic()
            self._pending[:0] = [(now, lease) for lease in leases]
            if leases:
                self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                due = self._pending[0][0] + self.interval_s
                while len(self._pending) < BATCH_LIMIT:
                    left = due - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = self._pending[:BATCH_LIMIT]
                del self._pending[:BATCH_LIMIT]
                self._busy = True
            try:
                self._write([lease for _, lease in batch])
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _write(self, leases: list[Lease]) -> None:
        try:
            self.batches.complete(leases)
        except (OutboxError, OSError) as exc:
            # The events stay leased: their deadline brings them back.
            logger.warning(
                "Could not write %d completions (%s); their leases will expire "
                "and the events will run again",
                len(leases),
                exc,
            )

    def flush(self) -> None:
        """Write everything pending now, in this thread; wait for the flusher."""
        while True:
            with self._cond:
                while self._busy:
                    self._cond.wait()
                batch = self._pending[:BATCH_LIMIT]
                del self._pending[:BATCH_LIMIT]
            if not batch:
                return
            self._write([lease for _, lease in batch])


class BatchWriter:
    """Claims and completions in conditional PartiQL batches."""

    def __init__(self, store: OutboxStore) -> None:
        self.store = store
        self.batches = BatchStore(store)
        self.buffer = CompletionBuffer(self.batches, store.config.flush_interval_ms)

    def __repr__(self) -> str:
        return f"<BatchWriter {self.store!r}>"

    def claim(self) -> ClaimResult:
        """Claim a batch with one query and one request per 25 events."""
        return self.batches.claim()

    def claim_items(self, items: list[dict[str, Any]]) -> ClaimResult:
        """Claim these fresh items, 25 to a request, without a query."""
        return self.batches.claim_items(items)

    def begin(self, lease: Lease) -> Lease | None:
        """Start the attempt; buffered completions ride in the same request."""
        riders = self.buffer.take(BATCH_LIMIT - 1)
        try:
            started, _ = self.batches.begin(lease, completing=riders)
        except BaseException:
            self.buffer.put_back(riders)
            raise
        return started

    def complete(self, lease: Lease) -> None:
        """Buffer the completion; the flusher writes it within the interval."""
        self.buffer.add(lease)

    def insert(self, events: list[Event]) -> InsertReport:
        """``INSERT`` statements, 25 to a request."""
        return self.batches.insert(events)

    def flush(self) -> None:
        """Write buffered completions now."""
        self.buffer.flush()


def make_writer(store: OutboxStore) -> Writer:
    """The writer for ``store.config.write_mode``."""
    if store.config.write_mode is WriteMode.PARTIQL:
        return BatchWriter(store)
    return ItemWriter(store)


_live: weakref.WeakSet[CompletionBuffer] = weakref.WeakSet()


def flush_all(**kwargs: Any) -> None:
    """Flush every completion buffer of this process (worker shutdown, exit)."""
    for buffer in list(_live):
        # A buffer inherited through fork belongs to the parent: its lock
        # may have been held at the fork.
        if buffer._pid == os.getpid():
            buffer.flush()


# Prefork children flush as they stop; solo and thread pools when the worker
# stops; anything else at interpreter exit.
signals.worker_process_shutdown.connect(flush_all, weak=False)
signals.worker_shutdown.connect(flush_all, weak=False)
atexit.register(flush_all)
