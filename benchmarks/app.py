"""The benchmark's Celery app: one no-op task and one no-op outbox handler.

``benchmarks/run.py`` starts a worker on this module with its settings in
``BENCH_*`` environment variables. Both the bare task and the handler do the
same thing: count themselves in Redis and, when the message carries a send
time, record how long it took to start. The worker's DynamoDB requests are
counted (``benchmarks.counting``) and reported to Redis.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from celery import Celery, signals

from benchmarks import counting
from celery_outbox import Event, Outbox

counting.install()

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0")
KEY = os.environ.get("BENCH_KEY", "bench")
EVENT_TYPE = "bench.event"


def make_app(env: Mapping[str, str]) -> tuple[Celery, Outbox]:
    """A Celery app and its outbox, configured from ``BENCH_*`` in ``env``."""
    broker = env.get("BENCH_BROKER", BROKER)
    key = env.get("BENCH_KEY", KEY)
    app = Celery("bench", broker=broker, set_as_current=False)
    app.conf.update(
        task_default_queue=env.get("BENCH_QUEUE", "bench"),
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        outbox_table_name=env.get("BENCH_TABLE", "bench"),
        outbox_endpoint_url=env.get("BENCH_ENDPOINT") or None,
        outbox_region_name="us-east-1",
        **{
            f"outbox_{name}": value
            for name, value in json.loads(env.get("BENCH_OUTBOX", "{}")).items()
        },
    )
    outbox = Outbox(app)

    @app.task(name="bench.noop", shared=False)  # type: ignore[untyped-decorator]
    def noop(sent: float = 0.0) -> None:
        """A bare Celery task that does what the handler does."""
        record(broker, key, sent)

    @outbox.handler(EVENT_TYPE, name="bench.on_event", shared=False)
    def on_event(event: Event) -> None:
        """The outbox handler: the same work as ``noop``."""
        record(broker, key, float((event.payload or {}).get("sent", 0.0)))

    return app, outbox


_redis: Any = None
_reporter: counting.RedisReporter | None = None


def _conn(url: str = BROKER) -> Any:
    global _redis
    if _redis is None:
        import redis

        _redis = redis.Redis.from_url(url)
    return _redis


def record(broker: str, key: str, sent: float) -> None:
    """Count one finished task; record its start latency if it has a send time."""
    started = time.time()
    conn = _conn(broker)
    # Plain commands: a redis-py pipeline costs about a millisecond of CPU to
    # set up, more than the rest of a no-op task.
    if sent:
        conn.rpush(f"{key}:latency", repr(started - sent))
    conn.incr(f"{key}:done")


app, outbox = make_app(os.environ)


def _start_reporter() -> None:
    global _reporter, _redis
    _redis = None  # a connection must not cross a fork
    _reporter = counting.RedisReporter(BROKER, KEY).start()


def _stop_reporter() -> None:
    if _reporter is not None:
        _reporter.stop()


@signals.worker_process_init.connect  # type: ignore[untyped-decorator]
def _child_started(**kwargs: Any) -> None:
    _start_reporter()


@signals.worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _child_stopping(**kwargs: Any) -> None:
    _stop_reporter()


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _ready(sender: Any = None, **kwargs: Any) -> None:
    # Solo and thread pools run tasks in this process: report from here.
    if _reporter is None:
        _start_reporter()
    _conn().set(f"{KEY}:ready", "1")


@signals.worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stopping(**kwargs: Any) -> None:
    _stop_reporter()
