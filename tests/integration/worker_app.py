"""The Celery app that integration tests run in real worker processes.

Configured from ``OUTBOX_IT_*`` environment variables set by the test that
starts the worker. Every handler records each invocation in Redis (a list
per run, see :func:`record`), so tests can count how often each event ran,
with which attempt number, task id and pool process.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery, Task

from celery_outbox import Event, Outbox
from celery_outbox.handlers import HEADER_EVENT_ID

ENV = os.environ

app = Celery("outbox_it", broker=ENV.get("OUTBOX_IT_BROKER", "memory://"))
app.conf.update(
    task_default_queue=ENV.get("OUTBOX_IT_QUEUE", "outbox-it"),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    outbox_table_name=ENV.get("OUTBOX_IT_TABLE", "outbox-it"),
    outbox_endpoint_url=ENV.get("OUTBOX_IT_ENDPOINT"),
    outbox_completion="keep",
    outbox_poll_interval_ms=int(ENV.get("OUTBOX_IT_POLL_MS", "200")),
    outbox_processing_timeout_ms=int(ENV.get("OUTBOX_IT_TIMEOUT_MS", "30000")),
    outbox_base_backoff_ms=int(ENV.get("OUTBOX_IT_BACKOFF_MS", "500")),
    outbox_max_retries=int(ENV.get("OUTBOX_IT_MAX_RETRIES", "2")),
    outbox_write_mode=ENV.get("OUTBOX_IT_WRITE_MODE", "item"),
    outbox_flush_interval_ms=int(ENV.get("OUTBOX_IT_FLUSH_MS", "50")),
)
if "OUTBOX_IT_VISIBILITY_S" in ENV:
    visibility_s = int(ENV["OUTBOX_IT_VISIBILITY_S"])
    app.conf.broker_transport_options = {"visibility_timeout": visibility_s}
outbox = Outbox(app)

# A time limit under the lease, so the start-up checks pass.
LIMIT_S = max(1, int(ENV.get("OUTBOX_IT_TIMEOUT_MS", "30000")) // 1000 - 1)
_redis = redis.Redis.from_url(ENV.get("OUTBOX_IT_RECORD", "redis://127.0.0.1:6379/2"))
CALLS = ENV.get("OUTBOX_IT_PREFIX", "outbox-it") + ":calls"


def record(task: Task, event: Event, **extra: Any) -> None:
    """Append this invocation to the run's list of calls in Redis."""
    entry = {
        "id": event.id,
        "type": event.type,
        "attempt": event.attempt,
        "retries": task.request.retries,
        "task_id": task.request.id,
        "pid": os.getpid(),
        "at_ms": time.time_ns() // 1_000_000,
        "header_event_id": (task.request.headers or {}).get(HEADER_EVENT_ID),
        "attribute_event_id": getattr(task.request, HEADER_EVENT_ID, None),
        **extra,
    }
    _redis.rpush(CALLS, json.dumps(entry))


@outbox.handler("it.ok", bind=True, time_limit=LIMIT_S)
def ok(self: Task, event: Event) -> None:
    """Succeed at once."""
    record(self, event)


@outbox.handler("it.flaky", bind=True, time_limit=LIMIT_S)
def flaky(self: Task, event: Event) -> None:
    """Fail the first two attempts, then succeed."""
    record(self, event)
    if event.attempt <= 2:
        raise ConnectionError(f"flaky failure on attempt {event.attempt}")


@outbox.handler("it.broken", bind=True, time_limit=LIMIT_S)
def broken(self: Task, event: Event) -> None:
    """Fail every attempt."""
    record(self, event)
    raise ValueError(f"broken handler cannot take {event.payload['order']}")


@outbox.handler("it.retry", bind=True, time_limit=LIMIT_S)
def retrying(self: Task, event: Event) -> None:
    """Ask Celery for a retry on the first attempt, then succeed."""
    record(self, event)
    if event.attempt == 1:
        raise self.retry(exc=TimeoutError("gateway timeout"), countdown=0.3)


@outbox.handler(
    "it.autoretry",
    bind=True,
    time_limit=LIMIT_S,
    autoretry_for=(KeyError,),
    retry_backoff=True,
)
def autoretrying(self: Task, event: Event) -> None:
    """Fail with an autoretried error on the first attempt, then succeed."""
    record(self, event)
    if event.attempt == 1:
        raise KeyError("sku-1")


@outbox.handler("it.stuck", bind=True, time_limit=LIMIT_S)
def stuck(self: Task, event: Event) -> None:
    """On the first attempt, wait to be killed; later attempts succeed."""
    record(self, event)
    if event.attempt == 1:
        time.sleep(LIMIT_S + 5)


@outbox.handler(
    "it.requeued",
    bind=True,
    time_limit=LIMIT_S,
    acks_late=True,
    reject_on_worker_lost=True,
)
def requeued(self: Task, event: Event) -> None:
    """Kill the pool child on the first delivery of attempt 1.

    ``acks_late`` with ``reject_on_worker_lost``: Celery's main process puts
    the message of the lost child back in the queue, and the same message
    (same lease token, not resent) is delivered again.
    """
    record(self, event)
    key = f"{CALLS}:deliveries:{event.id}:{event.attempt}"
    if event.attempt == 1 and _redis.incr(key) == 1:
        os.kill(os.getpid(), 9)
