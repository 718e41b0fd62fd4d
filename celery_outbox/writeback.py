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

A handler's start mark (:meth:`OutboxStore.begin`) is written before it
runs, except where :meth:`HandlerTask.may_defer` allows the ``partiql``
writer to buffer it like a completion: the handler runs at once, and a
completion that comes before the flush replaces the mark, so a short
handler costs no start write. A start written at once carries what waits
in the buffer. Failures, retries and releases are rare and written at
once, item by item, so their outcome is known (and logged) where they
happen.
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

__all__ = ["BatchWriter", "ItemWriter", "WriteBuffer", "Writer", "make_writer"]

logger = get_logger(__name__)

CCF = "ConditionalCheckFailedException"
_CLAIM_NAMES = {
    "#status": ev.STATUS,
    "#sk": ev.SORT_KEY,
    "#token": ev.LEASE_TOKEN,
    "#started": ev.STARTED_ON,
    "#retry": ev.RETRY_COUNT,
    "#running": ev.RUNNING_SINCE,
    "#operator": ev.OPERATOR_RETRIES,
    "#copy": ev.RUNNING_BY,
}


class Writer(Protocol):
    """What the drain and the handlers need from a write mode."""

    store: OutboxStore
    #: Whether ``begin(defer=True)`` may let a handler start before its mark
    #: is written (so a stray copy of its message would not be refused).
    defers_starts: bool

    def claim(self) -> ClaimResult:
        """Lease a batch of due events."""

    def claim_items(self, items: list[dict[str, Any]]) -> ClaimResult:
        """Lease these fresh items, as an emit wrote them (nudged drains)."""

    def begin(self, lease: Lease, *, defer: bool = False) -> Lease | None:
        """Start ``lease``'s attempt; None when the handler must not run.

        ``defer`` allows the mark to be written after the handler starts.
        """

    def complete(self, lease: Lease) -> Outcome | None:
        """Complete ``lease``'s event; None when the write is buffered."""

    def discard(self, lease: Lease) -> None:
        """Forget anything buffered for ``lease`` (its failure is written)."""

    def insert(self, events: list[Event]) -> InsertReport:
        """Write ``events``, each on its own, never overwriting a stored id."""

    def flush(self) -> None:
        """Write whatever is buffered, now."""


