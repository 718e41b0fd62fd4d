"""The chaos run: N events through the outbox while things go wrong.

::

    python chaos/run.py [--events N] [--json]

Starts DynamoDB Local and a Redis of its own on a free port, then two Celery
workers, two beat schedulers (their drains run in the workers) and a drain
loop whose clock runs ahead. An emitter process writes N events; meanwhile
worker children are SIGKILLed at random intervals, Redis is restarted once
(losing every queued message) and a few percent of DynamoDB calls fail
(throttling, 5xx, and replies lost after the write was applied). When the
emitter is done the run waits, with a deadline, until no event is pending,
stops everything and prints the figures (see :mod:`chaos.report`). It exits
with status 1 if any event was lost, is still pending, or ran twice without
an interrupted attempt to explain it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from celery_outbox import OutboxConfig, OutboxStore  # noqa: E402
from celery_outbox.testing import DynamoDBLocal, fake_credentials, free_port  # noqa: E402
from chaos.record import Recorder, read_all  # noqa: E402
from chaos.report import PENDING, analyse  # noqa: E402

__all__ = ["ChaosRun", "main"]

TABLE = "chaos-outbox"
ORDERS = "chaos-orders"


def wait_for(
    condition: Callable[[], bool],
    deadline_s: float,
    what: str,
    *,
    interval_s: float = 0.1,
) -> None:
    """Poll ``condition`` until it holds; raise TimeoutError after the deadline."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"gave up after {deadline_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux ``/proc``)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


