"""``celery-outbox demo``: the whole outbox path, on real parts, in seconds.

The demo plays a small shop. It creates an outbox table and an orders
table, places orders, each one a DynamoDB transaction holding the order
and its events, and lets a real Celery worker with embedded beat drain the
events through three handlers:

* ``order.placed`` reserves stock: it always succeeds;
* ``payment.captured`` hits a payment gateway that times out on the first
  attempt for about a quarter of the payments (``autoretry_for``): those
  complete on a retry;
* ``order.exported`` sends the order to an ERP that is offline: every
  attempt fails, and the event ends ``failed``.

It shows progress, prints a summary and the failed events, then does what
an operator would: brings the ERP back and retries one failed event, which
completes. Exit status 0 means every event ended as intended.

Parts, each replaceable by a real one:

* DynamoDB: moto's server in this process, or ``--dynamodb-endpoint``
  (DynamoDB Local, or AWS);
* broker: Redis at ``redis://127.0.0.1:6379/0`` when it answers, else
  kombu's filesystem transport in a temporary folder (``--broker``
  chooses; ``--broker embedded`` forces the latter). Queue and tables have
  names of their own per run, so a shared Redis is safe;
* worker and beat: ``celery worker -B`` in a subprocess, threads pool.

``python -m celery_outbox.demo`` runs it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from celery import Celery, signals
from kombu.transport import filesystem

from celery_outbox.config import OutboxConfig
from celery_outbox.event import Event
from celery_outbox.outbox import Outbox
from celery_outbox.testing import MotoServer, fake_credentials

__all__ = ["DEFAULT_BROKER", "demo", "main", "make_worker_app"]

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
EMBEDDED = "embedded"
EMBEDDED_URL = "filesystem://"
ENV_PREFIX = "CELERY_OUTBOX_DEMO_"
EXPORT_EVERY = 20
"""Every this many orders is exported to the ERP (and fails)."""

# Short intervals so the demo settles in seconds; see the README for
# production values.
DEMO_SETTINGS: dict[str, Any] = {
    "outbox_poll_interval_ms": 200,
    "outbox_base_backoff_ms": 200,
    "outbox_max_backoff_ms": 2000,
    "outbox_max_retries": 2,
    "outbox_processing_timeout_ms": 20_000,
    "outbox_completion": "keep",
}
HANDLER_TIME_LIMIT_S = 10


class GatewayTimeout(Exception):
    """The payment gateway did not answer in time (retried automatically)."""


class ERPUnavailable(Exception):
    """The ERP refused the export."""


# -- the embedded broker -------------------------------------------------


class _AtomicFilesystemChannel(filesystem.Channel):
    """kombu's filesystem channel, writing each message file atomically.

    kombu creates the message file under its final name and then writes
    it, so a consumer in another process can pick it up empty and stop on
    a JSON error. Written under a name consumers ignore and then renamed,
    a message appears whole or not at all.
    """

    def _put(  # type: ignore[override]  # kombu's own bases disagree
        self, queue: Any, payload: Any, **kwargs: Any
    ) -> None:
        # kombu orders messages by this monotonic-milliseconds prefix.
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + ".partial"
        with open(partial, "wb") as file:
            file.write(json.dumps(payload).encode("utf-8"))
        os.replace(partial, final)


class EmbeddedTransport(filesystem.Transport):
    """The demo's embedded broker: files in a folder, shared by processes."""

    Channel = _AtomicFilesystemChannel


# -- the worker's side ----------------------------------------------------


