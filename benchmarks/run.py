"""Benchmark the outbox beside bare Celery on DynamoDB Local and Redis.

::

    python benchmarks/run.py [--json] [--events N] [--runs K] [--quick]
                             [--outbox write_mode=partiql] [--outbox nudge=true]

Starts DynamoDB Local (or uses ``--endpoint``) and, for each run, a Celery
worker with embedded beat on a queue of its own on the Redis broker
(``--broker``; the ``BENCH_BROKER`` variable, else Redis database 0). One run
measures:

* emit throughput: single events, batches of 25 written together
  (``publish``, one transaction) and each on its own (``publish_each``:
  PartiQL ``INSERT`` batches in ``partiql`` mode), and events inside business
  transactions (one business item and one event per transaction);
* end-to-end throughput: ``--events`` no-op events from the first emit until
  every handler ran and every event is completed in DynamoDB (emitted 25 to
  a ``publish``; see ``--e2e-emit``), and the same number of bare no-op
  Celery tasks through the same broker and worker, with the ratio;
* DynamoDB requests per event, by operation, producer and worker together,
  and consumed write capacity per event;
* emit-to-handler-start latency p50 and p99 at a steady rate below
  saturation (``--rate``): bare Celery's, the outbox's without the nudge
  (beat and follow-up drains) and with it.

Each figure printed is the median over ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import counting  # noqa: E402
from benchmarks.app import make_app  # noqa: E402
from benchmarks.cpu import CpuMeter  # noqa: E402
from celery_outbox import Event, Outbox, OutboxConfig, OutboxStore  # noqa: E402
from celery_outbox.testing import DynamoDBLocal, fake_credentials  # noqa: E402

EMIT_BATCH = 25


@dataclass
class Settings:
    """What one benchmark invocation measures, and where."""

    endpoint: str
    broker: str
    events: int
    emit_events: int
    rate: float
    latency_s: float
    pool: str
    concurrency: int
    e2e_emit: str
    outbox: dict[str, Any] = field(default_factory=dict)
    dynamodb_pid: int | None = None


@dataclass
class Run:
    """The names one run uses, all unique to it."""

    key: str
    queue: str
    table: str
    emit_table: str
    orders_table: str
    tmp: Path
    worker_pid: int | None = None

    def meter(self, settings: Settings) -> CpuMeter:
        """CPU of DynamoDB Local (when started here), the worker, this process."""
        return CpuMeter(dynamodb_local=settings.dynamodb_pid, worker=self.worker_pid)


def plain_client(endpoint: str) -> Any:
    """A DynamoDB client the counter does not see, for the harness's checks."""
    import boto3

    return boto3.session.Session().client(
        "dynamodb", endpoint_url=endpoint, region_name="us-east-1"
    )


# -- the worker ---------------------------------------------------------------


def worker_env(settings: Settings, run: Run) -> dict[str, str]:
    """The ``BENCH_*`` variables that configure ``benchmarks.app``."""
    return {
        "BENCH_BROKER": settings.broker,
        "BENCH_QUEUE": run.queue,
        "BENCH_KEY": run.key,
        "BENCH_TABLE": run.table,
        "BENCH_ENDPOINT": settings.endpoint,
        "BENCH_OUTBOX": json.dumps(settings.outbox),
    }


