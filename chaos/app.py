"""The Celery app every chaos process loads: workers, beats, drainer, emitter.

Its settings come from ``CHAOS_*`` environment variables set by
``chaos/run.py``. Importing it installs the DynamoDB fault injector on
boto3's default session, so every client the outbox makes in this process
(and in its prefork children) meets the faults.

Handlers record each invocation: ``begin`` before the lease is marked
started, ``start`` when the body begins, ``end``
when it returns or raises, ``wb`` with the write-back's outcome (or its
error), ``skip`` when a message was not run: its lease had been reclaimed
or written back, or another copy of it had started.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any

import boto3
from celery import Celery
from celery.exceptions import Ignore
from celery.signals import task_prerun, task_success

from celery_outbox import Lease, Outbox
from celery_outbox.handlers import HandlerTask
from celery_outbox.store import Outcome, wall_clock_ms
from chaos.faults import FaultInjector
from chaos.record import Recorder

__all__ = ["EVENT_TYPES", "HANDLER_QUEUE", "app", "outbox", "record"]

HANDLER_QUEUE = os.environ.get("CHAOS_HANDLER_QUEUE") or None
"""None: handler messages share the drain's queue (the library's default)."""
EVENT_TYPES = ("chaos.work", "chaos.flaky", "chaos.poison")
"""Work that succeeds; fails on its first attempt only; always fails."""


def _env(name: str, default: str) -> str:
    return os.environ.get(f"CHAOS_{name}", default)


record = Recorder(_env("DIR", "."), _env("ROLE", "process"))
SKEW_MS = int(_env("SKEW_MS", "0"))
WORK_MS = int(_env("WORK_MS", "20"))

_faults = FaultInjector(float(_env("FAULT_RATE", "0")), record)
boto3.setup_default_session()
assert boto3.DEFAULT_SESSION is not None  # just set up
_faults.install(boto3.DEFAULT_SESSION.events)


def skewed_clock() -> int:
    """This process's idea of the time: the wall clock plus ``CHAOS_SKEW_MS``."""
    return wall_clock_ms() + SKEW_MS


app = Celery("chaos", broker=_env("BROKER", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_default_queue="chaos",
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    outbox_table_name=_env("TABLE", "chaos-outbox"),
    outbox_endpoint_url=_env("ENDPOINT", "http://127.0.0.1:8000"),
    outbox_region_name="us-east-1",
    outbox_processing_timeout_ms=int(_env("TIMEOUT_MS", "8000")),
    outbox_poll_interval_ms=int(_env("POLL_MS", "500")),
    outbox_batch_size=int(_env("BATCH", "25")),
    outbox_max_retries=int(_env("MAX_RETRIES", "5")),
    outbox_base_backoff_ms=200,
    outbox_max_backoff_ms=2000,
    outbox_completion="keep",
    outbox_handler_queue=HANDLER_QUEUE,
    outbox_write_mode=_env("WRITE_MODE", "item"),
)
outbox = Outbox(app, clock=skewed_clock if SKEW_MS else None)


class ChaosTask(HandlerTask):
    """A handler task that records its write-backs and skipped messages."""

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        lease = self.lease_of(args)
        if lease is not None:
            # Taken before the start is written: the lease it renews lasts at
            # least the processing timeout from here. A deferred start renews
            # it later, if at all: until then the claim's deadline holds.
            record(
                "begin",
                id=lease.event.id,
                token=lease.token,
                deferred=self.may_defer(lease),
            )
        try:
            super().before_start(task_id, args, kwargs)
        except Ignore:
            lease = self.lease_of(args)
            if lease is not None:
                record("skip", id=lease.event.id, token=lease.token)
            raise

    def _write_back(
        self, lease: Lease, what: str, write: Callable[[Lease], Outcome | None]
    ) -> Outcome | None:
        # HandlerTask's one door to DynamoDB after the body: its outcome is
        # None when the write failed (and was logged), or when the write
        # was buffered (partiql mode), to be written by the flusher.
        buffered = False

        def tracked(lease: Lease) -> Outcome | None:
            nonlocal buffered
            result = write(lease)
            buffered = result is None
            return result

        outcome = super()._write_back(lease, what, tracked)
        fields: dict[str, Any] = {"id": lease.event.id, "token": lease.token}
        if outcome is not None:
            fields["outcome"] = outcome.value
        elif buffered:
            fields["outcome"] = "buffered"
        else:
            fields["error"] = "the write-back failed"
        record("wb", what=what, **fields)
        return outcome


def _handler(event_type: str) -> Any:
    rng = random.Random()

    def handle(task: Any, event: Any) -> None:
        lease = task.lease_of(task.request.args)
        token = None if lease is None else lease.token
        deadline = None if lease is None else lease.deadline_ms
        record(
            "start",
            id=event.id,
            type=event.type,
            attempt=event.attempt,
            token=token,
            deadline=deadline,
        )
        # Stands in for the handler's own work: a kill may land in it.
        time.sleep(rng.uniform(0, WORK_MS) / 1000)
        fails = event.type == "chaos.poison" or (
            event.type == "chaos.flaky" and event.attempt == 1
        )
        record("end", id=event.id, token=token, ok=not fails)
        if fails:
            raise RuntimeError(f"planned failure of {event.type} #{event.attempt}")

    handle.__name__ = event_type.replace(".", "_")
    handle.__qualname__ = handle.__name__
    return outbox.handler(event_type, base=ChaosTask, bind=True)(handle)


handlers = {event_type: _handler(event_type) for event_type in EVENT_TYPES}


_drain_started: dict[str, float] = {}


@task_prerun.connect(weak=False)  # type: ignore[untyped-decorator]
def _drain_starts(sender: Any = None, task_id: str = "", **kwargs: Any) -> None:
    if sender is not None and sender.name == "celery_outbox.drain":
        _drain_started[task_id] = time.monotonic()


@task_success.connect(weak=False)  # type: ignore[untyped-decorator]
def _drained(sender: Any = None, result: Any = None, **kwargs: Any) -> None:
    if sender is not None and sender.name == "celery_outbox.drain":
        began = _drain_started.pop(sender.request.id, None)
        took_ms = None if began is None else round((time.monotonic() - began) * 1000)
        record("drain", by="beat", took_ms=took_ms, **(result or {}))
