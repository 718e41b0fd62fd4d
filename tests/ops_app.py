"""A Celery app for the operations tests, run by ``celery -A ops_app ...``.

Everything comes from the environment, so one module serves every test
process: ``OPS_TABLE`` and ``OPS_ENDPOINT`` (required), ``OPS_BROKER``,
``OPS_BACKEND``, ``OPS_QUEUE``, ``OPS_TIME_LIMIT`` (the handler's time limit
in seconds) and ``OPS_FAIL_FLAG`` (a file; while it exists the handler
fails).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery

from celery_outbox import Outbox

app = Celery(
    "ops_app",
    broker=os.environ.get("OPS_BROKER", "memory://"),
    backend=os.environ.get("OPS_BACKEND") or None,
)
app.conf.update(
    task_default_queue=os.environ.get("OPS_QUEUE", "celery"),
    worker_send_task_events=True,
    outbox_table_name=os.environ["OPS_TABLE"],
    outbox_endpoint_url=os.environ["OPS_ENDPOINT"],
    outbox_completion="keep",
    outbox_max_retries=0,
    outbox_poll_interval_ms=300,
    outbox_processing_timeout_ms=60_000,
)
outbox = Outbox(app)


@outbox.handler("order.created", time_limit=int(os.environ.get("OPS_TIME_LIMIT", "30")))
def order_created(event: Any) -> None:
    """Fail while the flag file exists; succeed otherwise."""
    flag = os.environ.get("OPS_FAIL_FLAG")
    if flag and Path(flag).exists():
        raise RuntimeError(f"card declined for order {event.id}")