class ItemWriter:
    """One conditional request per claim and per completion (the store's)."""

    defers_starts = False

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
        # The round too: an operator retry makes an event read as a stale
        # copy of its last round does (see BatchStore._round_condition).
        round_ = "attribute_not_exists(#operator)"
        if ev.OPERATOR_RETRIES in item:
            round_, values[":round"] = "#operator = :round", item[ev.OPERATOR_RETRIES]
        condition = f"#status = :created AND #sk <= :now AND {retry} AND {round_}"
        try:
            store.client.update_item(
                TableName=store.table,
                Key={ev.ID: item[ev.ID]},
                UpdateExpression="SET #status = :active, #sk = :deadline, "
                "#token = :token, #started = :now REMOVE #running, #copy",
                ConditionExpression=condition,
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

    def begin(self, lease: Lease, *, defer: bool = False) -> Lease | None:
        """The store's start of an attempt, always written before it runs."""
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

    def discard(self, lease: Lease) -> None:
        """Nothing is buffered."""

    def flush(self) -> None:
        """Nothing is buffered."""


_START, _COMPLETE = "start", "complete"


class WriteBuffer:
    """Handler starts and completions waiting to be written together.

    A flusher thread writes what waits after ``interval_ms`` (or as soon as
    25 wait), 25 to a request. Entries are kept by event: a completion
    replaces its event's waiting start, which then costs no write at all
    (the completion's condition names the same lease).

    Args:
        batches: the PartiQL writer that writes them.
        interval_ms: the longest an entry waits for others.
    """

    def __init__(self, batches: BatchStore, interval_ms: int) -> None:
        self.batches = batches
        self.interval_s = interval_ms / 1000
        # event id -> (queued at, kind, lease), oldest first
        self._pending: dict[str, tuple[float, str, Lease]] = {}
        # tokens of starts being written whose outcome was written meanwhile
        self._writing: set[str] = set()
        self._settled: set[str] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._busy = False
        self._pid = os.getpid()
        _live.add(self)

    def __repr__(self) -> str:
        return f"<WriteBuffer pending={len(self._pending)}>"

    def start(self, lease: Lease) -> bool:
        """Queue the mark that ``lease``'s handler started.

        False, queueing nothing, when ``lease``'s completion waits: another
        copy of its message ran the handler, and its start mark (which would
        have refused this copy) was replaced.
        """
        with self._cond:
            entry = self._pending.get(lease.event.id)
            if entry is not None and (entry[1], entry[2].token) == (
                _COMPLETE,
                lease.token,
            ):
                return False
            self._add(lease, _START)
            return True

    def complete(self, lease: Lease) -> None:
        """Queue ``lease``'s completion, replacing its waiting start."""
        self._add(lease, _COMPLETE)

    def discard(self, lease: Lease) -> None:
        """Drop what waits for ``lease`` (its outcome is written elsewhere)."""
        with self._cond:
            entry = self._pending.get(lease.event.id)
            if entry is not None and entry[2].token == lease.token:
                del self._pending[lease.event.id]
            elif lease.token in self._writing:
                # its start mark may now miss: that is expected, not a warning
                self._settled.add(lease.token)

    def _add(self, lease: Lease, kind: str) -> None:
        with self._cond:
            entry = self._pending.get(lease.event.id)
            queued = time.monotonic() if entry is None else entry[0]
            self._pending[lease.event.id] = (queued, kind, lease)
            if kind == _COMPLETE and lease.token in self._writing:
                # its start mark, in flight, may now land after it and miss
                self._settled.add(lease.token)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="outbox-flusher", daemon=True
                )
                self._thread.start()
            if len(self._pending) in (1, BATCH_LIMIT):
                self._cond.notify_all()

    def _take_locked(
        self, limit: int, *, writing: bool = False
    ) -> list[tuple[str, Lease]]:
        taken = []
        for event_id in list(self._pending)[:limit]:
            _, kind, lease = self._pending.pop(event_id)
            taken.append((kind, lease))
            if writing and kind == _START:
                # from here on, a discard must know its start is in flight
                self._writing.add(lease.token)
        return taken

    def take(self, limit: int) -> tuple[list[Lease], list[Lease]]:
        """Up to ``limit`` waiting entries, as (starts, completions)."""
        with self._cond:
            return _split(self._take_locked(limit))

    def put_back(self, starts: list[Lease], completions: list[Lease]) -> None:
        """Return entries a caller took but could not write."""
        with self._cond:
            now = time.monotonic()
            back = [(lease, _START) for lease in starts]
            back += [(lease, _COMPLETE) for lease in completions]
            for lease, kind in back:
                # an entry queued since for the same event is newer: keep it
                self._pending.setdefault(lease.event.id, (now, kind, lease))
            if back:
                self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                due = next(iter(self._pending.values()))[0] + self.interval_s
                while len(self._pending) < BATCH_LIMIT:
                    left = due - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = self._take_locked(BATCH_LIMIT, writing=True)
                self._busy = True
            try:
                self._write(*_split(batch))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _write(self, starts: list[Lease], completions: list[Lease]) -> bool:
        """Write these entries; False when DynamoDB refused the request.

        Refused entries whose lease has not expired are queued again: a
        dropped start mark would leave a running handler's lease looking
        unstarted, to be sent again, and run twice, at its deadline.
        """
        failed: BaseException | None = None
        missed: list[Lease] = []
        again: list[Lease] = []
        done: list[Lease] = []
        try:
            _, missed, _ = self.batches.write_back(starts, completions)
        except (OutboxError, OSError) as exc:
            failed = exc
            now = self.batches.store.clock()
        finally:
            with self._cond:
                settled = self._settled & {lease.token for lease in starts}
                self._writing.difference_update(lease.token for lease in starts)
                self._settled -= settled
                if failed is not None:
                    # Queued again under the same lock: a discard sees each
                    # start either in flight (settled) or queued (dropped).
                    # A start whose failure was written meanwhile is moot.
                    again = [s for s in starts if s.token not in settled]
                    again = [s for s in again if s.deadline_ms > now]
                    done = [c for c in completions if c.deadline_ms > now]
                    self.put_back(again, done)
        if failed is not None:
            logger.warning(
                "Could not write %d handler starts and %d completions (%s); "
                "%d are queued again, the others' leases will expire and their "
                "events will run again",
                len(starts),
                len(completions),
                failed,
                len(again) + len(done),
            )
            return False
        for lease in missed:
            if lease.token in settled:
                continue
            logger.warning(
                "Event %r (attempt %d) started under a lease that is no longer "
                "live (reclaimed, or its message was sent twice): it may run "
                "twice",
                lease.event.id,
                lease.event.attempt,
            )
        return True

    def flush(self) -> None:
        """Write everything waiting now, in this thread; wait for the flusher.

        Stops at the first request DynamoDB refuses; what it could not write
        stays queued for the flusher.
        """
        while True:
            with self._cond:
                while self._busy:
                    self._cond.wait()
                batch = self._take_locked(BATCH_LIMIT, writing=True)
            if not batch or not self._write(*_split(batch)):
                return


