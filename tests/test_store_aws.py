"""AWS behaviour: botocore's retries, safe resends, placeholders, and backend gaps.

The second half records where moto and DynamoDB Local differ, found while
building the store. Our own checks run before any request, so the store
behaves the same on both; the raw requests below show the gap itself.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from botocore.retries import standard
from store_support import FakeClock, backend, on_clock, scan

from celery_outbox import (
    Completion,
    Event,
    EventStatusError,
    OutboxConfig,
    OutboxStore,
    PayloadError,
    StoreError,
)
from celery_outbox.dynamo import RETRY_ATTEMPTS, make_client


class _Body:
    """The raw body of a canned HTTP response."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **kwargs: Any) -> Any:
        yield self.body


def canned(status: int, code: str) -> AWSResponse:
    """A DynamoDB error response, as the service would send it."""
    body = json.dumps({"__type": f"com.amazonaws.dynamodb.v20120810#{code}"})
    return AWSResponse(
        "http://dynamodb", status, {"x-amzn-errortype": code}, _Body(body.encode())
    )


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's retries without their sleeps, to keep the tests quick."""
    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", lambda s, c: 0)


def fault(
    store: OutboxStore, operation: str, response: AWSResponse, times: int
) -> list[int]:
    """Answer the first ``times`` requests of ``operation`` with ``response``."""
    sent: list[int] = []

    def before_send(**kwargs: Any) -> AWSResponse | None:
        sent.append(1)
        return response if len(sent) <= times else None

    store.client.meta.events.register(f"before-send.dynamodb.{operation}", before_send)
    return sent


class TestRetries:
    """Throttling and transient errors are retried by botocore's standard mode."""

    def test_client_config(self) -> None:
        """The store's own client uses standard retries with ten attempts."""
        client = make_client(OutboxConfig())
        assert client.meta.config.retries == {
            "mode": "standard",
            "total_max_attempts": RETRY_ATTEMPTS,
        }

    @pytest.mark.usefixtures("no_backoff")
    def test_throttling_is_retried(self, store: OutboxStore) -> None:
        """Two throttled answers are retried, and the read then succeeds."""
        store.publish([Event.new("a.b", id="e-1")])
        sent = fault(store, "GetItem", canned(400, "ThrottlingException"), times=2)
        assert store.get_item("e-1") is not None
        assert len(sent) == 3

    @pytest.mark.usefixtures("no_backoff")
    def test_server_errors_are_retried(self, store: OutboxStore) -> None:
        """A 500 answer to a claim's query is retried and the claim goes on."""
        store.publish([Event.new("a.b")])
        sent = fault(store, "Query", canned(500, "InternalServerError"), times=1)
        assert len(store.claim().leases) == 1
        assert len(sent) == 3  # one failed answer, then the two queries

    @pytest.mark.usefixtures("no_backoff")
    def test_giving_up_raises_a_store_error(self, store: OutboxStore) -> None:
        """After every attempt is throttled, a StoreError carries DynamoDB's code."""
        response = canned(400, "ProvisionedThroughputExceededException")
        sent = fault(store, "GetItem", response, times=100)
        with pytest.raises(StoreError) as caught:
            store.get_item("e-1")
        assert caught.value.code == "ProvisionedThroughputExceededException"
        assert len(sent) == RETRY_ATTEMPTS


def resend_once(store: OutboxStore, operation: str) -> list[int]:
    """Make botocore resend the first request of ``operation`` after it succeeded.

    This is what happens when DynamoDB applied a write but its answer was
    lost on the way back.
    """
    seen: list[int] = []

    def needs_retry(**kwargs: Any) -> int | None:
        seen.append(1)
        return 0 if len(seen) == 1 else None

    store.client.meta.events.register_first(
        f"needs-retry.dynamodb.{operation}", needs_retry
    )
    return seen


class TestResends:
    """A resend of a write that was applied is not mistaken for a collision."""

    def test_resent_put(self, store: OutboxStore) -> None:
        """A single publish whose answer was lost finds its own event and succeeds."""
        answers = resend_once(store, "PutItem")
        event = Event.new("a.b", {"n": 1})
        store.publish([event])
        assert len(answers) == 2  # the put went out twice
        assert [i["id"]["S"] for i in scan(store)] == [event.id]

    def test_resent_transaction(self, store: OutboxStore, request: Any) -> None:
        """A resent transaction is applied once thanks to its request token."""
        if backend(request) == "moto":
            pytest.skip("moto ignores ClientRequestToken (see TestBackendGaps)")
        answers = resend_once(store, "TransactWriteItems")
        batch = [Event.new("a.b", n) for n in range(3)]
        store.publish(batch)
        assert len(answers) == 2
        assert len(scan(store)) == 3


IDENTIFIER = re.compile(r"(?<![#:\w])([A-Za-z_]\w*)")
KEYWORDS = {
    "AND",
    "OR",
    "NOT",
    "SET",
    "REMOVE",
    "attribute_not_exists",
    "if_not_exists",
}
EXPRESSIONS = (
    "KeyConditionExpression",
    "FilterExpression",
    "ConditionExpression",
    "UpdateExpression",
    "ProjectionExpression",
)


