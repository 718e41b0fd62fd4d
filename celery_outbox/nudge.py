"""Drains sooner than the next beat tick: the nudge, and follow-up drains.

**The nudge** (``nudge = True``): once an emit's write or transaction has
committed, the producer asks for a drain at once. A thread of the producer
process sends the message, so the emit does not wait on the broker, and
sends at most one every :data:`DEBOUNCE_S` (a burst of emits costs one or
two). The nudge names the events just committed, so the worker claims them
by key, conditionally, without reading the index: one request, then the
dispatch. A nudge is a hint and is safe to lose: it is sent without broker
retries and expires after a poll interval; beat still drains.

**Follow-ups** (``busy_poll_interval_ms``, on by default): a drain started by
beat that claimed events starts a short chain of drains
(:data:`FOLLOW_UP_TASK`) for the rest of the poll interval: the next one at
once after a full batch, or after ``busy_poll_interval_ms`` after a partial
one; a drain that claims nothing ends the chain. Each chain ends before the
next beat tick starts another, so at most about two run at a time. A
follow-up is queued as soon as the claim is done, just ahead of the handler
tasks of that batch: the next claim overlaps their run, and claiming keeps
pace with what the workers take (about one batch per chain waits in the
broker). A nudged drain never starts a chain: nudges come from every
producer and would multiply them.
"""

from __future__ import annotations

import contextvars
import os
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from celery import current_task
from celery.utils.log import get_logger

from celery_outbox.event import Event
from celery_outbox.store import wall_clock_ms

if TYPE_CHECKING:
    from celery_outbox.outbox import Outbox

__all__ = [
    "DEBOUNCE_S",
    "FOLLOW_UP_TASK",
    "HEADER_NUDGE",
    "NUDGE_TASK",
    "Nudger",
    "after_claim",
    "drain_emitted",
    "drain_more",
    "follow_up",
    "install",
]

logger = get_logger(__name__)

DEBOUNCE_S = 0.02
"""The least time between two nudges from one process."""

MAX_EVENTS = 100
"""Events one nudge names at most; beyond that it is a plain drain."""

MAX_BYTES = 64 * 1024
"""Payload bytes one nudge carries at most; beyond that it is a plain drain."""

NUDGE_TASK = "celery_outbox.claim_emitted"
"""The task a nudge sends: claim and dispatch the events it names."""

FOLLOW_UP_TASK = "celery_outbox.drain_more"
"""A follow-up drain; its argument is when its chain ends (epoch ms)."""

BUSY_RETRY_MS = 20
"""How soon a follow-up that found this process's drain lock taken retries."""

HEADER_NUDGE = "outbox_nudge"
"""Set on drains sent by a nudge."""


class Nudger:
    """Sends debounced nudges from one producer process.

    A nudge names the events committed since the last one (up to
    :data:`MAX_EVENTS` of them, :data:`MAX_BYTES` in all), so the worker
    claims exactly those, without reading the index. When there are more,
    or none are known, it is a plain drain.

    Args:
        outbox: an outbox installed in a Celery app (it sends the tasks).
    """

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._overflow = False
        self.sent = 0

    def __repr__(self) -> str:
        return f"<Nudger sent={self.sent}>"

    def poke(self, events: Sequence[Event] = ()) -> None:
        """Ask for ``events`` (or any due events) to be drained soon."""
        with self._lock:
            if self._thread is None or self._pid != os.getpid():
                # A thread does not survive fork: each process starts its own.
                self._pid = os.getpid()
                self._events, self._overflow = [], False
                self._thread = threading.Thread(
                    target=self._run, name="outbox-nudge", daemon=True
                )
                self._thread.start()
            if not events or len(self._events) + len(events) > MAX_EVENTS:
                self._overflow = True
            else:
                self._events.extend(events)
        self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            with self._lock:
                events, self._events = self._events, []
                overflow, self._overflow = self._overflow, False
            self.send(None if overflow else events)
            time.sleep(DEBOUNCE_S)

    def send(self, events: Sequence[Event] | None) -> bool:
        """Send one nudge now; False when the broker refused it.

        With ``events`` the worker claims those; with None it drains.
        """
        named = [e.as_dict() for e in events or ()]
        size = sum(len(repr(e["payload"])) for e in named)
        args: tuple[Any, ...] = ()
        if events is None or size > MAX_BYTES:
            task = self.outbox.drain_task
        else:
            task, args = _nudge_tasks[id(self.outbox)], (named,)
        try:
            task.apply_async(
                args,
                headers={HEADER_NUDGE: True},
                expires=self.outbox.config.poll_interval_ms / 1000,
                retry=False,
            )
        except Exception as exc:  # any broker error: a nudge is only a hint
            logger.debug("Could not send a nudge: %s", exc)
            return False
        self.sent += 1
        return True


