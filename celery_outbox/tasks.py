"""The outbox's Celery tasks: the beat drain, and handler registration.

The drain claims a batch of due events and dispatches one handler task per
event: no ETA or countdown (retries wait in DynamoDB), a task id naming the
event and attempt, and the event's id and type in the message headers so
Flower and logs show which event a task serves.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.utils.log import get_task_logger

from celery_outbox import checks, handlers, management, nudge, redaction
from celery_outbox.errors import HandlerError, OutboxError
from celery_outbox.event import Lease
from celery_outbox.store import Outcome

if TYPE_CHECKING:
    from celery_outbox.outbox import Outbox

__all__ = [
    "dispatch",
    "dispatch_all",
    "drain",
    "install",
    "register_handler",
    "task_id",
]

logger = get_task_logger("celery_outbox.drain")

DRAIN_TASK = "celery_outbox.drain"
BEAT_ENTRY = "celery_outbox.drain"
MIN_DRAIN_EXPIRES_S = 1.0
# A drain's messages all go in the one flush at the end of its publish
# batch: an automatic flush part-way through would fail alone, after the
# leases it carried were counted as dispatched. The bound only has to exceed
# the broker commands of a drain (a few per message).
_PUBLISH_BATCH_MAX = 1 << 30


def task_id(lease: Lease) -> str:
    """The Celery task id of one attempt: ``outbox:<event id>:<attempt>``.

    After an operator retried the failed event, attempts count from 1 again;
    ``:retry<n>`` after the n-th such retry keeps their ids apart from the
    earlier ones', so Flower and a result backend keep the failed runs.
    """
    event = lease.event
    again = f":retry{event.operator_retries}" if event.operator_retries else ""
    return f"outbox:{event.id}:{event.attempt}{again}"


def install(outbox: Outbox) -> None:
    """Register the drain task, its beat entry and the start-up checks."""
    app = outbox.app

    @app.task(name=DRAIN_TASK, ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def drain_task() -> dict[str, int]:
        return drain(outbox)

    outbox.drain_task = drain_task
    management.register(outbox)
    checks.install(outbox)

    def schedule_drain(sender: Any = None, **kwargs: Any) -> None:
        schedule = app.conf.beat_schedule or {}
        if any(entry.get("task") == DRAIN_TASK for entry in schedule.values()):
            return  # the user scheduled it; their entry wins
        interval_s = outbox.config.poll_interval_ms / 1000
        app.add_periodic_task(
            interval_s,
            drain_task.s(),
            name=BEAT_ENTRY,
            # A drain that waited a whole interval is superseded by the next
            # one: let it expire instead of piling up behind busy workers.
            # Never under a second, so that a small clock difference between
            # beat and the workers does not expire every drain.
            expires=max(interval_s, MIN_DRAIN_EXPIRES_S),
        )

    if app.configured:
        schedule_drain()
    else:
        app.on_after_configure.connect(schedule_drain, weak=False)


def register_handler(
    outbox: Outbox, event_type: str, fn: Callable[..., Any], options: dict[str, Any]
) -> Any:
    """Create the Celery task that handles ``event_type`` with ``fn``.

    ``options`` are Celery's task options. A ``base`` class is combined with
    :class:`~celery_outbox.handlers.HandlerTask`, whose hooks run first and
    then call the base's.
    """
    options = dict(options)
    if options.get("retry_on_worker_lost"):
        raise HandlerError(
            f"handler for {event_type!r}: retry_on_worker_lost would resend the "
            "task with an ETA; the outbox's lease brings back the event of a "
            "lost worker, so leave the option unset"
        )
    base = options.pop("base", None) or outbox.app.Task
    if not (isinstance(base, type) and issubclass(base, Task)):
        raise HandlerError(
            f"handler for {event_type!r}: base must be a Celery Task class, "
            f"got {base!r}"
        )
    bases: tuple[type, ...] = (
        (base,)
        if issubclass(base, handlers.HandlerTask)
        else (handlers.HandlerTask, base)
    )
    attrs: dict[str, Any] = {
        "outbox": outbox,
        "event_type": event_type,
        "__module__": fn.__module__,
    }
    # HandlerTask comes first in the bases and would hide a retry limit or
    # delay that the user's base class sets on purpose.
    for name in ("max_retries", "default_retry_delay"):
        if getattr(base, name) != getattr(Task, name):
            attrs[name] = getattr(base, name)
    # Celery's main process reports a child lost mid-task through the
    # task's Request class; the outbox's fails the attempt at once.
    attrs["Request"] = handlers.request_class(getattr(base, "Request", None))
    base_cls = type(f"{fn.__name__}_handler", bases, attrs)
    options.setdefault("ignore_result", True)
    # A handler belongs to this outbox's app; Celery's default (shared)
    # would copy it into every app created later in the process.
    options.setdefault("shared", False)
    bind = bool(options.pop("bind", False))
    wrapped = handlers.wrap(fn, bind=bind)
    return outbox.app.task(base=base_cls, bind=bind, **options)(wrapped)


def drain(outbox: Outbox) -> dict[str, int]:
    """Claim due events and dispatch them; return what was done.

    Drains running at once are safe, since every claim is a conditional
    write, but they race for the same oldest events and the losers' writes
    are wasted. Within one process (a threads pool runs several drains side
    by side when beat's interval is shorter than a drain) a drain that finds
    another one running returns at once; across processes the claims'
    conditions settle it.

    When DynamoDB fails a drain (after botocore's own retries), drains in
    this process pause, twice as long after each failure in a row, up to
    ``max_error_backoff_ms``; the failure is logged, not raised, so a
    DynamoDB outage gives one warning per pause instead of a traceback
    per beat tick.
    """
    if time.monotonic() < outbox.drain_paused_until:
        return _empty_summary(paused=1)
    if not outbox.drain_lock.acquire(blocking=False):
        logger.debug(
            "Skipped a drain of %r: another drain is running in this process",
            outbox.config.table_name,
        )
        return _empty_summary(busy=1)
    try:
        summary = _drain(outbox)
    except OutboxError as exc:
        return _pause(outbox, exc)
    finally:
        outbox.drain_lock.release()
    outbox.drain_errors = 0
    return summary


_SUMMARY_KEYS = (
    "claimed", "skipped", "dispatched", "failed", "released", "held", "busy",
    "paused",
)  # fmt: skip


def _empty_summary(**counts: int) -> dict[str, int]:
    return dict.fromkeys(_SUMMARY_KEYS, 0) | counts


def _pause(outbox: Outbox, exc: OutboxError) -> dict[str, int]:
    config = outbox.config
    outbox.drain_errors += 1
    pause_ms = min(
        config.max_error_backoff_ms,
        config.poll_interval_ms * 2 ** min(outbox.drain_errors, 30),
    )
    outbox.drain_paused_until = time.monotonic() + pause_ms / 1000
    logger.warning(
        "Drain of outbox %r failed (%d in a row): %s; drains in this process "
        "pause for %d ms",
        config.table_name,
        outbox.drain_errors,
        exc,
        pause_ms,
    )
    return _empty_summary(paused=1)


def _drain(outbox: Outbox) -> dict[str, int]:
    result = outbox.writer.claim()  # by write_mode (writeback.py)
    nudge.after_claim(outbox, len(result.leases))  # the next drain, if busy
    leases = result.leases
    dispatched = failed = released = held = 0
    for outcome in dispatch_all(outbox, leases):
        if outcome == "dispatched":
            dispatched += 1
        elif outcome == "failed":
            failed += 1
        elif outcome == "held":
            held += 1
        else:
            released += 1
    summary = {
        "claimed": len(leases),
        "skipped": result.skipped,
        "dispatched": dispatched,
        "failed": failed + result.exhausted,
        "released": released,
        "held": held,
        "busy": 0,
        "paused": 0,
    }
    if leases or result.skipped or result.exhausted:
        logger.info(
            "Drained outbox %r: claimed %d, skipped %d, dispatched %d, failed %d",
            outbox.config.table_name,
            len(leases),
            result.skipped,
            dispatched,
            summary["failed"],
        )
    return summary


def dispatch_all(outbox: Outbox, leases: Sequence[Lease]) -> list[str]:
    """:func:`dispatch` each lease in turn; return each one's outcome.

    The messages share one producer instead of taking one from the pool
    each, and where kombu can batch publishes (5.7 and later, on Redis)
    they reach the broker in one pipelined write at the end: a publish is
    then about half the CPU, since kombu's Redis transport otherwise builds
    a client and makes a round trip for every message. When that write
    fails, whether each message arrived is unknown, so every lease it
    carried is released, as for a refused send: a copy that did arrive
    finds its lease gone when it starts, and skips itself.
    """
    if not leases:
        return []
    app = outbox.app
    if app.conf.task_always_eager:  # nothing is published: no producer
        return [dispatch(outbox, lease) for lease in leases]
    with contextlib.ExitStack() as stack:
        try:
            producer = stack.enter_context(app.producer_or_acquire())
        except Exception:
            # Nothing to share: each send takes its own producer and fails
            # (releasing its lease) or succeeds on its own, as without one.
            producer = None
        batch = getattr(producer, "batch", None)
        if batch is None:
            outcomes = [dispatch(outbox, lease, producer=producer) for lease in leases]
        else:
            outcomes = _dispatch_batch(outbox, leases, producer, batch)
    return outcomes


def _dispatch_batch(
    outbox: Outbox, leases: Sequence[Lease], producer: Any, batch: Any
) -> list[str]:
    """Dispatch in one kombu publish batch; release its leases if it fails."""
    outcomes: list[str] = []
    error: Exception | None = None
    try:
        with batch(max_size=_PUBLISH_BATCH_MAX):
            for lease in leases:
                try:
                    outcomes.append(dispatch(outbox, lease, producer=producer))
                except Exception as exc:
                    # DynamoDB failed a write-back: still send what was
                    # dispatched so far, as unbatched sends would have.
                    error = exc
                    break
    except Exception as exc:  # the batch's write to the broker failed
        sent = [i for i, outcome in enumerate(outcomes) if outcome == "dispatched"]
        logger.warning(
            "Could not send %d handler messages to the broker (%s); %s",
            len(sent),
            exc,
            _GIVE_BACK[_holds(outbox)],
        )
        for index in sent:
            outcomes[index] = _give_back(outbox, leases[index])
    if error is not None:
        raise error
    return outcomes


def dispatch(outbox: Outbox, lease: Lease, *, producer: Any = None) -> str:
    """Send the handler task for one leased event.

    Returns ``dispatched``, ``failed`` (no handler for its type),
    ``released`` (the broker refused the message; the event is due again
    without losing an attempt) or ``held`` (the same, once the lease
    expires: see :func:`_give_back`). ``producer``: a kombu producer to send
    with, instead of one taken from the app's pool for this message.
    """
    event = lease.event
    task = outbox.handlers.get(event.type)
    if task is None:
        error = HandlerError(
            f"no handler is registered for event type {event.type!r}; deploy one "
            "and retry the event"
        )
        if outbox.store.fail(lease, error, final=True) is not Outcome.STALE:
            logger.warning(
                "Event %r (%s) attempt %d failed: %s",
                event.id,
                event.type,
                event.attempt,
                error,
            )
        return "failed"
    args = [event.as_dict()]
    headers = {
        handlers.HEADER_EVENT_ID: event.id,
        handlers.HEADER_EVENT_TYPE: event.type,
        handlers.HEADER_ATTEMPT: event.attempt,
        handlers.HEADER_LEASE: lease.token,
        handlers.HEADER_DEADLINE: lease.deadline_ms,
    }
    if lease.resent:
        headers[handlers.HEADER_RESENT] = 1
    try:
        task.apply_async(
            args=args,
            task_id=task_id(lease),
            # Flower and the worker's log show these instead of the payload.
            argsrepr=redaction.task_argsrepr(
                event, outbox.config.payload_repr, outbox.config.payload_repr_chars
            ),
            kwargsrepr="{}",
            headers=headers,
            # Celery's retry counter: autoretry backoff and handlers that
            # read self.request.retries count the outbox's failed attempts.
            retries=lease.retry_count,
            **_routing(outbox, task, args),
            **({} if producer is None else {"producer": producer}),
        )
    except Exception as exc:  # any broker error: give the lease back
        logger.warning(
            "Could not dispatch event %r (%s): %s; %s",
            event.id,
            event.type,
            exc,
            _GIVE_BACK[_holds(outbox)],
        )
        return _give_back(outbox, lease)
    return "dispatched"


_GIVE_BACK = {
    False: "releasing the events for the next drain",
    True: "their leases will expire and the events be sent again",
}


def _holds(outbox: Outbox) -> bool:
    # Whether a handler may start before its start mark is written
    # (HandlerTask.may_defer), by the write mode's writer.
    return outbox.writer.defers_starts


def _give_back(outbox: Outbox, lease: Lease) -> str:
    """Undo a dispatch whose send failed: ``released`` or ``held``.

    A failed send may still have reached the broker. Where every handler
    start is a conditional write, a copy that arrived finds its lease gone
    and skips itself, so the lease is released and the event is due now.
    Where a start may be deferred (``partiql``), such a copy would run
    without that check beside the event's next lease; the lease is held
    instead, and its expiry sends the event again (as for a lost message,
    without using an attempt), whichever copy arrived.
    """
    if _holds(outbox):
        return "held"
    outbox.store.release(lease)
    return "released"


def _routing(outbox: Outbox, task: Any, args: list[Any]) -> dict[str, Any]:
    """``queue=handler_queue`` for a handler that nothing else routes.

    A ``queue`` task option or a ``task_routes`` entry for the handler wins,
    as Celery's routing rules say.
    """
    queue = outbox.config.handler_queue
    if queue is None or getattr(task, "queue", None):
        return {}
    router = outbox.app.amqp.router
    if router.routes and router.lookup_route(task.name, args, {}, {}, None):
        return {}
    return {"queue": queue}
