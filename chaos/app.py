"""The Celery app every chaos process loads: workers, beats, drainer, emitter.

Its settings come from ``CHAOS_*`` environment variables set by
``chaos/run.py``. Importing it installs the DynamoDB fault injector on
boto3's default session, so every client the outbox makes in this process
(and in its prefork children) meets the faults.

Handlers record each invocation: ``start`` when the body begins, ``end``
when it returns or raises, ``wb`` once the write-back returned, ``skip``
when a message arrived after its lease had expired.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import boto3
from celery import Celery
from celery.exceptions import Ignore
from celery.signals import task_success

from celery_outbox import Outbox
from celery_outbox.handlers import HandlerTask
from celery_outbox.store import wall_clock_ms
from chaos.faults import FaultInjector
from chaos.record import Recorder

__all__ = ["EVENT_TYPES", "HANDLER_QUEUE", "app", "outbox", "record"]

HANDLER_QUEUE = "chaos-handlers"
EVENT_TYPES = ("chaos.work", "chaos.flaky", "chaos.poison")
"""Work that succeeds; fails on its first attempt only; always fails."""


def _env(name: str, default: str) -> str:
    return os.environ.get(f"CHAOS_{name}", default)


record = Recorder(_env("DIR", "."), _env("ROLE", "process"))
SKEW_MS = int(_env("SKEW_MS", "0"))
WORK_MS = int(_env("WORK_MS", "20"))

_faults = FaultInjector(float(_env("FAULT_RATE", "0")), record)
boto3.setup_default_session()
_faults.install(boto3.DEFAULT_SESSION.events)


def skewed_clock() -> int:
    """This process's idea of the time: the wall clock plus ``CHAOS_SKEW_MS``."""
    return wall_clock_ms() + SKEW_MS


app = Celery("chaos", broker=_env("BROKER", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_default_queue="chaos",
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
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
)
outbox = Outbox(app, clock=skewed_clock if SKEW_MS else None)


class ChaosTask(HandlerTask):
    """A handler task that records its write-backs and skipped messages."""

    abstract = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Ignore:
            lease = self.lease_of(args)
            if lease is not None:
                record("skip", id=lease.event.id, token=lease.token)
            raise

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        self._recorded("complete", super().on_success, retval, task_id, args, kwargs)

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        if isinstance(exc, Ignore):
            return
        self._recorded("fail", super().on_failure, exc, task_id, args, kwargs, einfo)

    def _recorded(self, what: str, write: Any, *args: Any) -> None:
        lease = self.lease_of(args[2])
        token = None if lease is None else lease.token
        event_id = None if lease is None else lease.event.id
        try:
            write(*args)
        except Exception as exc:
            record("wb", id=event_id, token=token, what=what, error=repr(exc))
            raise
        record("wb", id=event_id, token=token, what=what)


def _handler(event_type: str) -> Any:
    rng = random.Random()

    def handle(task: Any, event: Any) -> None:
        lease = task.lease_of(task.request.args)
        token = None if lease is None else lease.token
        deadline = None if lease is None else lease.deadline_ms
        record(
            "start", id=event.id, type=event.type, attempt=event.attempt,
            token=token, deadline=deadline,
        )
        # Stands in for the handler's own work: a kill may land in it.
        time.sleep(rng.uniform(0, WORK_MS) / 1000)
        fails = event.type == "chaos.poison" or (
            event.type == "chaos.flaky" and event.attempt == 1
        )
        record("end", id=event.id, token=token, ok=not fails)
        if fails:
            raise RuntimeError(f"planned failure of {event.type} attempt {event.attempt}")

    handle.__name__ = event_type.replace(".", "_")
    handle.__qualname__ = handle.__name__
    return outbox.handler(event_type, base=ChaosTask, bind=True)(handle)


handlers = {event_type: _handler(event_type) for event_type in EVENT_TYPES}


@task_success.connect(weak=False)
def _drained(sender: Any = None, result: Any = None, **kwargs: Any) -> None:
    if sender is not None and sender.name == "celery_outbox.drain":
        record("drain", by="beat", **(result or {}))