@contextlib.contextmanager
def worker(settings: Settings, run: Run, redis: Any) -> Iterator[None]:
    """A worker with embedded beat on ``run.queue``, stopped warmly at the end."""
    env = {**os.environ, **worker_env(settings, run)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    log = open(run.tmp / "worker.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "benchmarks.app",
            "worker",
            "-B",
            "-s",
            str(run.tmp / "beat-schedule"),
            "-Q",
            run.queue,
            "-P",
            settings.pool,
            "-c",
            str(settings.concurrency),
            "-n",
            f"{run.queue}@%h",
            "-l",
            os.environ.get("BENCH_LOGLEVEL", "WARNING"),
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    run.worker_pid = proc.pid
    try:
        wait_for(
            lambda: redis.get(f"{run.key}:ready") is not None,
            60,
            "the worker to start",
            proc,
        )
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def wait_for(
    condition: Callable[[], bool],
    timeout_s: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"the worker exited with {proc.returncode} while waiting for {what}"
            )
        if time.monotonic() > end:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.005)


class WorkerCounts:
    """The worker's DynamoDB counts as its processes reported them to Redis."""

    def __init__(self, redis: Any, key: str) -> None:
        self.redis = redis
        self.key = key

    def at(self, moment: float) -> counting.Counts:
        """The totals once every live worker process has flushed after ``moment``."""

        def flushed() -> bool:
            stamps = [float(v) for v in self.redis.hvals(f"{self.key}:flushed")]
            # A process that stopped flushing two seconds before ``moment``
            # is gone (a replaced pool child); do not wait for it.
            live = [s for s in stamps if s > moment - 2]
            return bool(live) and all(s > moment for s in live)

        wait_for(flushed, 30, "the worker's request counts")
        raw = self.redis.hgetall(f"{self.key}:counts")
        return {k.decode(): float(v) for k, v in raw.items()}


def delta(after: counting.Counts, before: counting.Counts) -> counting.Counts:
    """``after - before``, key by key."""
    changed = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return {k: v for k, v in changed.items() if v}


def plus(a: counting.Counts, b: counting.Counts) -> counting.Counts:
    """``a + b``, key by key."""
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in set(a) | set(b)}


def per_event(counts: counting.Counts, events: int) -> dict[str, Any]:
    """Requests and capacity per event: totals and the split by operation."""
    by_op = {
        k.split(":", 1)[1]: round(v / events, 4)
        for k, v in sorted(counts.items())
        if k.startswith("req:")
    }
    wcu = sum(v for k, v in counts.items() if k.startswith("wcu:"))
    modelled = sum(v for k, v in counts.items() if k.startswith("wcu_modelled:"))
    rcu = sum(v for k, v in counts.items() if k.startswith("rcu:"))
    return {
        "requests": round(sum(by_op.values()), 4),
        "requests_by_operation": by_op,
        "wcu": round(wcu / events, 4),
        "wcu_modelled": round(modelled / events, 4),
        "rcu": round(rcu / events, 4),
    }


# -- phases ------------------------------------------------------------------


def emit_phase(settings: Settings, run: Run) -> dict[str, Any]:
    """Emit throughput by kind, on a table no worker drains."""
    config = OutboxConfig(
        table_name=run.emit_table,
        endpoint_url=settings.endpoint,
        region_name="us-east-1",
        **emit_options(settings),
    )
    producer = Outbox(config=config)
    n = settings.emit_events
    results: dict[str, Any] = {}

    def single() -> None:
        for i in range(n):
            producer.emit("bench.emit", {"i": i})

    def batch() -> None:
        for start in range(0, n, EMIT_BATCH):
            producer.publish(
                [
                    Event.new("bench.emit", {"i": i})
                    for i in range(start, min(n, start + EMIT_BATCH))
                ]
            )

    def each() -> None:
        for start in range(0, n, EMIT_BATCH):
            producer.publish_each(
                [
                    Event.new("bench.emit", {"i": i})
                    for i in range(start, min(n, start + EMIT_BATCH))
                ]
            )

    def transaction() -> None:
        for i in range(n):
            with producer.transaction() as tx:
                tx.put(run.orders_table, {"id": uuid.uuid4().hex, "total": i})
                producer.emit("bench.emit", {"i": i})

    for name, body in (
        ("single", single),
        ("batch", batch),
        ("each", each),
        ("transaction", transaction),
    ):
        before = counting.COUNTER.snapshot()
        started = time.perf_counter()
        body()
        elapsed = time.perf_counter() - started
        counts = delta(counting.COUNTER.snapshot(), before)
        results[name] = {"events_per_s": round(n / elapsed, 1), **per_event(counts, n)}
    return results


def emit_options(settings: Settings) -> dict[str, Any]:
    """The outbox options a producer-only outbox takes (no Celery ones)."""
    names = set(OutboxConfig.option_names())
    return {k: v for k, v in settings.outbox.items() if k in names}