class Redis:
    """A redis-server of the run's own, on a free port, without persistence."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait until it answers PING."""
        log = (self.folder / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        wait_for(self.answers, 20, f"redis-server on port {self.port}")

    def answers(self) -> bool:
        """Whether it answers PING right now."""
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        """Stop it; queued messages are gone, as after a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()


class Processes:
    """The processes the run starts, each in a session of its own."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.specs: dict[str, tuple[list[str], dict[str, str]]] = {}

    def revive(self, names: list[str]) -> list[str]:
        """Start again each of ``names`` that has exited, as a supervisor
        (systemd, Kubernetes) would; return the names started again."""
        revived = []
        for name in names:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                args, env = self.specs[name]
                self.spawn(name, args, **env)
                revived.append(name)
        return revived

    def spawn(self, name: str, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        """Start ``args`` as ``name``, logging to ``<folder>/<name>.log``."""
        log = (self.folder / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**self.env, "CHAOS_ROLE": name, **env},
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        self.procs[name] = proc
        self.specs[name] = (args, env)
        return proc

    def stop(self, deadline_s: float = 30) -> None:
        """SIGTERM everything, then SIGKILL each process group still alive."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        end = time.monotonic() + deadline_s
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, end - time.monotonic()))
        for proc in self.procs.values():
            # The group holds a worker's pool children too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def scan(client: Any, table: str) -> dict[str, dict[str, Any]]:
    """Every item of ``table``, read consistently, by id."""
    items: dict[str, dict[str, Any]] = {}
    kwargs: dict[str, Any] = {"TableName": table, "ConsistentRead": True}
    while True:
        page = client.scan(**kwargs)
        items.update((i["id"]["S"], i) for i in page.get("Items", []))
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def index_copy(store: OutboxStore, item: dict[str, Any]) -> dict[str, Any] | None:
    """The status index's copy of ``item``, under its status and sort key."""
    if "status" not in item or "gsiSortKey" not in item:
        return None  # not indexable: no drain can find it
    found = store.client.query(
        TableName=store.table,
        IndexName=store.index,
        KeyConditionExpression="#status = :s AND #sk = :k",
        ExpressionAttributeNames={"#status": "status", "#sk": "gsiSortKey"},
        ExpressionAttributeValues={":s": item["status"], ":k": item["gsiSortKey"]},
    )
    return next((i for i in found.get("Items", []) if i["id"] == item["id"]), None)


def process_state(pid: int) -> str:
    """A process's state letter and where in the kernel it waits (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return "gone"
    return f"{stat.rsplit(')', 1)[1].split()[0]} {wchan}"


class ChaosRun:
    """One chaos run: services, processes, the chaos itself, the figures."""

    def __init__(
        self, args: argparse.Namespace, folder: Path, say: Callable[[str], None]
    ) -> None:
        self.args = args
        self.folder = folder
        self.say = say
        self.rng = random.Random(args.seed)
        self.note = Recorder(folder, "orchestrator")
        self.ddb = DynamoDBLocal()
        self.redis = Redis(folder)
        self.procs = Processes(folder, {})
        self.workers: list[subprocess.Popen[bytes]] = []
        self.store: OutboxStore | None = None

    def run(self) -> dict[str, Any]:
        """Run everything, stop everything, and return the figures."""
        try:
            store = self.set_up()
            self.start_processes()
            started = time.monotonic()
            self.make_chaos()
            self.say(
                f"emitter done after {time.monotonic() - started:.0f} s; waiting "
                "for every event to complete or fail"
            )
            self.settle(store)
            took = time.monotonic() - started
            # Read while every process still runs: why is anything stuck?
            stuck = sorted(
                i for i, item in scan(store.client, TABLE).items()
                if item["status"]["S"] in PENDING
            )  # fmt: skip
            diagnosis: dict[str, Any] = {}
            if stuck:
                try:
                    diagnosis = self.diagnose(store, stuck[:3])
                except Exception as exc:  # a diagnosis must not end the run
                    diagnosis = {"error": repr(exc)}
            self.procs.stop()
            table = scan(store.client, TABLE)
            orders = set(scan(store.client, ORDERS))
        finally:
            self.procs.stop()
            self.redis.stop()
            self.ddb.stop()
        figures = analyse(
            list(read_all(self.folder)),
            table,
            orders,
            skew_ms=self.args.skew_ms,
            timeout_ms=self.args.timeout_ms,
        )
        figures["seconds"] = round(took)
        figures["settings"] = self.settings()
        if stuck:
            figures["pending_diagnosis"] = diagnosis
            figures["pending_log"] = self.log_lines(stuck[:3])
        return figures

    def diagnose(self, store: OutboxStore, event_ids: list[str]) -> dict[str, Any]:
        """What the stuck events and the processes look like at the deadline.

        Tells apart the ways an event can stay pending: the status index
        lost it or holds a stale copy (claims built from it fail their
        conditions), no drain runs any more, or messages pile up unread.
        """
        import redis

        now = int(time.time() * 1000)
        events = {}
        for event_id in event_ids:
            item = store.client.get_item(
                TableName=TABLE, Key={"id": {"S": event_id}}, ConsistentRead=True
            ).get("Item", {})
            copy = index_copy(store, item) if item else None
            events[event_id] = {
                "item": {k: next(iter(v.values())) for k, v in item.items()},
                "index_copy": "missing"
                if copy is None
                else "same"
                if copy == item
                else {k: next(iter(v.values()), None) for k, v in copy.items()},
            }
        drains: dict[str, int] = {}
        for rec in read_all(self.folder):
            if rec["k"] in ("drain", "drain-error") and rec["t"] > now - 60_000:
                key = f"{rec['k']} {rec.get('by', '')} claimed={rec.get('claimed')}"
                drains[key] = drains.get(key, 0) + 1
        client = redis.Redis(port=self.redis.port, socket_timeout=2)
        broker: dict[str, Any]
        try:
            broker = {
                "queued": client.llen("chaos"),
                "unacked": client.hlen("unacked"),
            }
        except redis.RedisError as exc:
            broker = {"error": repr(exc)}
        processes = {}
        for name, proc in self.procs.procs.items():
            for pid in [proc.pid, *children(proc.pid)]:
                processes[f"{name}:{pid}"] = process_state(pid)
        return {
            "events": events,
            "drains_last_60s": drains,
            "broker": broker,
            "processes": processes,
        }

    def log_lines(self, event_ids: list[str], limit: int = 40) -> list[str]:
        """The processes' log lines that name any of ``event_ids``."""
        found = []
        for log in sorted(self.folder.glob("*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if any(i in line for i in event_ids):
                    found.append(f"{log.stem}: {line.strip()[:400]}")
        return found[-limit:]

    def set_up(self) -> OutboxStore:
        """DynamoDB Local with the outbox and orders tables, and Redis."""
        fake_credentials()
        self.ddb.start()
        endpoint = self.ddb.endpoint_url
        config = OutboxConfig(
            table_name=TABLE, endpoint_url=endpoint, region_name="us-east-1"
        )
        store = OutboxStore(config)
        store.create_table()
        store.client.create_table(
            TableName=ORDERS,
            BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        )
        self.redis.start()
        return store

    def start_processes(self) -> None:
        """Two workers, two beats and the skewed drain loop; wait for the pools."""
        args = self.args
        self.procs.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
            ),
            "CHAOS_DIR": str(self.folder),
            "CHAOS_BROKER": self.redis.url,
            "CHAOS_ENDPOINT": self.ddb.endpoint_url,
            "CHAOS_TABLE": TABLE,
            "CHAOS_FAULT_RATE": str(args.fault_rate),
            "CHAOS_TIMEOUT_MS": str(args.timeout_ms),
            "CHAOS_POLL_MS": str(args.poll_ms),
            "CHAOS_MAX_RETRIES": str(args.max_retries),
            "CHAOS_HANDLER_QUEUE": args.handler_queue or "",
            "CHAOS_WRITE_MODE": args.write_mode,
        }
        celery = [sys.executable, "-m", "celery", "-A", "chaos.app"]
        queues = ",".join(["chaos", *filter(None, [args.handler_queue])])
        for n in (1, 2):
            self.workers.append(self.procs.spawn(f"worker{n}", [
                *celery, "worker", "-n", f"chaos{n}@%h", "-Q", queues,
                "-c", str(args.concurrency), "-l", "WARNING",
                "--without-gossip", "--without-mingle", "--without-heartbeat",
            ]))  # fmt: skip
            schedule = str(self.folder / f"beat{n}-schedule")
            self.procs.spawn(
                f"beat{n}", [*celery, "beat", "-l", "WARNING", "-s", schedule]
            )
        self.procs.spawn(
            "drainer",
            [sys.executable, "-m", "chaos.drainer"],
            CHAOS_SKEW_MS=str(args.skew_ms),
        )
        wait_for(
            lambda: all(len(children(w.pid)) >= args.concurrency for w in self.workers),
            120,
            "the workers' pool processes",
        )

    def make_chaos(self) -> None:
        """Emit; meanwhile kill worker children and restart Redis once."""
        args = self.args
        self.say(f"emitting {args.events} events at {args.rate}/s")
        emitter = self.procs.spawn("emitter", [
            sys.executable, "-m", "chaos.emitter",
            str(args.events), str(args.rate), str(args.seed), ORDERS,
        ])  # fmt: skip
        started = time.monotonic()
        restart_at: float | None = started + 0.4 * args.events / args.rate
        next_kill = started + self.rng.uniform(0.5, 1.5) * args.kill_every_s
        while emitter.poll() is None:
            self.supervise()
            now = time.monotonic()
            if restart_at is not None and now >= restart_at:
                self.restart_redis()
                restart_at = None
            if now >= next_kill:
                self.kill_a_worker_child()
                next_kill = now + self.rng.uniform(0.5, 1.5) * args.kill_every_s
            wake = min(next_kill, restart_at or next_kill)
            # Sleep until the next action, or until the emitter is done.
            with contextlib.suppress(subprocess.TimeoutExpired):
                emitter.wait(max(0.01, wake - time.monotonic()))
        if restart_at is not None:
            self.restart_redis()

    def supervise(self) -> None:
        """Start again any worker, beat or drainer that exited.

        kombu can end a worker when its broker restarts; in production a
        supervisor starts it again, and so does the run (``respawn`` records).
        """
        names = [f"worker{n}" for n in (1, 2)] + ["beat1", "beat2", "drainer"]
        for name in self.procs.revive(names):
            self.say(f"{name} exited; starting it again")
            self.note("respawn", name=name)
        self.workers = [self.procs.procs[f"worker{n}"] for n in (1, 2)]

    def restart_redis(self) -> None:
        """Restart the broker: every message it held is gone."""
        self.say("restarting Redis")
        self.redis.restart()
        self.note("redis-restart")

    def kill_a_worker_child(self) -> None:
        """SIGKILL one pool process of one worker, chosen at random."""
        victims = [c for w in self.workers for c in children(w.pid)]
        if not victims:
            return
        victim = self.rng.choice(victims)
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
            self.note("kill", victim=victim)

    def settle(self, store: OutboxStore) -> None:
        """Wait, with a deadline, until no event is created or active."""

        def settled() -> bool:
            self.supervise()
            # One consistent scan, not per-status counts: an event moving from
            # active back to created between two count queries is in neither
            # count. A scan reads each item once, and completed and failed
            # are final, so an event it reads as either stays so.
            items = scan(store.client, TABLE).values()
            return not any(item["status"]["S"] in PENDING for item in items)

        try:
            wait_for(
                settled,
                self.args.settle_s,
                "every event to complete or fail",
                interval_s=0.5,
            )
        except TimeoutError as exc:
            self.say(str(exc))

    def settings(self) -> dict[str, Any]:
        """The run's settings, for the figures."""
        args = self.args
        return {
            "events": args.events, "rate_per_s": args.rate,
            "fault_rate": args.fault_rate, "skew_ms": args.skew_ms,
            "processing_timeout_ms": args.timeout_ms, "poll_interval_ms": args.poll_ms,
            "max_retries": args.max_retries, "workers": 2,
            "concurrency": args.concurrency, "beats": 2, "skewed_drain_loops": 1,
            "handler_queue": args.handler_queue, "kill_every_s": args.kill_every_s,
            "write_mode": args.write_mode,
            "seed": args.seed,
        }  # fmt: skip


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=5000, help="events to emit (5000)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--rate", type=float, default=20, help="events emitted per second")
    p.add_argument(
        "--fault-rate",
        type=float,
        default=0.04,
        help="share of DynamoDB calls that fail (0.04)",
    )
    p.add_argument(
        "--skew-ms",
        type=int,
        default=3000,
        help="how far the drain loop's clock runs ahead (3000)",
    )
    p.add_argument("--timeout-ms", type=int, default=8000, help="processing timeout")
    p.add_argument("--poll-ms", type=int, default=500, help="drain interval")
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument(
        "--handler-queue",
        default=None,
        help="a queue of their own for handler messages (default: "
        "they share the drain's queue)",
    )
    p.add_argument(
        "--write-mode",
        choices=["item", "partiql"],
        default="item",
        help="the outbox's write_mode (item)",
    )
    p.add_argument("--concurrency", type=int, default=2, help="pool size per worker")
    p.add_argument(
        "--kill-every-s",
        type=float,
        default=2.0,
        help="mean time between SIGKILLs of worker children",
    )
    p.add_argument(
        "--settle-s",
        type=float,
        default=600,
        help="deadline for the last events to complete or fail",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--keep", action="store_true", help="keep the records and logs")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run, print the figures, and exit 1 if any promise was broken."""
    args = parser().parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(2**32)
    folder = Path(tempfile.mkdtemp(prefix="chaos-"))

    def say(message: str) -> None:
        print(f"[chaos] {message}", file=sys.stderr, flush=True)

    def stop(signum: int, frame: Any) -> None:
        # The processes run in sessions of their own: a SIGTERM (a test
        # runner's timeout, Ctrl-C in another shell) must still reach the
        # clean-up below, or they outlive the run and may later meet
        # another run's Redis on a reused port.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        figures = ChaosRun(args, folder, say).run()
    finally:
        if args.keep:
            say(f"records and logs kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for key, value in figures.items():
            print(f"{key:>30}: {value}")
    return 1 if figures["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