def make_worker_app(env: dict[str, str] | None = None) -> Celery:
    """The demo shop's Celery app and handlers, configured from ``env``."""
    env = dict(os.environ if env is None else env)
    app = Celery("celery_outbox_demo", broker=env[ENV_PREFIX + "BROKER"])
    if env[ENV_PREFIX + "BROKER"] == EMBEDDED_URL:
        app.conf.broker_transport = f"{__name__}:EmbeddedTransport"
    app.conf.update(
        broker_transport_options=json.loads(env.get(ENV_PREFIX + "TRANSPORT", "{}")),
        broker_connection_retry_on_startup=True,
        task_default_queue=env[ENV_PREFIX + "QUEUE"],
        worker_enable_remote_control=False,
        worker_hijack_root_logger=False,
        outbox_table_name=env[ENV_PREFIX + "TABLE"],
        outbox_endpoint_url=env[ENV_PREFIX + "ENDPOINT"],
        **DEMO_SETTINGS,
    )
    outbox = Outbox(app)
    orders = env[ENV_PREFIX + "ORDERS"]
    ready_file = env.get(ENV_PREFIX + "READY")

    @signals.worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def announce_ready(sender: Any = None, **kwargs: Any) -> None:
        if ready_file:
            Path(ready_file).touch()

    def set_flag(order_id: str, flag: str) -> None:
        outbox.store.client.update_item(
            TableName=orders,
            Key={"id": {"S": order_id}},
            UpdateExpression="SET #f = :t",
            ExpressionAttributeNames={"#f": flag},
            ExpressionAttributeValues={":t": {"BOOL": True}},
        )

    @outbox.handler("order.placed", time_limit=HANDLER_TIME_LIMIT_S)
    def reserve_stock(event: Event) -> None:
        set_flag(event.payload["order_id"], "reserved")

    @outbox.handler(
        "payment.captured",
        time_limit=HANDLER_TIME_LIMIT_S,
        autoretry_for=(GatewayTimeout,),
        retry_kwargs={"countdown": 0.2},
    )
    def capture_payment(event: Event) -> None:
        if event.attempt == 1 and times_out(event.id):
            raise GatewayTimeout(
                f"payment gateway timed out capturing {event.payload['amount']}"
            )
        set_flag(event.payload["order_id"], "paid")

    @outbox.handler("order.exported", time_limit=HANDLER_TIME_LIMIT_S)
    def export_to_erp(event: Event) -> None:
        erp = outbox.store.client.get_item(
            TableName=orders, Key={"id": {"S": "config#erp"}}, ConsistentRead=True
        ).get("Item", {})
        if not erp.get("online", {}).get("BOOL", False):
            raise ERPUnavailable(
                f"ERP rejected order {event.payload['order_id']}: "
                "503 Service Unavailable"
            )
        set_flag(event.payload["order_id"], "exported")

    return app


def times_out(event_id: str) -> bool:
    """Whether the gateway times out on this payment's first attempt (1 in 4)."""
    return hashlib.sha256(event_id.encode()).digest()[0] % 4 == 0


def __getattr__(name: str) -> Any:
    # ``celery -A celery_outbox.demo:worker_app`` builds the app on demand,
    # so importing this module for the command builds nothing.
    if name == "worker_app":
        return make_worker_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- the command's side ---------------------------------------------------


@dataclass
class Run:
    """One demo run: its names, parts and results."""

    events: int
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    broker: str = ""
    transport: dict[str, Any] = field(default_factory=dict)
    endpoint: str = ""
    emitted: list[Event] = field(default_factory=list)
    log_file: Path | None = None
    """Where the worker logs at INFO level; a temporary file at WARNING if None."""

    @property
    def table(self) -> str:
        """The outbox table of this run."""
        return f"celery-outbox-demo-{self.run_id}"

    @property
    def orders(self) -> str:
        """The business table of this run."""
        return f"celery-outbox-demo-orders-{self.run_id}"

    @property
    def queue(self) -> str:
        """The Celery queue of this run; nothing else consumes it."""
        return f"celery-outbox-demo-{self.run_id}"

    def env(self, folder: Path) -> dict[str, str]:
        """The worker's environment."""
        return {
            ENV_PREFIX + "READY": str(folder / "ready"),
            **os.environ,
            ENV_PREFIX + "BROKER": self.broker,
            ENV_PREFIX + "TRANSPORT": json.dumps(self.transport),
            ENV_PREFIX + "QUEUE": self.queue,
            ENV_PREFIX + "TABLE": self.table,
            ENV_PREFIX + "ORDERS": self.orders,
            ENV_PREFIX + "ENDPOINT": self.endpoint,
        }


def _redis_answers(url: str) -> bool:
    try:
        import redis
    except ImportError:
        return False
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except Exception:
        return False


def _check_broker(url: str) -> None:
    """Fail at once, with kombu's reason, when ``url`` names no broker we reach.

    Without it a worker pointed at a wrong URL exits before it logs anything,
    and one pointed at a broker that is down retries until the timeout.
    """
    app = Celery("celery_outbox.demo.check", broker=url)
    app.conf.broker_connection_timeout = 3
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=5)
    except Exception as exc:
        raise click.ClickException(
            f"cannot reach the broker {url}: {type(exc).__name__}: {exc}"
        ) from None


