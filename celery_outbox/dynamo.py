"""Low-level access to the outbox table, shared by the store's parts.

The client and its retry configuration, expressions whose attribute names
all go through ``#placeholders``, the conditional update, paged queries of
the status index, transactions, and the translation of botocore's errors
into the outbox's own.

Throttling, 5xx answers and dropped connections are retried by botocore
(``standard`` retry mode, see :func:`make_client`), never by loops here.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from celery_outbox import event as ev
from celery_outbox.config import OutboxConfig
from celery_outbox.errors import OutboxError, StoreError, TableError
from celery_outbox.event import Status
from celery_outbox.shards import StatusKeys

__all__ = [
    "CONDITION_FAILED",
    "NAMES",
    "PROMPT_ATTEMPTS",
    "RETRY_ATTEMPTS",
    "Clock",
    "DynamoTable",
    "error_code",
    "make_client",
    "placeholders",
    "wall_clock_ms",
]

Clock = Callable[[], int]
CONDITION_FAILED = "ConditionalCheckFailedException"
RETRY_ATTEMPTS = 10
"""botocore's attempts per request, the first included."""
PROMPT_ATTEMPTS = 2
"""The same for a prompt client (:func:`make_client`)."""

# Every attribute an expression names goes through a placeholder: ``status``,
# ``type`` and ``payload`` are reserved words in DynamoDB.
NAMES = {
    "#id": ev.ID,
    "#type": ev.TYPE,
    "#status": ev.STATUS,
    "#sk": ev.SORT_KEY,
    "#retry": ev.RETRY_COUNT,
    "#started": ev.STARTED_ON,
    "#completed": ev.COMPLETED_ON,
    "#error": ev.LAST_ERROR,
    "#token": ev.LEASE_TOKEN,
    "#expires": ev.EXPIRES_AT,
    "#running": ev.RUNNING_SINCE,
    "#operator": ev.OPERATOR_RETRIES,
    "#copy": ev.RUNNING_BY,
}


def placeholders(*expressions: str) -> dict[str, str]:
    """The ``#names`` the expressions use, and no others.

    DynamoDB refuses a request that defines a name it does not use.
    """
    text = " ".join(expressions)
    return {k: v for k, v in NAMES.items() if k in text}


def wall_clock_ms() -> int:
    """Milliseconds since the epoch, the unit of ``gsiSortKey``."""
    return time.time_ns() // 1_000_000


def make_client(config: OutboxConfig, *, prompt: bool = False) -> Any:
    """A DynamoDB client for ``config``, with botocore's standard retries.

    ``standard`` mode retries throttling, 5xx answers and connection errors
    with jittered exponential backoff; ten attempts ride out short bursts.
    A ``prompt`` client gives up within seconds instead (two attempts,
    short timeouts), for a caller that must not wait out an outage.
    """
    region = config.region_name
    if region is None and boto3.session.Session().region_name is None:
        # botocore refuses to start without a region; local endpoints
        # accept any, and on AWS the usual lookup has found one already.
        region = "us-east-1"
    return boto3.client(
        "dynamodb",
        endpoint_url=config.endpoint_url,
        region_name=region,
        config=BotoConfig(
            retries={
                "mode": "standard",
                "total_max_attempts": PROMPT_ATTEMPTS if prompt else RETRY_ATTEMPTS,
            },
            connect_timeout=2 if prompt else 5,
            read_timeout=5 if prompt else 30,
            max_pool_connections=50,
        ),
    )


def error_code(exc: ClientError) -> str:
    """DynamoDB's error code, e.g. ``ConditionalCheckFailedException``."""
    return str(exc.response.get("Error", {}).get("Code", ""))