def test_expressions_name_attributes_through_placeholders(store_factory: Any) -> None:
    """No request of the whole lifecycle names an attribute outside a placeholder."""
    store = store_factory(completion=Completion.KEEP, processing_timeout_ms=1000)
    clock = on_clock(store, FakeClock())
    requests: list[dict[str, Any]] = []
    store.client.meta.events.register(
        "before-parameter-build.dynamodb",
        lambda params, **kwargs: requests.append(params),
    )
    store.publish([Event.new("a.b"), Event.new("a.b")])
    store.publish([Event.new("a.b")])
    first, second, third = store.claim().leases
    store.complete(first)
    store.fail(second, "boom", final=True)
    store.release(third)
    store.claim()
    clock.advance(1000)
    store.claim()  # reclaims the released event's expired lease
    store.retry([second.event.id])
    with pytest.raises(EventStatusError):  # retried already: now created
        store.retry([second.event.id], strict=True)
    list(store.iter_failed(type="a.b"))
    store.stats()
    store.purge_completed(0)
    found = []
    for params in requests:
        for actions in [
            params,
            *[next(iter(a.values())) for a in params.get("TransactItems", [])],
        ]:
            for name in EXPRESSIONS:
                found += IDENTIFIER.findall(actions.get(name, ""))
    assert found and set(found) <= KEYWORDS


class TestBackendGaps:
    """Where moto and DynamoDB Local differ (each test states both behaviours)."""

    def raw_put(self, store: OutboxStore, value: dict[str, Any]) -> str:
        """Put a raw item; ``ok`` or DynamoDB's error code."""
        item = {"id": {"S": uuid.uuid4().hex}, "payload": value}
        try:
            store.client.put_item(TableName=store.table, Item=item)
        except ClientError as exc:
            return str(exc.response["Error"]["Code"])
        return "ok"

    @pytest.mark.parametrize(
        ("value", "bad"),
        [
            ({"M": {"": {"S": "x"}}}, {"": "x"}),
            ({"N": "1" * 39}, 10**38 + 1),
            ({"N": "1E+126"}, 1e126),
        ],
        ids=["empty map key", "39 digits", "number overflow"],
    )
    def test_limits_only_dynamodb_local_enforces(
        self, store: OutboxStore, request: Any, value: Any, bad: Any
    ) -> None:
        """moto stores values DynamoDB refuses; our check refuses them on both."""
        expected = "ok" if backend(request) == "moto" else "ValidationException"
        assert self.raw_put(store, value) == expected
        with pytest.raises(PayloadError):
            store.publish([Event.new("a.b", bad)])

    def test_nesting_limit(self, store: OutboxStore, request: Any) -> None:
        """DynamoDB Local refuses 32 nested maps; moto takes any depth."""
        value: Any = {"S": "leaf"}
        for _ in range(32):
            value = {"M": {"k": value}}
        expected = "ok" if backend(request) == "moto" else "ValidationException"
        assert self.raw_put(store, value) == expected

    def test_request_token(self, store: OutboxStore, request: Any) -> None:
        """DynamoDB Local applies a repeated request token once; moto cancels it."""
        token = str(uuid.uuid4())
        action = {
            "Put": {
                "TableName": store.table,
                "Item": {"id": {"S": "t-1"}},
                "ConditionExpression": "attribute_not_exists(#id)",
                "ExpressionAttributeNames": {"#id": "id"},
            }
        }
        outcomes = []
        for _ in range(2):
            try:
                store.client.transact_write_items(
                    TransactItems=[action], ClientRequestToken=token
                )
                outcomes.append("ok")
            except ClientError as exc:
                outcomes.append(exc.response["Error"]["Code"])
        if backend(request) == "moto":
            assert outcomes == ["ok", "TransactionCanceledException"]
        else:
            assert outcomes == ["ok", "ok"]

    def test_conditional_writes_are_atomic(
        self, store: OutboxStore, endpoint: str
    ) -> None:
        """Two clients racing conditional writes over 100 items win each once.

        On moto's own server both could win (it checks and writes in separate
        steps); ``celery_outbox.testing.MotoServer`` serves one request at a
        time to match DynamoDB.
        """
        for n in range(100):
            store.client.put_item(TableName=store.table, Item={"id": {"S": str(n)}})
        barrier = threading.Barrier(2, timeout=30)
        wins = [0, 0]

        def race(side: int) -> None:
            client = boto3.client("dynamodb", endpoint_url=endpoint)
            barrier.wait()
            for n in range(100):
                try:
                    client.update_item(
                        TableName=store.table,
                        Key={"id": {"S": str(n)}},
                        UpdateExpression="SET #o = :o",
                        ConditionExpression="attribute_not_exists(#o)",
                        ExpressionAttributeNames={"#o": "owner"},
                        ExpressionAttributeValues={":o": {"N": str(side)}},
                    )
                    wins[side] += 1
                except ClientError as exc:
                    assert (
                        exc.response["Error"]["Code"]
                        == "ConditionalCheckFailedException"
                    )

        threads = [threading.Thread(target=race, args=(side,)) for side in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sum(wins) == 100