def _embedded_broker(folder: Path) -> tuple[str, dict[str, Any]]:
    """kombu's filesystem transport: plain files, shared across processes."""
    messages = folder / "broker"
    messages.mkdir()
    (folder / "control").mkdir()
    return EMBEDDED_URL, {
        "data_folder_in": str(messages),
        "data_folder_out": str(messages),
        "control_folder": str(folder / "control"),
        "store_processed": False,
        "polling_interval": 0.05,
    }


@contextlib.contextmanager
def _dynamodb(endpoint: str | None) -> Iterator[str]:
    if endpoint:
        fake_credentials()
        yield endpoint
        return
    server = MotoServer()
    with contextlib.redirect_stdout(sys.stderr):  # its banner, not our output
        server.start()
    try:
        yield server.endpoint_url
    finally:
        server.stop()


@contextlib.contextmanager
def _worker(run: Run, folder: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``celery worker -B`` for the run, stopped (its whole group) afterwards."""
    log = run.log_file or folder / "worker.log"
    command = [
        sys.executable, "-m", "celery", "-A", "celery_outbox.demo:worker_app",
        "worker", "-B", "-s", str(folder / "beat-schedule"),
        "-P", "threads", "-c", "8", "-Q", run.queue, "-n", f"demo-{run.run_id}@%h",
        "--without-mingle", "--without-gossip", "--without-heartbeat",
        "-l", "info" if run.log_file else "warning", "-f", str(log),
    ]  # fmt: skip
    # What the worker prints before its logging is set up (a bad setting, an
    # import error) goes to stderr, not to its log.
    stderr = folder / "worker.stderr"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            command,
            env=run.env(folder),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,  # its own group: beat and pool go with it
        )
    try:
        yield proc
    except BaseException:
        for name, path in (("log", log), ("error output", stderr)):
            text = path.read_text(errors="replace") if path.exists() else ""
            if text.strip():
                tail = text.splitlines()[-30:]
                click.echo(f"The worker's {name} ends with:", err=True)
                click.echo("\n".join(f"  {line}" for line in tail), err=True)
        raise
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    # Children that outlived the main process (beat, pool) share its group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_ready(worker: subprocess.Popen[bytes], ready: Path, deadline: float) -> None:
    while not ready.exists():
        if worker.poll() is not None:
            raise click.ClickException(f"the worker exited with {worker.returncode}")
        if time.monotonic() > deadline:
            raise click.ClickException("the worker did not become ready in time")
        time.sleep(0.1)


def _create_orders_table(outbox: Outbox, name: str) -> None:
    client = outbox.store.client
    client.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
    )
    client.get_waiter("table_exists").wait(
        TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
    )
    client.put_item(
        TableName=name, Item={"id": {"S": "config#erp"}, "online": {"BOOL": False}}
    )


def _place_orders(outbox: Outbox, run: Run) -> None:
    """Place orders, each with its events in one transaction, until N events."""
    number = 0
    while len(run.emitted) < run.events:
        number += 1
        order_id = f"order-{run.run_id}-{number:05d}"
        amount = f"{(number * 7919) % 20000 / 100 + 5:.2f} EUR"
        types = ["order.placed", "payment.captured"]
        if number % EXPORT_EVERY == 0:
            types.append("order.exported")
        types = types[: run.events - len(run.emitted)]
        with outbox.transaction() as tx:
            tx.put(
                run.orders,
                {"id": order_id, "amount": amount, "items": number % 5 + 1},
                condition="attribute_not_exists(#id)",
                names={"#id": "id"},
            )
            for event_type in types:
                body = {"order_id": order_id, "amount": amount}
                run.emitted.append(outbox.emit(event_type, body))


def _settled(counts: Mapping[str, int], total: int) -> bool:
    return counts.get("completed", 0) + counts.get("failed", 0) >= total and not (
        counts.get("created", 0) or counts.get("active", 0)
    )


def _progress(
    outbox: Outbox,
    worker: subprocess.Popen[bytes],
    total: int,
    deadline: float,
    quiet: bool,
) -> None:
    """Poll the table's counts until every event settled; show progress."""
    last = ""
    while True:
        # One scan of the demo's small table costs moto far less than the
        # per-status counts of OutboxStore.stats().
        counts = Counter(i["status"]["S"] for i in _scan(outbox, "#s"))
        line = (
            f"  completed {counts.get('completed', 0):>5}/{total}   "
            f"due {counts.get('created', 0):>4}   "
            f"running {counts.get('active', 0):>4}   "
            f"failed {counts.get('failed', 0):>3}"
        )
        if not quiet and line != last:
            click.echo(line, err=True)
            last = line
        if _settled(counts, total):
            return
        if worker.poll() is not None:
            raise click.ClickException(f"the worker exited with {worker.returncode}")
        if time.monotonic() > deadline:
            raise click.ClickException(
                f"the demo did not settle in time; last counts: {counts}"
            )
        time.sleep(0.5)


def _scan(outbox: Outbox, projection: str | None = None) -> list[dict[str, Any]]:
    request: dict[str, Any] = {"TableName": outbox.store.table, "ConsistentRead": True}
    if projection:
        request["ProjectionExpression"] = projection
        request["ExpressionAttributeNames"] = {"#s": "status"}
    items: list[dict[str, Any]] = []
    for page in outbox.store.client.get_paginator("scan").paginate(**request):
        items.extend(page.get("Items", []))
    return items


def _operator_retry(
    outbox: Outbox, run: Run, event_id: str, deadline: float
) -> dict[str, Any]:
    """Bring the ERP back, retry one failed event, wait for it to complete."""
    outbox.store.client.put_item(
        TableName=run.orders, Item={"id": {"S": "config#erp"}, "online": {"BOOL": True}}
    )
    report = outbox.store.retry([event_id])
    while time.monotonic() < deadline:
        status = outbox.store.status_of(event_id)
        if status is not None and status.value in ("completed", "failed"):
            return {"id": event_id, "retried": report.retried == [event_id],
                    "outcome": status.value}  # fmt: skip
        time.sleep(0.1)
    return {
        "id": event_id,
        "retried": report.retried == [event_id],
        "outcome": "timeout",
    }


def run_demo(
    events: int,
    broker: str | None,
    dynamodb_endpoint: str | None,
    timeout_s: float,
    quiet: bool,
    worker_log: Path | None = None,
) -> dict[str, Any]:
    """Run the demo and return its summary."""
    run = Run(events=events, log_file=worker_log)

    def say(text: str) -> None:
        if not quiet:
            click.echo(text, err=True)

    with tempfile.TemporaryDirectory(prefix="celery-outbox-demo-") as tmp:
        folder = Path(tmp)
        if broker is None:
            broker = DEFAULT_BROKER if _redis_answers(DEFAULT_BROKER) else EMBEDDED
        if broker == EMBEDDED:
            run.broker, run.transport = _embedded_broker(folder)
        else:
            _check_broker(broker)
            run.broker = broker
        with _dynamodb(dynamodb_endpoint) as endpoint:
            run.endpoint = endpoint
            outbox = Outbox(
                config=OutboxConfig(table_name=run.table, endpoint_url=endpoint)
            )
            say(f"DynamoDB at {endpoint}; broker {run.broker} (queue {run.queue})")
            outbox.store.create_table()
            _create_orders_table(outbox, run.orders)
            try:
                with _worker(run, folder) as worker:
                    deadline = time.monotonic() + timeout_s
                    say("Starting a Celery worker with beat...")
                    _wait_ready(worker, folder / "ready", deadline)
                    say("Worker ready; placing orders...")
                    start = time.monotonic()
                    _place_orders(outbox, run)
                    say(f"Emitted {len(run.emitted)} events in transactions.")
                    _progress(outbox, worker, len(run.emitted), deadline, quiet)
                    elapsed = time.monotonic() - start
                    items = _scan(outbox)
                    failed = [f.as_dict() for f in outbox.store.iter_failed()]
                    retried: dict[str, Any] = {}
                    if failed:
                        say("Operator: ERP is back; retrying one failed event...")
                        # The event the summary lists first; asking the index
                        # again could miss it while its copy lags.
                        retried = _operator_retry(
                            outbox, run, failed[0]["id"], deadline
                        )
                        retried["after"] = _counts(_scan(outbox))
                    if worker.poll() is not None:
                        raise click.ClickException(
                            f"the worker exited with {worker.returncode}"
                        )
            finally:
                if dynamodb_endpoint:
                    outbox.store.delete_table()
                    outbox.store.client.delete_table(TableName=run.orders)
                _forget_queue(run)
    return _summary(run, items, failed, retried, elapsed)


def _counts(items: list[dict[str, Any]]) -> dict[str, int]:
    """How many of ``items`` are completed and failed."""
    statuses = [i["status"]["S"] for i in items]
    return {name: statuses.count(name) for name in ("completed", "failed")}


def _forget_queue(run: Run) -> None:
    """Remove the run's queue and bindings from a Redis broker."""
    if not run.broker.startswith(("redis://", "rediss://")):
        return
    with contextlib.suppress(Exception):
        import redis

        client = redis.Redis.from_url(run.broker, socket_timeout=2)
        # The queue itself and kombu's bindings for it carry its name.
        keys = list(client.scan_iter(match=f"*{run.queue}*"))
        if keys:
            client.delete(*keys)


def _summary(
    run: Run,
    items: list[dict[str, Any]],
    failed: list[dict[str, Any]],
    retried_by_operator: dict[str, Any],
    elapsed: float,
) -> dict[str, Any]:
    status = {i["id"]["S"]: i["status"]["S"] for i in items}
    retries = {i["id"]["S"]: int(i.get("retryCount", {"N": "0"})["N"]) for i in items}
    completed = [i for i, s in status.items() if s == "completed"]
    expected_failed = {e.id for e in run.emitted if e.type == "order.exported"}
    transient = {
        e.id for e in run.emitted if e.type == "payment.captured" and times_out(e.id)
    }
    as_intended = (
        {i for i, s in status.items() if s == "failed"} == expected_failed
        and set(completed) == {e.id for e in run.emitted} - expected_failed
        and all(retries[i] >= 1 for i in transient)
        and retried_by_operator.get("outcome", "completed") == "completed"
    )
    return {
        "ok": as_intended,
        "emitted": len(run.emitted),
        "completed": len(completed),
        "retried": sum(1 for i in completed if retries[i] > 0),
        "failed": len(failed),
        "elapsed_s": round(elapsed, 2),
        "events_per_s": round(len(run.emitted) / elapsed, 1) if elapsed else None,
        "broker": run.broker,
        "dynamodb_endpoint": run.endpoint,
        "failed_events": failed,
        "operator_retry": retried_by_operator,
    }


def _print_summary(summary: dict[str, Any]) -> None:
    echo = click.echo
    echo("")
    echo("Summary")
    for key in ("emitted", "completed", "retried", "failed"):
        echo(f"  {key:<12} {summary[key]}")
    echo(f"  {'elapsed':<12} {summary['elapsed_s']} s")
    echo(f"  {'throughput':<12} {summary['events_per_s']} events/s")
    if summary["failed_events"]:
        echo("")
        echo("Failed events (before the operator retry)")
        for event in summary["failed_events"]:
            echo(
                f"  {event['id']}  {event['type']}  failed attempts "
                f"{event['retry_count']}  {event['last_error']}"
            )
    retry = summary["operator_retry"]
    if retry:
        echo("")
        echo(f"Operator retry of {retry['id']}: {retry['outcome']}")
        after = retry["after"]
        echo(f"  now completed {after['completed']}, failed {after['failed']}")
    echo("")
    echo("Every event ended as intended." if summary["ok"] else "Some events did not!")


@click.command("demo")
@click.option(
    "--events",
    "-n",
    default=100,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="How many events to emit.",
)
@click.option(
    "--broker",
    metavar="URL",
    help=f"Broker URL. Default: {DEFAULT_BROKER} when it answers, else an "
    f"embedded broker; '{EMBEDDED}' forces the embedded one.",
)
@click.option(
    "--dynamodb-endpoint",
    metavar="URL",
    help="DynamoDB endpoint, e.g. DynamoDB Local. Default: moto in-process.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option(
    "--worker-log",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keep the worker's log (INFO level) in this file.",
)
@click.option(
    "--timeout",
    "timeout_s",
    default=180.0,
    show_default=True,
    help="Give up after this many seconds.",
)
def demo(
    events: int,
    broker: str | None,
    dynamodb_endpoint: str | None,
    as_json: bool,
    worker_log: Path | None,
    timeout_s: float,
) -> None:
    """Run the outbox end to end: emit, drain, handle, retry, report."""
    summary = run_demo(
        events, broker, dynamodb_endpoint, timeout_s, quiet=False, worker_log=worker_log
    )
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    if not summary["ok"]:
        raise SystemExit(1)


def main() -> None:
    """``python -m celery_outbox.demo``."""
    demo()


if __name__ == "__main__":
    main()