class DynamoTable:
    """One outbox table and its status index, reached through one client.

    Args:
        config: the table and lifecycle settings.
        client: a boto3 DynamoDB client; one is made from ``config`` if None.
        clock: milliseconds since the epoch; tests and drills shift it.
        rng: the source of jitter.
    """

    def __init__(
        self,
        config: OutboxConfig,
        *,
        client: Any = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.client = client if client is not None else make_client(config)
        self.clock: Clock = clock or wall_clock_ms
        self._rng = rng or random.Random()
        self._sleep: Callable[[float], None] = time.sleep
        self.table = config.table_name
        self.index = config.status_index_name
        self.keys = StatusKeys(config.shards)

    def status_value(self, status: Status, event_id: str) -> dict[str, str]:
        """The typed ``status`` of ``event_id`` in ``status``: ``created#k``
        with shards (:mod:`celery_outbox.shards`), plain ``created`` without."""
        return {"S": self.keys.value(status, event_id)}

    def get_item(self, event_id: str) -> dict[str, Any] | None:
        """The typed item of ``event_id`` (strongly consistent), or None."""
        (event_id,) = ev.check_event_ids(event_id, "event_id")
        try:
            response = self.client.get_item(
                TableName=self.table, Key={ev.ID: {"S": event_id}}, ConsistentRead=True
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error("get", exc) from exc
        item: dict[str, Any] | None = response.get("Item")
        return item

    def _update(
        self,
        event_id: str,
        update: str,
        condition: str,
        values: dict[str, Any],
        *,
        returns: str = "NONE",
    ) -> dict[str, Any] | None:
        """A conditional ``UpdateItem``; None when the condition failed."""
        try:
            response = self.client.update_item(
                TableName=self.table,
                Key={ev.ID: {"S": event_id}},
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeNames=placeholders(update, condition),
                ExpressionAttributeValues=values,
                ReturnValues=returns,
            )
        except ClientError as exc:
            if error_code(exc) == CONDITION_FAILED:
                return None
            raise self._error("update", exc) from exc
        except BotoCoreError as exc:
            raise self._error("update", exc) from exc
        attributes: dict[str, Any] = response.get("Attributes") or {}
        return attributes

    def _update_action(
        self, event_id: str, update: str, condition: str, values: dict[str, Any]
    ) -> dict[str, Any]:
        """The ``TransactWriteItems`` form of :meth:`_update`."""
        return {
            "Update": {
                "TableName": self.table,
                "Key": {ev.ID: {"S": event_id}},
                "UpdateExpression": update,
                "ConditionExpression": condition,
                "ExpressionAttributeNames": placeholders(update, condition),
                "ExpressionAttributeValues": values,
            }
        }

    def _transact(self, actions: Sequence[dict[str, Any]]) -> list[str] | None:
        """Run ``actions`` as one transaction; the reason codes if cancelled.

        A client request token makes botocore's resends safe: DynamoDB
        applies the transaction once (moto ignores the token).
        """
        try:
            self.client.transact_write_items(
                TransactItems=list(actions), ClientRequestToken=str(uuid.uuid4())
            )
        except ClientError as exc:
            code = error_code(exc)
            tables = sorted({str(next(iter(a.values()))["TableName"]) for a in actions})
            if code == "ResourceNotFoundException" and tables != [self.table]:
                # The missing table may be one of the caller's, not the outbox's.
                raise TableError(
                    self.table,
                    f"transaction failed: one of the tables {tables} does not "
                    "exist (the outbox's is checked by `celery -A proj outbox "
                    "check`)",
                ) from exc
            if code != "TransactionCanceledException" and tables != [self.table]:
                # Rejected as a whole (a bad expression, say): any action may
                # be at fault, the caller's as likely as the outbox's.
                message = exc.response.get("Error", {}).get("Message", str(exc))
                raise StoreError(
                    f"DynamoDB transaction over the tables {tables} failed: "
                    f"{code}: {message}",
                    code,
                ) from exc
            if code != "TransactionCanceledException":
                raise self._error("transaction", exc) from exc
            reasons = exc.response.get("CancellationReasons") or []
            return [str(r.get("Code") or "None") for r in reasons]
        except BotoCoreError as exc:
            raise self._error("transaction", exc) from exc
        return None

    def _query(
        self,
        key_condition: str,
        values: dict[str, Any],
        *,
        limit: int | None = None,
        start: dict[str, Any] | None = None,
        projection: str | None = None,
        select: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """One page of a query of the status index."""
        request: dict[str, Any] = {
            "TableName": self.table,
            "IndexName": self.index,
            "KeyConditionExpression": key_condition,
            "ExpressionAttributeValues": values,
            **kwargs,
        }
        expressions = [key_condition, kwargs.get("FilterExpression", "")]
        if projection:
            request["ProjectionExpression"] = projection
            expressions.append(projection)
        request["ExpressionAttributeNames"] = placeholders(*expressions)
        if limit is not None:
            request["Limit"] = limit
        if start:
            request["ExclusiveStartKey"] = start
        if select:
            request["Select"] = select
        try:
            response: dict[str, Any] = self.client.query(**request)
        except (ClientError, BotoCoreError) as exc:
            raise self._error("query", exc) from exc
        return response

    def _query_pages(
        self,
        key_condition: str,
        values: dict[str, Any],
        *,
        limit: int | None,
        max_pages: int | None,
        projection: str | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        """Pages of a query until ``limit`` items or ``max_pages`` pages."""
        start: dict[str, Any] | None = None
        pages = wanted = 0
        while limit is None or wanted < limit:
            response = self._query(
                key_condition,
                values,
                limit=None if limit is None else limit - wanted,
                start=start,
                projection=projection,
            )
            items = response.get("Items", [])
            wanted += len(items)
            pages += 1
            yield items
            start = response.get("LastEvaluatedKey")
            if start is None or (max_pages is not None and pages >= max_pages):
                return

    def _count(self, key_condition: str, values: dict[str, Any]) -> int:
        """How many index entries match, over every page."""
        total = 0
        start: dict[str, Any] | None = None
        while True:
            response = self._query(key_condition, values, start=start, select="COUNT")
            total += int(response.get("Count", 0))
            start = response.get("LastEvaluatedKey")
            if start is None:
                return total

    def _error(self, what: str, exc: ClientError | BotoCoreError) -> OutboxError:
        """The outbox error for a request that DynamoDB or botocore gave up on."""
        if isinstance(exc, ClientError):
            code = error_code(exc)
            if code == "ResourceNotFoundException":
                return TableError(
                    self.table,
                    f"{what} failed: table {self.table!r} or index {self.index!r} "
                    "does not exist (run `celery -A proj outbox check`)",
                )
            message = exc.response.get("Error", {}).get("Message", str(exc))
            return StoreError(
                f"DynamoDB {what} on {self.table!r} failed: {code}: {message}", code
            )
        return StoreError(f"DynamoDB {what} on {self.table!r} failed: {exc}")
