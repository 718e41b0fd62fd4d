"""The IAM policy grants exactly the DynamoDB actions a whole lifecycle calls.

Every DynamoDB request the library sends is recorded through botocore's
``before-call`` hook while an outbox goes through its whole life: table
creation, checks, emits (alone, duplicated, inside a caller's transaction),
drains that complete, retry, fail and reclaim events, a released lease, the
management tasks and the CLI. The recorded (action, resource) pairs must be
the pairs the printed policy allows, no more and no fewer.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.bin.base import CLIContext
from click.testing import CliRunner

from celery_outbox import (
    Completion,
    Event,
    EventExistsError,
    Outbox,
    OutboxConfig,
    WriteMode,
    iam,
)
from celery_outbox import management as mgmt
from celery_outbox.cli import outbox as outbox_command
from celery_outbox.diagnosis import diagnose
from celery_outbox.store import make_client

pytestmark = pytest.mark.integration

# How IAM authorises each part of a TransactWriteItems call.
TRANSACT_PARTS = {
    "Put": "dynamodb:PutItem",
    "Update": "dynamodb:UpdateItem",
    "Delete": "dynamodb:DeleteItem",
    "ConditionCheck": "dynamodb:ConditionCheckItem",
}
ARN = "arn:aws:dynamodb:*:*:table/"
# How IAM authorises each PartiQL statement, by its verb.
PARTIQL_VERBS = {
    "SELECT": "dynamodb:PartiQLSelect",
    "INSERT": "dynamodb:PartiQLInsert",
    "UPDATE": "dynamodb:PartiQLUpdate",
    "DELETE": "dynamodb:PartiQLDelete",
}


class Recorder:
    """Collects the (action, resource ARN) pairs of the requests it sees."""

    def __init__(self) -> None:
        self.tables: set[str] = set()
        self.setup: set[tuple[str, str]] = set()
        self.runtime: set[tuple[str, str]] = set()
        self._phase = self.runtime

    def attach(self, client: Any, table: str) -> None:
        """Record the requests ``client`` sends about ``table``."""
        self.tables.add(table)
        client.meta.events.register("before-call.dynamodb.*", self._record)

    @contextlib.contextmanager
    def during_setup(self) -> Iterator[None]:
        """Record the calls in this block as table setup."""
        self._phase = self.setup
        try:
            yield
        finally:
            self._phase = self.runtime

    def _record(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        body = json.loads(params.get("body") or b"{}")
        if model.name == "TransactWriteItems":
            for part in body["TransactItems"]:
                for kind, action in part.items():
                    self._add(TRANSACT_PARTS[kind], action["TableName"], None)
        elif model.name == "BatchWriteItem":
            for table in body["RequestItems"]:
                self._add("dynamodb:BatchWriteItem", table, None)
        elif model.name in ("ExecuteStatement", "BatchExecuteStatement"):
            statements = body.get("Statements") or [body]
            for statement in statements:
                self._add_statement(statement["Statement"])
        else:
            action = f"dynamodb:{model.name}"
            self._add(action, body["TableName"], body.get("IndexName"))

    def _add_statement(self, text: str) -> None:
        words = text.replace('"', " ").split()
        verb = words[0].upper()
        after = {"SELECT": "FROM", "DELETE": "FROM", "INSERT": "INTO"}.get(verb)
        table = words[1] if after is None else words[words.index(after) + 1]
        self._add(PARTIQL_VERBS[verb], table, None)

    def _add(self, action: str, table: str, index: str | None) -> None:
        if table not in self.tables:
            return  # the caller's business table: its policy is the caller's
        resource = ARN + table + (f"/index/{index}" if index else "")
        self._phase.add((action, resource))


class Clock:
    """A clock the test moves forward."""

    def __init__(self) -> None:
        self.now_ms = 1_800_000_000_000

    def __call__(self) -> int:
        return self.now_ms


def granted(document: dict[str, Any]) -> set[tuple[str, str]]:
    """The (action, resource) pairs a policy document allows."""
    pairs = set()
    for statement in document["Statement"]:
        assert statement["Effect"] == "Allow"
        resources = statement["Resource"]
        for resource in [resources] if isinstance(resources, str) else resources:
            pairs.update((action, resource) for action in statement["Action"])
    return pairs


def live_through(
    endpoint: str,
    completion: Completion,
    recorder: Recorder,
    business: str,
    write_mode: WriteMode = WriteMode.ITEM,
) -> OutboxConfig:
    """Take one outbox through its whole lifecycle; return its configuration."""
    config = OutboxConfig(
        table_name=f"iam-{uuid.uuid4().hex[:10]}",
        endpoint_url=endpoint,
        completion=completion,
        max_retries=1,
        base_backoff_ms=1000,
        max_backoff_ms=1000,
        processing_timeout_ms=5000,
        write_mode=write_mode,
    )
    client = make_client(config)
    recorder.attach(client, config.table_name)
    clock = Clock()
    app = Celery(f"iam-{completion.value}", broker="memory://", set_as_current=False)
    app.conf.task_always_eager = True
    outbox = Outbox(app, config=config, client=client, clock=clock)

    @outbox.handler("order.created", name=f"{config.table_name}.created")
    def created(event: Any) -> None:
        """Succeeds."""

    @outbox.handler("order.broken", name=f"{config.table_name}.broken")
    def broken(event: Any) -> None:
        """Always fails."""
        raise RuntimeError("broken on purpose")

    with recorder.during_setup():
        outbox.store.create_table()
    diagnose(outbox.store, app=app, handlers=outbox.handlers)

    first = outbox.emit("order.created", {"n": 1})
    with pytest.raises(EventExistsError):
        outbox.emit("order.created", {"n": 2}, id=first.id)
    with outbox.transaction() as tx:
        tx.put(business, {"pk": uuid.uuid4().hex})
        outbox.emit("order.broken", {"n": 3})
        outbox.emit("order.unhandled", {"n": 4})
    outbox.publish_each([Event.new("order.created", {"n": 7})])
    outbox.drain()  # completes, fails with a retry left, fails for no handler
    clock.now_ms += 2000
    outbox.drain()  # the broken event's last attempt: now failed

    outbox.emit("order.created", {"n": 5})
    outbox.store.claim()  # a worker that is then lost
    clock.now_ms += 6000
    outbox.drain()  # reclaims the expired lease and completes it
    outbox.emit("order.created", {"n": 6})
    outbox.store.release(outbox.store.claim().leases[0])  # a dispatch refused
    outbox.drain()

    failed = app.tasks[mgmt.FAILED_EVENTS].delay(limit=1).get()
    app.tasks[mgmt.FAILED_EVENTS].delay(cursor=failed["cursor"]).get()
    app.tasks[mgmt.STATS].delay().get()
    app.tasks[mgmt.RETRY_FAILED].delay(ids=[failed["events"][0]["id"], "nope"]).get()
    app.tasks[mgmt.RETRY_FAILED].delay(type="order.unhandled").get()
    outbox.drain()
    app.tasks[mgmt.PURGE_COMPLETED].delay(older_than_ms=0).get()
    outbox.writer.flush()

    runner = CliRunner()
    obj = CLIContext(app=app, no_color=True, workdir=None)
    for args in (["failed"], ["stats"], ["retry", "--all-failed", "--yes"], ["check"]):
        result = runner.invoke(outbox_command, args, obj=obj)
        assert result.exit_code in (0, 3), result.output
    return config


@contextlib.contextmanager
def business_table_on(endpoint: str) -> Iterator[str]:
    """A caller's own table, written in the same transaction as events."""
    client = make_client(OutboxConfig(endpoint_url=endpoint))
    name = f"orders-{uuid.uuid4().hex[:8]}"
    client.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
    )
    try:
        yield name
    finally:
        client.delete_table(TableName=name)


