"""Handlers: the Celery tasks that run events, and their write-back callbacks.

``@outbox.handler("order.created")`` registers an ordinary Celery task whose
base class is :class:`HandlerTask`. The drain sends it one message per
claimed event; the task's ``on_success`` and ``on_failure`` hooks, which
Celery runs in the worker right after the task body, write the outcome back
to DynamoDB under the lease the drain took. A worker that dies mid-task runs
neither hook: the lease deadline brings the event back.

Celery retries inside a handler (``self.retry()``, ``autoretry_for``) become
outbox retries: the retry waits in DynamoDB (its ``countdown``, or the outbox
backoff), never as an ETA message in the broker, and counts against the
outbox's ``max_retries``.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.exceptions import Ignore, Reject
from celery.utils.log import get_task_logger

from celery_outbox.event import Event, Lease
from celery_outbox.store import Outcome

if TYPE_CHECKING:
    from celery_outbox.outbox import Outbox

__all__ = ["HEADER_DEADLINE", "HEADER_LEASE", "HandlerTask", "OutboxRetry"]

logger = get_task_logger("celery_outbox.handlers")
_log = logging.getLogger("celery_outbox.handlers")

HEADER_EVENT_ID = "outbox_event_id"
HEADER_EVENT_TYPE = "outbox_event_type"
HEADER_ATTEMPT = "outbox_attempt"
HEADER_LEASE = "outbox_lease"
HEADER_DEADLINE = "outbox_deadline"


class OutboxRetry(Exception):
    """Raised by :meth:`HandlerTask.retry`: fail this attempt, retry later.

    Celery may pickle it between the pool and the worker, so it carries
    plain values only.

    Attributes:
        reason: the error that led to the retry, as ``Type: message``.
        countdown_s: the delay the handler asked for, or None for the
            outbox backoff.
    """

    def __init__(self, reason: str, countdown_s: float | None = None) -> None:
        super().__init__(reason, countdown_s)
        self.reason = reason
        self.countdown_s = countdown_s

    def __str__(self) -> str:
        return self.reason

    @classmethod
    def from_exception(
        cls, exc: BaseException | None, countdown_s: float | None
    ) -> OutboxRetry:
        """The retry for ``exc`` (None when the handler gave no exception)."""
        if exc is None:
            return cls("retry requested by the handler", countdown_s)
        return cls(f"{type(exc).__name__}: {exc}", countdown_s)


class HandlerTask(Task):  # type: ignore[misc]
    """Base class of outbox handler tasks: writes outcomes back to DynamoDB."""

    abstract = True
    # A requested retry is expected: Celery logs it without a traceback.
    throws = (OutboxRetry,)
    outbox: Outbox
    event_type: str

    def lease_of(self, args: tuple[Any, ...] | list[Any]) -> Lease | None:
        """The lease this execution runs under, from the message headers."""
        request = self.request
        token = _header(request, HEADER_LEASE)
        if token is None or not args:
            return None
        event = Event.from_dict(args[0])
        deadline = int(_header(request, HEADER_DEADLINE) or 0)
        return Lease(event, str(token), deadline, 0)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        lease = self.lease_of(args)
        if lease is not None and lease.deadline_ms and (
            self.outbox.store.clock() > lease.deadline_ms
        ):
            # The message waited in the broker past its lease; another drain
            # may already have reclaimed the event, so running it here could
            # run it twice. The expired lease brings it back either way.
            logger.warning(
                "Skipped event %r (attempt %d): its lease expired before the "
                "task started; it will be reclaimed",
                lease.event.id, lease.event.attempt,
            )
            raise Ignore()
        return super().__call__(*args, **kwargs)

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> OutboxRetry:
        """Fail this attempt so the outbox retries the event later.

        The retry waits in DynamoDB: ``countdown`` seconds when given,
        otherwise the outbox backoff. ``max_retries`` is the outbox's.
        """
        if self.request.called_directly:
            # Called outside a worker (tests, scripts): behave as Celery does.
            return super().retry(  # type: ignore[no-any-return]
                args, kwargs, exc, throw, eta, countdown, max_retries, **options
            )
        retry = OutboxRetry.from_exception(exc, countdown)
        if throw:
            raise retry
        return retry

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        """Complete the event under this execution's lease."""
        lease = self.lease_of(args)
        if lease is None:
            return
        outcome = self.outbox.store.complete(lease)
        if outcome is Outcome.COMPLETED:
            logger.debug("Completed event %r (%s)", lease.event.id, self.event_type)

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """Reschedule or fail the event under this execution's lease."""
        lease = self.lease_of(args)
        if lease is None or isinstance(exc, (Ignore, Reject)):
            return
        delay_ms = None
        error: str | BaseException = exc
        if isinstance(exc, OutboxRetry):
            error = exc.reason
            if exc.countdown_s is not None:
                delay_ms = max(0, round(exc.countdown_s * 1000))
        outcome = self.outbox.store.fail(lease, error, delay_ms=delay_ms)
        if outcome is Outcome.STALE:
            return
        logger.warning(
            "Event %r (%s) attempt %d failed: %s; %s",
            lease.event.id, self.event_type, lease.event.attempt,
            self.outbox.store.short_error(error),
            "no retries left, now failed" if outcome is Outcome.FAILED
            else "will be retried",
        )


def _header(request: Any, name: str) -> Any:
    # Custom message headers appear as request attributes and, depending on
    # the Celery version and protocol, under request.headers too.
    value = getattr(request, name, None)
    if value is None:
        headers = getattr(request, "headers", None) or {}
        value = headers.get(name)
    return value


def wrap(fn: Callable[..., Any], *, bind: bool) -> Callable[..., Any]:
    """Wrap a handler so it receives an :class:`Event` instead of a dict."""
    if bind:

        @functools.wraps(fn)
        def bound(self: Any, event: dict[str, Any]) -> Any:
            return fn(self, Event.from_dict(event))

        bound.__signature__ = _signature(fn, bind=True)  # type: ignore[attr-defined]
        return bound

    @functools.wraps(fn)
    def plain(event: dict[str, Any]) -> Any:
        return fn(Event.from_dict(event))

    plain.__signature__ = _signature(fn, bind=False)  # type: ignore[attr-defined]
    return plain


def _signature(fn: Callable[..., Any], *, bind: bool) -> inspect.Signature:
    # Celery checks call arguments against the signature; ours is fixed.
    params = [inspect.Parameter("event", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if bind:
        params.insert(0, inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD))
    return inspect.Signature(params)