def bare_phase(settings: Settings, run: Run, redis: Any, app: Any) -> dict[str, Any]:
    """Send ``events`` bare no-op tasks; time until all ran."""
    redis.set(f"{run.key}:done", 0)
    noop = app.tasks["bench.noop"]
    n = settings.events
    meter = run.meter(settings)
    cpu = meter.read()
    started = time.perf_counter()
    for _ in range(n):
        noop.apply_async(queue=run.queue)
    wait_for(
        lambda: int(redis.get(f"{run.key}:done") or 0) >= n,
        max(120, n / 5),
        "the bare tasks",
    )
    elapsed = time.perf_counter() - started
    return {
        "tasks_per_s": round(n / elapsed, 1),
        "seconds": round(elapsed, 3),
        "cpu_ms_per_task": meter.per_event_ms(cpu, meter.read(), n),
    }


def outbox_phase(
    settings: Settings, run: Run, redis: Any, producer: Outbox, counts: WorkerCounts
) -> dict[str, Any]:
    """Emit ``events`` no-op events; time until all ran and all are completed."""
    redis.set(f"{run.key}:done", 0)
    checker = plain_client(settings.endpoint)
    n = settings.events
    worker_before = counts.at(time.time())
    producer_before = counting.COUNTER.snapshot()
    meter = run.meter(settings)
    cpu = meter.read()
    started = time.perf_counter()
    if settings.e2e_emit != "single":
        publish = (
            producer.publish
            if settings.e2e_emit == "batch"
            else (producer.publish_each)
        )
        for start in range(0, n, EMIT_BATCH):
            publish(
                [
                    Event.new("bench.event", {"sent": 0})
                    for _ in range(start, min(n, start + EMIT_BATCH))
                ]
            )
    else:
        for _ in range(n):
            producer.emit("bench.event", {"sent": 0})
    emitted = time.perf_counter() - started

    last_scan = [0.0]

    def finished() -> bool:
        # The handlers' count is cheap to read; a scan costs DynamoDB Local
        # CPU the outbox then lacks, so scan only every 50 ms once they ran.
        if int(redis.get(f"{run.key}:done") or 0) < n:
            return False
        if time.monotonic() - last_scan[0] < 0.05:
            return False
        last_scan[0] = time.monotonic()
        left = checker.scan(TableName=run.table, Select="COUNT", ConsistentRead=True)
        return int(left["Count"]) == 0

    wait_for(finished, max(180, n / 2), "the outbox events")
    elapsed = time.perf_counter() - started
    cpu_ms = meter.per_event_ms(cpu, meter.read(), n)
    producer_counts = delta(counting.COUNTER.snapshot(), producer_before)
    worker_counts = delta(counts.at(time.time()), worker_before)
    return {
        "events_per_s": round(n / elapsed, 1),
        "seconds": round(elapsed, 3),
        "emit_seconds": round(emitted, 3),
        "cpu_ms_per_event": cpu_ms,
        "per_event": per_event(plus(producer_counts, worker_counts), n),
        "producer_per_event": per_event(producer_counts, n),
        "worker_per_event": per_event(worker_counts, n),
        "single_emit_requests": round(1 + per_event(worker_counts, n)["requests"], 4),
    }


def latency_phase(
    settings: Settings, run: Run, redis: Any, send: Callable[[float], object]
) -> dict[str, Any]:
    """Send at a steady ``rate``; the send-to-start latency of every task."""
    redis.delete(f"{run.key}:latency")
    redis.set(f"{run.key}:done", 0)
    n = max(10, round(settings.rate * settings.latency_s))
    interval = 1 / settings.rate
    started = time.perf_counter()
    for i in range(n):
        pause = started + i * interval - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        send(time.time())
    wait_for(
        lambda: int(redis.get(f"{run.key}:done") or 0) >= n,
        max(120, n),
        "the latency probes",
    )
    samples = sorted(float(v) * 1000 for v in redis.lrange(f"{run.key}:latency", 0, -1))
    return {
        "events": n,
        "p50_ms": round(statistics.median(samples), 1),
        "p99_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 1),
    }


