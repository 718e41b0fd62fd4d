"""Helpers for tests of the Celery integration: apps, outboxes, waiting."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Celery

from celery_outbox import Outbox

T = TypeVar("T")


def eager_outbox(endpoint_url: str, **settings: Any) -> Outbox:
    """An outbox on a fresh table whose handler tasks run eagerly in-process.

    ``task_always_eager`` makes the drain's ``apply_async`` run the handler
    at once with the same task id, headers and retry count, through Celery's
    tracer, so every write-back hook runs as in a worker.
    """
    app = Celery(f"test-{uuid.uuid4().hex[:6]}", broker="memory://")
    app.conf.task_always_eager = True
    app.conf.outbox_endpoint_url = endpoint_url
    app.conf.outbox_table_name = f"test-{uuid.uuid4().hex[:12]}"
    for name, value in settings.items():
        app.conf[f"outbox_{name}"] = value
    outbox = Outbox(app)
    outbox.store.create_table()
    return outbox


def wait_for(
    condition: Callable[[], T], *, timeout_s: float = 60, what: str = "condition"
) -> T:
    """Poll ``condition`` until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)