def install(outbox: Outbox) -> None:
    """Register the tasks of nudges and follow-ups in the outbox's app."""

    @outbox.app.task(  # type: ignore[untyped-decorator]
        name=NUDGE_TASK, ignore_result=True, shared=False
    )
    def claim_emitted(events: list[dict[str, Any]]) -> dict[str, int]:
        return drain_emitted(outbox, events)

    @outbox.app.task(  # type: ignore[untyped-decorator]
        name=FOLLOW_UP_TASK, ignore_result=True, shared=False
    )
    def follow_up_drain(until: int) -> dict[str, int]:
        return drain_more(outbox, until)

    _nudge_tasks[id(outbox)] = claim_emitted
    _follow_up_tasks[id(outbox)] = follow_up_drain


def drain_emitted(outbox: Outbox, events: list[dict[str, Any]]) -> dict[str, int]:
    """Claim the events an emit just wrote, and dispatch them.

    Each claim requires the event to be still ``created``, due and never
    tried (``retryCount`` 0): one a drain got to first is skipped.
    """
    from celery_outbox import tasks

    items = [Event.from_dict(e).to_item(0) for e in events]
    result = outbox.writer.claim_items(items)
    outcomes = tasks.dispatch_all(outbox, result.leases)
    return {
        "claimed": len(result.leases),
        "skipped": result.skipped,
        "dispatched": outcomes.count("dispatched"),
    }


_nudge_tasks: dict[int, Any] = {}


def follow_up(
    outbox: Outbox, claimed: int, *, until_ms: int | None, nudged: bool, now_ms: int
) -> tuple[float, int] | None:
    """Whether a drain that claimed ``claimed`` events is followed by another.

    ``until_ms`` is the end of the drain's chain (None: the drain starts one),
    ``nudged`` marks a drain sent by a nudge. Returns ``(countdown_s,
    chain_end_ms)`` for the next drain, or None.
    """
    config = outbox.config
    busy_ms = config.busy_poll_interval_ms
    if busy_ms == 0 or claimed <= 0 or nudged:
        return None
    until = now_ms + config.poll_interval_ms if until_ms is None else until_ms
    delay_ms = 0 if claimed >= config.batch_size else busy_ms
    if now_ms + delay_ms >= until:
        return None
    return delay_ms / 1000, until


_chain_end: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "celery_outbox_chain_end", default=None
)


def after_claim(outbox: Outbox, claimed: int) -> None:
    """Send the next drain of the chain, if any, before this one dispatches.

    Called by the drain once its claim is done: the follow-up then queues
    ahead of this batch's handler tasks, so the next claim overlaps their
    run, while at most about one batch per chain waits in the broker.
    """
    until = _chain_end.get()
    nudged = False
    if until is None:
        task = current_task  # a proxy: false outside a task
        if (
            not task
            or task.request.called_directly
            or (task.name != getattr(outbox.drain_task, "name", None))
        ):
            return  # a drain called in-process (tests, the CLI) starts no chain
        nudged = bool(_header(task.request, HEADER_NUDGE))
    plan = follow_up(
        outbox, claimed, until_ms=until, nudged=nudged, now_ms=wall_clock_ms()
    )
    if plan is not None:
        _send_follow_up(outbox, *plan)


def _send_follow_up(outbox: Outbox, countdown_s: float, until: int) -> None:
    try:
        _follow_up_tasks[id(outbox)].apply_async(
            (until,),
            countdown=countdown_s or None,
            expires=max(0.001, (until - wall_clock_ms()) / 1000),
        )
    except Exception as exc:  # beat drains anyway
        logger.warning("Could not send a follow-up drain: %s", exc)


def drain_more(outbox: Outbox, until: int) -> dict[str, int]:
    """A follow-up drain: the outbox's drain, as part of a chain ending at ``until``.

    When another drain of this process holds the drain lock (the one that
    sent this follow-up may still be dispatching), it comes back shortly
    rather than ending the chain.
    """
    from celery_outbox import tasks

    token = _chain_end.set(until)
    try:
        summary = tasks.drain(outbox)
    finally:
        _chain_end.reset(token)
    if summary.get("busy") and wall_clock_ms() + BUSY_RETRY_MS < until:
        _send_follow_up(outbox, BUSY_RETRY_MS / 1000, until)
    return summary


_follow_up_tasks: dict[int, Any] = {}


def _header(request: Any, name: str) -> Any:
    # Custom headers appear as request attributes, or under request.headers.
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value
