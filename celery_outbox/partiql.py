"""Conditional PartiQL statements, sent 25 to a ``BatchExecuteStatement``.

A batch is not a transaction: each statement carries its own ``WHERE``
condition and gets its own result, so a batch of claims or completions is as
conditional as the same writes sent one by one, in one request instead of
25. Every attribute and table name is a double-quoted identifier, PartiQL's
counterpart of an expression's ``#placeholder`` (``status`` and ``type`` are
reserved words), and every value is a ``?`` parameter.

Per-statement errors are sorted by code: a failed condition or an existing
key is an answer (:data:`LOST`, :data:`EXISTS`); throttling and internal
errors are resent with jittered backoff; anything else raises
:class:`~celery_outbox.errors.StoreError`.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from celery_outbox.errors import StoreError, TableError

__all__ = ["BATCH_LIMIT", "EXISTS", "LOST", "OK", "PARALLEL", "Statement", "execute"]

BATCH_LIMIT = 25
"""Statements DynamoDB takes in one ``BatchExecuteStatement``."""

PARALLEL = 4
"""Batches of one call sent at the same time (a drain of 100 waits for one)."""

OK = "ok"
LOST = "lost"
"""The statement's condition failed: another writer got there first."""
EXISTS = "exists"
"""An ``INSERT`` found the key already stored."""

_ANSWERS = {"ConditionalCheckFailed": LOST, "DuplicateItem": EXISTS}
_RESEND = {
    "ThrottlingError",
    "ProvisionedThroughputExceeded",
    "RequestLimitExceeded",
    "TransactionConflict",
    "InternalServerError",
}


@dataclass(frozen=True)
class Statement:
    """One parameterised PartiQL statement about one item.

    Attributes:
        text: the statement, with ``?`` for each parameter.
        parameters: typed DynamoDB values, in order.
        key: the id of the item it writes; DynamoDB refuses a batch that
            names one item twice.
    """

    text: str
    parameters: tuple[dict[str, Any], ...]
    key: str

    def request(self) -> dict[str, Any]:
        """The statement as ``BatchExecuteStatement`` takes it."""
        return {"Statement": self.text, "Parameters": list(self.parameters)}


def quote(name: str) -> str:
    """``name`` as a PartiQL identifier."""
    if '"' in name:
        raise ValueError(f"{name!r} cannot be a PartiQL identifier")
    return f'"{name}"'


def execute(
    client: Any,
    statements: Sequence[Statement],
    *,
    table: str,
    attempts: int = 8,
    rng: random.Random | None = None,
) -> list[str]:
    """Run ``statements``; return :data:`OK`, :data:`LOST` or :data:`EXISTS` each.

    They go out 25 to a request, up to :data:`PARALLEL` requests at a time.
    A statement naming an item already in this round waits for the next
    round, so no item is written twice at once.

    Raises:
        TableError: the table does not exist.
        StoreError: DynamoDB refused a statement for another reason, or kept
            throttling it through ``attempts`` rounds.
    """
    results: list[str | None] = [None] * len(statements)
    waiting = list(range(len(statements)))
    rng = rng or random.Random()
    tries = 0
    while waiting:
        batches, waiting = _round(statements, waiting)
        answers = _send_all(
            client, [[statements[i] for i in b] for b in batches], table
        )
        throttled = False
        for batch, outcomes in zip(batches, answers, strict=True):
            for index, outcome in zip(batch, outcomes, strict=True):
                if outcome is None:
                    waiting.append(index)
                    throttled = True
                else:
                    results[index] = outcome
        if throttled:
            tries += 1
            if tries >= attempts:
                raise StoreError(
                    f"DynamoDB kept throttling PartiQL writes on {table!r} "
                    f"through {attempts} attempts",
                    "ThrottlingError",
                )
            time.sleep(min(1.0, 0.025 * 2**tries) * rng.uniform(0.5, 1))
    return [r if r is not None else LOST for r in results]


def _round(
    statements: Sequence[Statement], waiting: list[int]
) -> tuple[list[list[int]], list[int]]:
    """Up to PARALLEL batches of 25 naming distinct items, and the rest."""
    batches: list[list[int]] = []
    rest: list[int] = []
    keys: set[str] = set()
    for index in waiting:
        key = statements[index].key
        if key in keys:
            rest.append(index)
            continue
        if not batches or len(batches[-1]) == BATCH_LIMIT:
            if len(batches) == PARALLEL:
                rest.append(index)
                continue
            batches.append([])
        batches[-1].append(index)
        keys.add(key)
    return batches, rest


def _send_all(
    client: Any, batches: list[list[Statement]], table: str
) -> list[list[str | None]]:
    if len(batches) == 1:
        return [_send(client, batches[0], table)]
    futures = [_pool().submit(_send, client, batch, table) for batch in batches]
    return [future.result() for future in futures]


_executor: tuple[int, ThreadPoolExecutor] | None = None
_executor_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """This process's sender threads (threads do not survive a fork)."""
    global _executor
    with _executor_lock:
        if _executor is None or _executor[0] != os.getpid():
            _executor = (
                os.getpid(),
                ThreadPoolExecutor(PARALLEL, thread_name_prefix="outbox-partiql"),
            )
        return _executor[1]


def _send(client: Any, batch: list[Statement], table: str) -> list[str | None]:
    """One request; each statement's answer, or None to send it again."""
    try:
        response = client.batch_execute_statement(
            Statements=[s.request() for s in batch]
        )
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code == "ResourceNotFoundException":
            raise TableError(table, f"table {table!r} does not exist") from exc
        raise StoreError(
            f"DynamoDB PartiQL batch on {table!r} failed: {code}: "
            f"{error.get('Message', exc)}",
            code,
        ) from exc
    except BotoCoreError as exc:
        raise StoreError(f"DynamoDB PartiQL batch on {table!r} failed: {exc}") from exc
    outcomes: list[str | None] = []
    for statement, answer in zip(batch, response["Responses"], strict=True):
        error = answer.get("Error")
        if error is None:
            outcomes.append(OK)
            continue
        code = str(error.get("Code", ""))
        if code in _ANSWERS:
            outcomes.append(_ANSWERS[code])
        elif code in _RESEND:
            outcomes.append(None)
        else:
            raise StoreError(
                f"DynamoDB refused a PartiQL statement on {table!r} for item "
                f"{statement.key!r}: {code}: {error.get('Message', '')}",
                code,
            )
    return outcomes
