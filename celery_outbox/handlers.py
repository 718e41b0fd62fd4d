"""Handlers: the Celery tasks that run events, and their write-back callbacks.

``@outbox.handler("order.created")`` registers an ordinary Celery task whose
base class is :class:`HandlerTask`. The drain sends it one message per
claimed event; Celery runs the task's ``on_success``, ``on_retry`` and
``on_failure`` hooks in the process that ran the task body, right after it,
and they write the outcome back to DynamoDB under the lease the drain took.

A worker child that dies mid-task (``SIGKILL``, out of memory, a hard time
limit) runs none of these hooks in that child. Celery's main process then
reports the loss through the task's Request class (:class:`HandlerRequest`),
which fails the attempt at once: a lost worker counts as a failed attempt,
so a poison event ends ``failed`` instead of looping. Where nothing reports
the loss (the whole worker died), the lease deadline brings the event back,
counted as a failed attempt if its start was marked. A message lost or
delayed in the broker never started, and its event comes back without
losing an attempt.

The start mark (:meth:`HandlerTask.before_start`) is a conditional write.
In ``partiql`` mode, in a prefork child, for a message that arrives in the
first half of its lease and was sent once (and not ``acks_late``), the
handler runs at once and the mark waits to be written with other
write-backs; a completion that comes first replaces it. That saves a
request per event; what it gives up is narrow: if the whole worker (main
process included) dies within ``flush_interval_ms`` of such a start, the
attempt is not counted.

Celery's own retries are the outbox's:

* ``self.retry(exc=..., countdown=...)`` fails this attempt and makes the
  event due again after ``countdown`` seconds (or ``eta``, or the task's
  ``default_retry_delay``, or else the outbox backoff). Nothing is sent to
  the broker: the retry waits in DynamoDB, and the drain dispatches it as
  the next attempt, with a new task id.
* ``autoretry_for`` (with ``retry_backoff``, ``retry_kwargs``...) goes
  through ``self.retry`` and so behaves the same way.
* ``self.request.retries`` is the number of failed attempts before this
  one, so Celery's backoff formulas count the outbox's attempts.
* ``max_retries`` (on the handler, or given to ``self.retry``) can lower the
  outbox's ``max_retries`` for that handler, never raise it. Past the limit,
  ``self.retry`` raises the exception (or ``MaxRetriesExceededError``) and
  the event ends ``failed``.
* Any other exception is a failed attempt with the outbox backoff.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError
from celery import Task
from celery.exceptions import (
    Ignore,
    Retry,
    Terminated,
    TimeLimitExceeded,
    WorkerLostError,
)
from celery.utils.imports import symbol_by_name
from celery.utils.log import get_task_logger
from celery.worker.request import Request

from celery_outbox import writeback
from celery_outbox.errors import OutboxError
from celery_outbox.event import Event, Lease
from celery_outbox.store import OutboxStore, Outcome

if TYPE_CHECKING:
    from celery_outbox.outbox import Outbox

__all__ = [
    "HEADER_ATTEMPT",
    "HEADER_COPY",
    "HEADER_DEADLINE",
    "HEADER_EVENT_ID",
    "HEADER_EVENT_TYPE",
    "HEADER_LEASE",
    "HEADER_RESENT",
    "HandlerRequest",
    "HandlerTask",
    "OutboxRetry",
    "request_class",
    "wrap",
]

logger = get_task_logger("celery_outbox.handlers")

HEADER_EVENT_ID = "outbox_event_id"
HEADER_EVENT_TYPE = "outbox_event_type"
HEADER_ATTEMPT = "outbox_attempt"
HEADER_LEASE = "outbox_lease"
HEADER_DEADLINE = "outbox_deadline"
HEADER_RESENT = "outbox_resent"
HEADER_COPY = "outbox_copy"
"""Not a message header: the worker names each delivery it receives, in the
request both its main process and the child that runs it read."""

# Reported by Celery's main process about a child it lost or killed; the
# child ran no write-back, and the lease brings the event back.
_LOST = (WorkerLostError, TimeLimitExceeded, Terminated)


class OutboxRetry(Retry):  # type: ignore[misc]
    """Raised by :meth:`HandlerTask.retry`: fail this attempt, retry later.

    A :class:`celery.exceptions.Retry`, so workers, events and Flower show
    the task as ``RETRY``; unlike Celery's, no message is sent: the retry
    waits in DynamoDB until ``when`` seconds from now (None: the outbox
    backoff).
    """


class HandlerTask(Task):  # type: ignore[misc]
    """Base class of outbox handler tasks: writes outcomes back to DynamoDB."""

    outbox: Outbox
    event_type: str

    #: None: the outbox's ``max_retries`` applies. A number lowers it.
    max_retries: int | None = None
    #: None: retries without a countdown wait for the outbox backoff.
    default_retry_delay: float | None = None
    #: Celery would resend the message of a lost child with an ETA; the
    #: outbox's lease deadline is what brings the event back instead.
    retry_on_worker_lost = False

    def lease_of(self, args: Any) -> Lease | None:
        """The lease this execution runs under, from the message headers.

        None when the task was not dispatched by a drain (called directly,
        or sent by hand), so nothing is written back.
        """
        request = self.request
        return _lease(lambda name: _header(request, name), args)

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        """Start the attempt under its lease, or skip it if the lease is gone.

        The start is a conditional write (:meth:`OutboxStore.begin`), not a
        clock comparison: while the message waited, another drain may have
        reclaimed the event, and running it here would run it twice, however
        this worker's clock reads.
        """
        lease = self.lease_of(args)
        # by write_mode: in partiql, buffered write-backs ride along (writeback.py)
        if (
            lease is not None
            and self.outbox.writer.begin(lease, defer=self.may_defer(lease)) is None
        ):
            logger.warning(
                "Skipped event %r (attempt %d): while the message waited, its "
                "lease was reclaimed or written back, or another copy started it",
                lease.event.id,
                lease.event.attempt,
            )
            raise Ignore()
        super().before_start(task_id, args, kwargs)

    def may_defer(self, lease: Lease) -> bool:
        """Whether ``lease``'s start mark may be written after the handler starts.

        Only when losing the mark cannot lose the attempt's count or run the
        event twice: in a prefork child (the main process reports a lost
        child, :class:`HandlerRequest`), for a message sent once (a resent
        lease has another copy that may start too) and acknowledged early
        (``acks_late`` lets the broker deliver it again), arriving in the first
        half of its lease (no drain reclaims it before its deadline, unless
        the drain's clock is ahead by half a lease). Otherwise the start is
        written, conditionally, before the handler runs.
        """
        if lease.resent or not writeback.in_pool_child():
            return False
        # A message acknowledged late can be delivered again with the same
        # lease: requeued for a lost child (reject_on_worker_lost) or a hard
        # time limit, by Reject(requeue=True), or after a lost connection.
        # Such a copy must first win the conditional start.
        delivery_info = getattr(self.request, "delivery_info", None) or {}
        if self.acks_late or delivery_info.get("redelivered"):
            return False
        if not issubclass(_resolve(self.Request), HandlerRequest):
            return False
        config = self.outbox.config
        half_lease = config.processing_timeout_ms // 2
        # The mark may wait up to flush_interval_ms: it must still land in
        # the first half of the lease.
        landed_by = self.outbox.store.clock() + config.flush_interval_ms
        return landed_by < lease.deadline_ms - half_lease

    def lost(self, lease: Lease, reason: BaseException) -> None:
        """Fail ``lease``'s attempt: its worker child was lost running it.

        Called in the worker's main process. A lost worker counts as a failed
        attempt; if the child had written the event back, the lease is gone
        and this changes nothing. Nor does it when another delivery of the
        same lease's message (a resent one) started the handler: that run
        goes on, and its outcome is the one written. Where the start could
        not be deferred (``write_mode="item"``, or a resent lease or a task
        acknowledged late, see :meth:`may_defer`), a child lost before its
        start mark was written never ran the handler: that costs no attempt,
        and the lease's expiry sends the event again. The write gives up within
        seconds (:attr:`Outbox.prompt_store`): while it waits, the main
        process neither takes messages nor watches its children, and if it
        gives up the lease's expiry brings the event back.
        """
        final = lease.retry_count + 1 > self.retry_limit()
        error = f"WorkerLost: {type(reason).__name__}: {reason}"
        # Only the class: this process runs no handler and needs no writer.
        defers = writeback.writer_class(self.outbox.config.write_mode).defers_starts
        # A resent lease or a late-acknowledged task never defers its mark
        # (may_defer): with none written, its handler never ran.
        defers = defers and not (lease.resent or self.acks_late)
        self._fail(
            lease,
            error,
            final=final,
            what="lost attempt's failure",
            store=self.outbox.prompt_store,
            own_start=True,
            unstarted=defers,
        )

    def retry_limit(self, max_retries: int | None = None) -> int:
        """The retries this handler allows: the lowest of the outbox's limit,
        the task's ``max_retries`` and the one given to :meth:`retry`."""
        limits = [self.outbox.config.max_retries, self.max_retries, max_retries]
        limits.append(getattr(self.request, "outbox_max_retries", None))
        return min(int(n) for n in limits if n is not None)

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: datetime | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Retry:
        """Fail this attempt; the outbox dispatches the event again later.

        The retry waits in DynamoDB for ``countdown`` seconds (or until
        ``eta``, or ``default_retry_delay``), or the outbox backoff when
        none is set. ``args``, ``kwargs`` and other options of Celery's
        ``retry`` do not apply: the next attempt runs the same event.

        Raises:
            OutboxRetry: with ``throw`` (the default).
            BaseException: ``exc`` (or ``MaxRetriesExceededError``) when no
                retries are left; the event then ends ``failed``.
        """
        request = self.request
        if request.called_directly or self.lease_of(request.args) is None:
            # Not an outbox execution (a test calling it, a hand-sent task).
            return super().retry(
                args, kwargs, exc, throw, eta, countdown, max_retries, **options
            )
        if max_retries is not None:
            request.outbox_max_retries = max_retries
        if request.retries >= self.retry_limit():
            if exc is not None:
                raise exc
            raise self.MaxRetriesExceededError(
                f"event {request.args[0].get('id')!r} has no retries left "
                f"(attempt {request.retries + 1} of {self.retry_limit() + 1})"
            )
        if countdown is None and eta is not None:
            countdown = (eta - datetime.now(UTC)).total_seconds()
        if countdown is None:
            countdown = self.default_retry_delay
        retry = OutboxRetry(exc=exc, when=countdown)
        if throw:
            raise retry
        return retry

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        """Complete the event under this execution's lease."""
        lease = self.lease_of(args)
        if lease is not None:
            # by write_mode; None when buffered (writeback.py)
            outcome = self._write_back(lease, "completion", self.outbox.writer.complete)
            if outcome is Outcome.COMPLETED:
                logger.debug("Completed event %r (%s)", lease.event.id, self.event_type)
        super().on_success(retval, task_id, args, kwargs)

    def on_retry(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """Make the event due again after the retry's delay."""
        lease = self.lease_of(args)
        reason = getattr(einfo, "exception", None)
        if not isinstance(reason, Retry):
            # billiard wraps the exception with its traceback
            reason = getattr(reason, "exc", None)
        if lease is not None and isinstance(reason, Retry):
            error: str | BaseException = (
                exc if exc is not None else reason.message or "retry requested"
            )
            self._fail(lease, error, delay_ms=_delay_ms(reason.when))
        super().on_retry(exc, task_id, args, kwargs, einfo)

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """Reschedule the event with backoff, or fail it when no retries are left."""
        lease = self.lease_of(args)
        if lease is not None and not isinstance(exc, _LOST):
            final = lease.retry_count + 1 > self.retry_limit()
            self._fail(lease, exc, final=final)
        super().on_failure(exc, task_id, args, kwargs, einfo)

    def _fail(
        self,
        lease: Lease,
        error: str | BaseException,
        *,
        delay_ms: int | None = None,
        final: bool = False,
        what: str = "failure",
        store: OutboxStore | None = None,
        own_start: bool = False,
        unstarted: bool = True,
    ) -> None:
        if store is None:
            store = self.outbox.store
            # A start mark waiting in this process's buffer is moot now. (The
            # main process reporting a lost child passes its own store: the
            # buffer that held the child's mark died with the child.)
            self.outbox.writer.discard(lease)
        # A delivery named by its worker fails only a run of its own: a start
        # by another delivery of the same lease (sent again while this one's
        # deferred mark waited past the deadline) is that delivery's to end.
        own_start = own_start or lease.copy is not None

        def write(lease: Lease) -> Outcome:
            return store.fail(
                lease,
                error,
                delay_ms=delay_ms,
                final=final,
                own_start=own_start,
                unstarted=unstarted,
            )

        outcome = self._write_back(lease, what, write)
        if outcome in (None, Outcome.STALE):
            return
        logger.warning(
            "Event %r (%s) attempt %d failed: %s; %s",
            lease.event.id,
            self.event_type,
            lease.event.attempt,
            store.short_error(error),
            "no retries left, now failed"
            if outcome is Outcome.FAILED
            else "will be retried",
        )

    def _write_back(
        self, lease: Lease, what: str, write: Callable[[Lease], Outcome | None]
    ) -> Outcome | None:
        try:
            return write(lease)
        except (OutboxError, BotoCoreError) as exc:
            # The outcome is lost, not the event: the lease expires and the
            # next drain reclaims it, counted as a failed attempt.
            logger.error(
                "Could not write back the %s of event %r (attempt %d): %s; the "
                "event is reclaimed when its lease expires",
                what,
                lease.event.id,
                lease.event.attempt,
                exc,
            )
            return None


class HandlerRequest(Request):  # type: ignore[misc]
    """A handler task's message in the worker's main process.

    Celery runs this in the main process when a prefork child dies mid-task
    (killed, out of memory) or is killed for its hard time limit. Nothing
    ran the handler's write-back; this fails the attempt at once, under the
    lease the message carries, so the loss counts as a failed attempt
    without waiting for the lease to expire.
    """

    # The failure is written before Celery's handling, which may requeue the
    # message (acks_late with reject_on_worker_lost, or a hard time limit
    # without acks_on_timeout): a copy delivered before the failure would
    # find the lease live and, unstarted, start it.

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if HEADER_LEASE in self._request_dict:
            # Names this delivery for the start mark the child writes, so
            # that a report of its loss fails only a start of its own.
            self._request_dict.setdefault(HEADER_COPY, uuid.uuid4().hex)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        """Fail the attempt when the child was killed for its hard limit."""
        try:
            if not soft:
                self._report_lost(TimeLimitExceeded(timeout))
        finally:
            super().on_timeout(soft, timeout)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        """Fail the attempt when the child running it was lost."""
        exc = exc_info.exception
        exc = getattr(exc, "exc", exc)  # billiard's ExceptionWithTraceback
        cancelled = getattr(self, "_already_cancelled", False) or getattr(
            self, "_already_revoked", False
        )
        try:
            # Celery treats a child's SystemExit as a lost worker unless the
            # worker itself cancelled or revoked the task.
            if isinstance(exc, WorkerLostError) or (
                isinstance(exc, SystemExit | KeyboardInterrupt) and not cancelled
            ):
                self._report_lost(exc)
        finally:
            super().on_failure(exc_info, send_failed_event, return_ok)

    def _report_lost(self, reason: BaseException) -> None:
        task = self.task
        if not isinstance(task, HandlerTask):
            return
        try:
            lease = _lease(self._request_dict.get, self.args)
        except Exception:  # a message that was never a drain's
            return
        if lease is not None:
            task.lost(lease, reason)


def request_class(base: Any) -> type[HandlerRequest]:
    """The Request class for a handler whose base task uses ``base``.

    A base with its own Request class keeps it, under ours.
    """
    cls = _resolve(base)
    if issubclass(cls, HandlerRequest):
        return cls
    if cls is Request:
        return HandlerRequest
    return type(f"Outbox{cls.__name__}", (HandlerRequest, cls), {})


def _resolve(cls: Any) -> type:
    resolved = symbol_by_name(cls) if isinstance(cls, str) else cls
    if not (isinstance(resolved, type) and issubclass(resolved, Request)):
        raise TypeError(f"expected a Celery Request class, got {cls!r}")
    return resolved


def _lease(header: Callable[[str], Any], args: Any) -> Lease | None:
    """The lease a handler message carries in its headers and first argument."""
    token = header(HEADER_LEASE)
    if token is None or not args:
        return None
    deadline = int(header(HEADER_DEADLINE) or 0)
    resent = bool(header(HEADER_RESENT))
    copy = header(HEADER_COPY)
    return Lease(
        _event(args[0]),
        str(token),
        deadline,
        0,
        resent=resent,
        copy=None if copy is None else str(copy),
    )


def _header(request: Any, name: str) -> Any:
    # Celery 5 puts custom message headers in request.headers and also sets
    # them as request attributes; read either.
    headers = getattr(request, "headers", None) or {}
    value = headers.get(name)
    return getattr(request, name, None) if value is None else value


def _event(value: Any) -> Event:
    return value if isinstance(value, Event) else Event.from_dict(value)


def _delay_ms(when: Any) -> int | None:
    """The retry delay in ms from a Retry's ``when`` (seconds or a datetime)."""
    if isinstance(when, datetime):
        moment = when if when.tzinfo else when.replace(tzinfo=UTC)
        return max(0, round((moment - datetime.now(UTC)).total_seconds() * 1000))
    if isinstance(when, numbers.Real) and not isinstance(when, bool):
        return max(0, round(float(when) * 1000))
    return None


def wrap(fn: Callable[..., Any], *, bind: bool) -> Callable[..., Any]:
    """Wrap a handler so it receives an :class:`Event` instead of a dict.

    Calling the task directly with an :class:`Event` works too, for tests.
    """
    if bind:

        @functools.wraps(fn)
        def bound(self: Any, event: Any) -> Any:
            return fn(self, _event(event))

        bound.__signature__ = _signature(bind=True)  # type: ignore[attr-defined]
        return bound

    @functools.wraps(fn)
    def plain(event: Any) -> Any:
        return fn(_event(event))

    plain.__signature__ = _signature(bind=False)  # type: ignore[attr-defined]
    return plain


def _signature(*, bind: bool) -> inspect.Signature:
    # Celery checks call arguments against the signature; ours is fixed.
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("event", kind)]
    if bind:
        params.insert(0, inspect.Parameter("self", kind))
    return inspect.Signature(params)
