"""Count DynamoDB requests and consumed capacity with botocore event hooks.

:func:`install` hooks boto3's default session, so every DynamoDB client a
process makes afterwards (the outbox's own included) is counted without the
outbox knowing. For each operation it counts the HTTP requests sent (resends
included: they are billed and they cost time) and the capacity DynamoDB
reports; it asks for that report by adding ``ReturnConsumedCapacity=TOTAL``
to every request whose operation accepts it.

DynamoDB Local reports no consumed capacity for PartiQL batches (real
DynamoDB does). For those the counter models it on what DynamoDB Local
reports for the same transition done item by item on a sub-kilobyte event:
an insert 2 WCU (table and index), an update that moves the index key 3
(table, index delete, index put), a delete 2, a failed condition 1. The
model's share is kept apart (``wcu_modelled``) so a reader sees it.

A worker process reports its counts to Redis (:class:`RedisReporter`): a
thread adds the deltas to one hash every 100 ms and stamps the time of each
flush, so the benchmark knows when a worker's counts cover a moment.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from typing import Any

import boto3

__all__ = ["COUNTER", "Counts", "RedisReporter", "install"]

READS = {"Query", "Scan", "GetItem", "BatchGetItem", "TransactGetItems"}
MODEL_WCU = {"INSERT": 2.0, "UPDATE": 3.0, "DELETE": 2.0}
MODEL_FAILED_WCU = 1.0

Counts = dict[str, float]
"""Flat counts: ``req:<Operation>``, ``wcu:<Operation>``, ``rcu:<Operation>``
and ``wcu_modelled:<Operation>``."""


class RequestCounter:
    """Thread-safe counts of one process's DynamoDB requests and capacity."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, float] = collections.defaultdict(float)

    def add(self, key: str, amount: float) -> None:
        """Add ``amount`` to ``key``."""
        with self._lock:
            self._counts[key] += amount

    def snapshot(self) -> Counts:
        """A copy of the counts so far."""
        with self._lock:
            return dict(self._counts)

    # -- botocore hooks ------------------------------------------------------

    def ask_capacity(self, params: dict[str, Any], model: Any, **kwargs: Any) -> None:
        """``provide-client-params``: ask for consumed capacity, note statements."""
        if "ReturnConsumedCapacity" in model.input_shape.members:
            params.setdefault("ReturnConsumedCapacity", "TOTAL")
        context = kwargs.get("context")
        if context is not None and "Statements" in params:
            context["bench_statements"] = [
                s["Statement"].split(None, 1)[0].upper() for s in params["Statements"]
            ]

    def count_send(self, **kwargs: Any) -> None:
        """``before-send``: one HTTP request, resends included."""
        operation = kwargs["event_name"].rsplit(".", 1)[-1]
        self.add(f"req:{operation}", 1)

    def read_capacity(self, parsed: dict[str, Any], model: Any, **kwargs: Any) -> None:
        """``after-call``: add the capacity DynamoDB reported, or model it."""
        operation = model.name
        reported = parsed.get("ConsumedCapacity")
        if isinstance(reported, dict):
            reported = [reported]
        if reported:
            units = sum(float(c.get("CapacityUnits", 0)) for c in reported)
            kind = "rcu" if operation in READS else "wcu"
            self.add(f"{kind}:{operation}", units)
            return
        kinds = (kwargs.get("context") or {}).get("bench_statements")
        responses = parsed.get("Responses")
        if kinds and responses is not None:
            modelled = 0.0
            for kind, response in zip(kinds, responses, strict=False):
                if "Error" in response:
                    modelled += MODEL_FAILED_WCU
                else:
                    modelled += MODEL_WCU.get(kind, 0.0)
            self.add(f"wcu:{operation}", modelled)
            self.add(f"wcu_modelled:{operation}", modelled)


COUNTER = RequestCounter()
_installed = False


def install() -> RequestCounter:
    """Count the requests of every client made from boto3's default session."""
    global _installed
    if not _installed:
        boto3.setup_default_session()
        events = boto3.DEFAULT_SESSION.events  # type: ignore[union-attr]
        events.register("provide-client-params.dynamodb", COUNTER.ask_capacity)
        events.register("before-send.dynamodb", COUNTER.count_send)
        events.register("after-call.dynamodb", COUNTER.read_capacity)
        _installed = True
    return COUNTER


def uninstall() -> None:
    """Remove the hooks again (a test process that imported the app)."""
    global _installed
    if _installed and boto3.DEFAULT_SESSION is not None:
        events = boto3.DEFAULT_SESSION.events
        events.unregister("provide-client-params.dynamodb", COUNTER.ask_capacity)
        events.unregister("before-send.dynamodb", COUNTER.count_send)
        events.unregister("after-call.dynamodb", COUNTER.read_capacity)
    _installed = False


class RedisReporter:
    """Flush a process's counts to a Redis hash every ``interval_s``.

    The hash ``<key>:counts`` holds the sum over processes; the hash
    ``<key>:flushed`` holds each process's last flush time.
    """

    def __init__(self, redis_url: str, key: str, interval_s: float = 0.1) -> None:
        import redis

        self._redis = redis.Redis.from_url(redis_url)
        self._key = key
        self._interval_s = interval_s
        self._sent: Counts = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="bench-counts", daemon=True
        )

    def start(self) -> RedisReporter:
        """Start the flushing thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread after one last flush."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.flush()

    def flush(self) -> None:
        """Send the deltas since the last flush, then stamp the time."""
        stamp = time.time()
        now = COUNTER.snapshot()
        pipe = self._redis.pipeline()
        for name, value in now.items():
            delta = value - self._sent.get(name, 0.0)
            if delta:
                pipe.hincrbyfloat(f"{self._key}:counts", name, delta)
        pipe.hset(f"{self._key}:flushed", str(os.getpid()), repr(stamp))
        pipe.execute()
        self._sent = now