@pytest.fixture
def business_table(endpoint: str) -> Iterator[str]:
    """A business table on the current backend."""
    with business_table_on(endpoint) as name:
        yield name


def assert_policy_grants_the_calls(
    endpoint: str, business: str, write_mode: WriteMode = WriteMode.ITEM
) -> None:
    """In both completion modes the policy grants exactly the calls made."""
    for completion in Completion:
        recorder = Recorder()
        config = live_through(endpoint, completion, recorder, business, write_mode)
        assert recorder.runtime == granted(iam.policy(config)), completion
        assert recorder.runtime | recorder.setup == granted(
            iam.policy(config, setup=True)
        ), completion


def test_policy_grants_exactly_what_the_lifecycle_calls(
    endpoint: str, business_table: str
) -> None:
    """In both completion modes the policy grants exactly the calls made."""
    assert_policy_grants_the_calls(endpoint, business_table)


def test_policy_grants_what_the_partiql_write_mode_calls(
    ddb_local_endpoint: str,
) -> None:
    """With write_mode "partiql" the policy grants its PartiQL statements too.

    DynamoDB Local only: moto does not run PartiQL statements with conditions.
    """
    with business_table_on(ddb_local_endpoint) as business:
        assert_policy_grants_the_calls(ddb_local_endpoint, business, WriteMode.PARTIQL)