def one_run(settings: Settings, number: int) -> dict[str, Any]:
    """One run: fresh tables, a fresh worker, every phase."""
    import redis as redis_lib

    tag = uuid.uuid4().hex[:8]
    run = Run(
        key=f"bench:{tag}",
        queue=f"bench-{tag}",
        table=f"bench-{tag}",
        emit_table=f"bench-emit-{tag}",
        orders_table=f"bench-orders-{tag}",
        tmp=Path(tempfile.mkdtemp(prefix="outbox-bench-")),
    )
    redis = redis_lib.Redis.from_url(settings.broker)
    checker = plain_client(settings.endpoint)
    for table in (run.table, run.emit_table):
        OutboxStore(
            OutboxConfig(table_name=table, endpoint_url=settings.endpoint),
            client=checker,
        ).create_table()
    checker.create_table(
        TableName=run.orders_table,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
    )
    app, producer = make_app(
        {
            **worker_env(settings, run),
            "BENCH_OUTBOX": json.dumps({**settings.outbox, "nudge": False}),
        }
    )
    _, nudging = make_app(
        {
            **worker_env(settings, run),
            "BENCH_OUTBOX": json.dumps({**settings.outbox, "nudge": True}),
        }
    )
    result: dict[str, Any] = {"run": number}
    try:
        result["emit"] = emit_phase(settings, run)
        with worker(settings, run, redis):
            counts = WorkerCounts(redis, run.key)
            bare = bare_phase(settings, run, redis, app)
            out = outbox_phase(settings, run, redis, producer, counts)
            result["e2e"] = {
                "bare": bare,
                "outbox": out,
                "ratio": round(out["events_per_s"] / bare["tasks_per_s"], 3),
                "app_cpu_ratio": app_cpu_ratio(bare, out),
            }
            noop = app.tasks["bench.noop"]
            result["latency"] = {
                "bare": latency_phase(
                    settings,
                    run,
                    redis,
                    lambda sent: noop.apply_async((sent,), queue=run.queue),
                ),
                "outbox": latency_phase(
                    settings,
                    run,
                    redis,
                    lambda sent: producer.emit("bench.event", {"sent": sent}),
                ),
                "outbox_nudge": latency_phase(
                    settings,
                    run,
                    redis,
                    lambda sent: nudging.emit("bench.event", {"sent": sent}),
                ),
            }
    finally:
        for table in (run.table, run.emit_table, run.orders_table):
            with contextlib.suppress(Exception):
                checker.delete_table(TableName=table)
        keys = [*redis.scan_iter(f"{run.key}:*"), run.queue]
        redis.delete(*keys)
        shutil.rmtree(run.tmp, ignore_errors=True)
    return result


def app_cpu_ratio(bare: dict[str, Any], out: dict[str, Any]) -> float | None:
    """Bare Celery's CPU per task over the outbox's, worker and producer only.

    The throughput ratio the application's own processes allow when
    DynamoDB's work is not on their CPU, as with AWS's DynamoDB: an
    estimate from CPU time, printed beside the measured ratio, never
    instead of it. None where CPU time cannot be read.
    """
    parts = ("worker", "producer")
    try:
        bare_ms = sum(bare["cpu_ms_per_task"][k] for k in parts)
        out_ms = sum(out["cpu_ms_per_event"][k] for k in parts)
    except (KeyError, TypeError):
        return None
    return round(bare_ms / out_ms, 3) if out_ms else None