def _split(entries: list[tuple[str, Lease]]) -> tuple[list[Lease], list[Lease]]:
    starts = [lease for kind, lease in entries if kind == _START]
    completions = [lease for kind, lease in entries if kind == _COMPLETE]
    return starts, completions


class BatchWriter:
    """Claims, starts and completions in conditional PartiQL batches."""

    defers_starts = True

    def __init__(self, store: OutboxStore) -> None:
        self.store = store
        self.batches = BatchStore(store)
        self.buffer = WriteBuffer(self.batches, store.config.flush_interval_ms)

    def __repr__(self) -> str:
        return f"<BatchWriter {self.store!r}>"

    def claim(self) -> ClaimResult:
        """Claim a batch with one query and one request per 25 events."""
        return self.batches.claim()

    def claim_items(self, items: list[dict[str, Any]]) -> ClaimResult:
        """Claim these fresh items, 25 to a request, without a query."""
        return self.batches.claim_items(items)

    def begin(self, lease: Lease, *, defer: bool = False) -> Lease | None:
        """Start the attempt, now or (``defer``) through the buffer.

        A deferred start returns at once: the handler runs while its mark
        waits to be written with others, and a completion that comes first
        replaces it. The caller decides when that is safe (see
        :meth:`HandlerTask.before_start`). A start written now carries what
        waits in the buffer.
        """
        if defer:
            return lease if self.buffer.start(lease) else None
        starts, completions = self.buffer.take(BATCH_LIMIT - 1)
        try:
            started, _ = self.batches.begin(
                lease, completing=completions, starting=starts
            )
        except BaseException:
            self.buffer.put_back(starts, completions)
            raise
        return started

    def complete(self, lease: Lease) -> None:
        """Buffer the completion; the flusher writes it within the interval."""
        self.buffer.complete(lease)

    def discard(self, lease: Lease) -> None:
        """Drop ``lease``'s waiting start: its failure is written now."""
        self.buffer.discard(lease)

    def insert(self, events: list[Event]) -> InsertReport:
        """``INSERT`` statements, 25 to a request."""
        return self.batches.insert(events)

    def flush(self) -> None:
        """Write buffered starts and completions now."""
        self.buffer.flush()


def writer_class(mode: WriteMode) -> type[ItemWriter | BatchWriter]:
    """The writer class of write mode ``mode``."""
    return BatchWriter if mode is WriteMode.PARTIQL else ItemWriter


def make_writer(store: OutboxStore) -> Writer:
    """The writer for ``store.config.write_mode``."""
    return writer_class(store.config.write_mode)(store)


_live: weakref.WeakSet[WriteBuffer] = weakref.WeakSet()
_pool_child = False


def in_pool_child() -> bool:
    """Whether this process is a prefork pool child of a Celery worker.

    Only there is a handler's process watched by another: when a child
    dies mid-task, the worker's main process reports it
    (:class:`~celery_outbox.handlers.HandlerRequest`), so a start mark
    that died with the child is not needed to count the attempt.
    """
    return _pool_child


def _pool_child_started(**kwargs: Any) -> None:
    global _pool_child
    _pool_child = True


signals.worker_process_init.connect(_pool_child_started, weak=False)


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
