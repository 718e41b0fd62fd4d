"""Helpers for tests of the Celery integration: apps, outboxes, waiting."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from celery import Celery

from celery_outbox import Completion, Outbox, OutboxConfig

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


ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Worker:
    """A ``celery worker -B`` subprocess running ``tests/integration/worker_app``."""

    proc: subprocess.Popen[bytes]
    log: Path
    outbox: Outbox
    redis: Any
    calls_key: str

    def calls(self) -> list[dict[str, Any]]:
        """Every handler invocation recorded so far, in order."""
        return [json.loads(raw) for raw in self.redis.lrange(self.calls_key, 0, -1)]

    def calls_of(self, event_id: str) -> list[dict[str, Any]]:
        """The invocations for one event, in order."""
        return [c for c in self.calls() if c["id"] == event_id]

    def log_text(self) -> str:
        """The worker's log so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        """Whether the worker's main process is still running."""
        return self.proc.poll() is None


def start_worker(
    *,
    endpoint_url: str,
    redis_url: str,
    queue: str,
    folder: Path,
    pool: str = "prefork",
    concurrency: int = 2,
    timeout_ms: int = 30_000,
    backoff_ms: int = 500,
    max_retries: int = 2,
    extra_env: dict[str, str] | None = None,
    table: str | None = None,
) -> Worker:
    """Start a worker with beat (see ``worker_app``) on ``table``, or a new one."""
    import redis

    table = table or f"it-{uuid.uuid4().hex[:12]}"
    outbox = Outbox(
        config=OutboxConfig(
            table_name=table, endpoint_url=endpoint_url, completion=Completion.KEEP
        )
    )
    outbox.store.create_table()
    log = folder / f"worker-{queue}-{uuid.uuid4().hex[:4]}.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OUTBOX_IT_BROKER": redis_url,
        "OUTBOX_IT_RECORD": redis_url,
        "OUTBOX_IT_QUEUE": queue,
        "OUTBOX_IT_PREFIX": queue,
        "OUTBOX_IT_TABLE": table,
        "OUTBOX_IT_ENDPOINT": endpoint_url,
        "OUTBOX_IT_TIMEOUT_MS": str(timeout_ms),
        "OUTBOX_IT_BACKOFF_MS": str(backoff_ms),
        "OUTBOX_IT_MAX_RETRIES": str(max_retries),
        **(extra_env or {}),
    }
    command = [
        sys.executable, "-m", "celery", "-A", "tests.integration.worker_app",
        "worker", "-B", "-s", str(log.with_suffix(".beat")),
        "-P", pool, "-c", str(concurrency), "-Q", queue, "-n", f"{queue}@%h",
        "--without-mingle", "--without-gossip", "--without-heartbeat",
        "-l", "info", "-f", str(log),
    ]  # fmt: skip
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # one group: pool children and beat go with it
    )
    client = redis.Redis.from_url(redis_url)
    return Worker(proc, log, outbox, client, f"{queue}:calls")


def stop_process_group(proc: subprocess.Popen[Any]) -> None:
    """Stop a process started with ``start_new_session`` and all of its group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
    # Pool children or beat that outlived the main process share its group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def stop_worker(worker: Worker) -> None:
    """Stop a worker and every process of its group; drop its table and keys."""
    stop_process_group(worker.proc)
    queue = worker.calls_key.rsplit(":", 1)[0]
    keys = list(worker.redis.scan_iter(match=f"*{queue}*"))  # queue, bindings, calls
    if keys:
        worker.redis.delete(*keys)
    worker.outbox.store.delete_table()