# -- summary -----------------------------------------------------------------


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every number across ``runs``, in the same shape."""

    def merge(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, dict):
            keys = dict.fromkeys(k for v in values for k in v)
            return {k: merge([v.get(k, 0) for v in values]) for k in keys}
        if isinstance(first, bool) or not isinstance(first, int | float):
            return first
        return round(statistics.median(values), 4)

    merged = merge(runs)
    merged.pop("run", None)
    return dict(merged)


def report(summary: dict[str, Any], runs: int) -> str:
    """A short human-readable table of the medians."""
    lines = [f"celery_outbox benchmark: median of {runs} run(s)", ""]
    lines.append("emit throughput (one producer thread):")
    for kind, figures in summary["emit"].items():
        lines.append(
            f"  {kind:<12} {figures['events_per_s']:>9.1f} events/s  "
            f"{figures['requests']:.3f} req/event  {figures['wcu']:.2f} WCU/event"
        )
    e2e = summary["e2e"]
    lines += [
        "",
        "end-to-end throughput (no-op handler, one worker):",
        f"  bare Celery  {e2e['bare']['tasks_per_s']:>9.1f} tasks/s",
        f"  outbox       {e2e['outbox']['events_per_s']:>9.1f} events/s",
        f"  ratio        {e2e['ratio']:>9.3f}",
        "  ratio of the worker's and producer's CPU per event (DynamoDB's own "
        f"work left out): {_fmt(e2e.get('app_cpu_ratio'))}",
        "",
        "DynamoDB per event, emit to completion (producer + worker):",
    ]
    figures = e2e["outbox"]["per_event"]
    lines.append(
        f"  requests     {figures['requests']:>9.3f}  "
        f"(WCU {figures['wcu']:.2f}, RCU {figures['rcu']:.2f}, "
        f"WCU modelled {figures['wcu_modelled']:.2f})"
    )
    for op, value in figures["requests_by_operation"].items():
        lines.append(f"    {op:<22} {value:.3f}")
    lines.append(
        "  emitted one by one instead: "
        f"{e2e['outbox']['single_emit_requests']:.3f} requests per event "
        "(1 PutItem + the worker's)"
    )
    lines += ["", "CPU per event, ms (DynamoDB Local / worker / producer):"]
    for name, cpu in (
        ("bare Celery", e2e["bare"]["cpu_ms_per_task"]),
        ("outbox", e2e["outbox"]["cpu_ms_per_event"]),
    ):
        shown = " / ".join(
            "-" if cpu.get(k) is None else f"{cpu[k]:.2f}"
            for k in ("dynamodb_local", "worker", "producer")
        )
        lines.append(f"  {name:<12} {shown}")
    lines += ["", "emit-to-handler-start latency at a steady rate:"]
    for name, figures in summary["latency"].items():
        lines.append(
            f"  {name:<12} p50 {figures['p50_ms']:>8.1f} ms  "
            f"p99 {figures['p99_ms']:>8.1f} ms"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def parse_value(text: str) -> Any:
    """``true`` / numbers as JSON, anything else as a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the medians (``--json``: every run too)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--events",
        type=int,
        default=1000,
        help="events (and bare tasks) end to end, per run",
    )
    parser.add_argument(
        "--emit-events", type=int, default=500, help="events per emit kind, per run"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs to take medians of")
    parser.add_argument(
        "--rate",
        type=float,
        default=20.0,
        help="events per second in the latency phase",
    )
    parser.add_argument("--latency-seconds", type=float, default=8.0)
    parser.add_argument("--pool", default="prefork", help="the worker's pool")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument(
        "--e2e-emit",
        choices=["batch", "each", "single"],
        default="batch",
        help="how the end-to-end producer emits: publish or "
        f"publish_each {EMIT_BATCH} at a time, or one by one "
        "(default: batch)",
    )
    parser.add_argument(
        "--outbox",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an outbox option for producer and worker",
    )
    parser.add_argument(
        "--broker", default=os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument(
        "--endpoint",
        default=os.environ.get("BENCH_DYNAMODB"),
        help="a running DynamoDB Local (default: start one)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1500,
        metavar="EVENTS",
        help="events of an untimed first run (0: none)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small, fast run (smoke test)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.emit_events, args.runs = 60, 30, 1
        args.latency_seconds, args.rate, args.warmup = 1.0, 20.0, 0
    options = {}
    for item in args.outbox:
        name, _, value = item.partition("=")
        options[name] = parse_value(value)
    fake_credentials()
    counting.install()
    with contextlib.ExitStack() as stack:
        local = None if args.endpoint else stack.enter_context(DynamoDBLocal())
        endpoint = args.endpoint or local.endpoint_url  # type: ignore[union-attr]
        settings = Settings(
            dynamodb_pid=local.pid if local is not None else None,
            endpoint=endpoint,
            broker=args.broker,
            events=args.events,
            emit_events=args.emit_events,
            rate=args.rate,
            latency_s=args.latency_seconds,
            pool=args.pool,
            concurrency=args.concurrency,
            e2e_emit=args.e2e_emit,
            outbox=options,
        )
        if args.warmup:
            # DynamoDB Local (Java) runs several times slower until its JIT
            # has compiled the paths the outbox uses: warm them, untimed.
            one_run(
                dataclasses.replace(
                    settings,
                    events=args.warmup,
                    emit_events=args.warmup // 4,
                    latency_s=1.0,
                ),
                0,
            )
        runs = [one_run(settings, i + 1) for i in range(args.runs)]
    summary = median_of(runs)
    if args.json:
        print(
            json.dumps(
                {
                    "settings": {k: v for k, v in vars(args).items() if k != "json"},
                    "median": summary,
                    "runs": runs,
                },
                indent=2,
            )
        )
    else:
        print(report(summary, len(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
