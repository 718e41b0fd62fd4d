"""The least-privilege IAM policy for one outbox table and its status index.

The actions are exactly those the library calls; ``tests/test_iam_policy.py``
records every DynamoDB call of a whole lifecycle and checks the two agree, so
a new call without a policy change fails the tests.

Transactions need no action of their own: IAM authorises each ``Put`` of a
``TransactWriteItems`` as ``dynamodb:PutItem`` on its table. The business
items a caller writes in the same transaction need the caller's own policy.
"""

from __future__ import annotations

from typing import Any

from celery_outbox.config import Completion, OutboxConfig, WriteMode

__all__ = ["INDEX_ACTIONS", "SETUP_ACTIONS", "policy", "table_actions"]

INDEX_ACTIONS = ("dynamodb:Query",)
"""Every read of events goes through the status index."""

SETUP_ACTIONS = ("dynamodb:CreateTable", "dynamodb:UpdateTimeToLive")
"""Only ``create-table`` needs these; leave them out of runtime roles."""

_ALWAYS = (
    "dynamodb:DescribeTable",  # check, and waiting for a new table
    "dynamodb:GetItem",  # confirming a resent put, operator retries
    "dynamodb:PutItem",  # emits, alone or inside a transaction
    "dynamodb:UpdateItem",  # claims and every write-back
)
_BY_COMPLETION = {
    Completion.DELETE: ("dynamodb:DeleteItem",),  # completion deletes
    Completion.KEEP: (
        "dynamodb:BatchWriteItem",  # purge of kept completed events
        "dynamodb:DescribeTimeToLive",  # check: kept events need the TTL
    ),
}
# write_mode "partiql" sends claims, start marks and completions as PartiQL
# statements (BatchExecuteStatement), which IAM authorises by their verb,
# and publish_each as INSERT statements. Completions are never DeleteItem.
_PARTIQL = ("dynamodb:PartiQLInsert", "dynamodb:PartiQLUpdate")
_PARTIQL_BY_COMPLETION = {
    Completion.DELETE: ("dynamodb:PartiQLDelete",),  # completion deletes
    Completion.KEEP: _BY_COMPLETION[Completion.KEEP],
}


def table_actions(config: OutboxConfig, *, setup: bool = False) -> list[str]:
    """The actions on the table ``config`` needs, sorted.

    They depend on ``completion``: deleting completed events needs
    ``DeleteItem``; keeping them needs the purge's ``BatchWriteItem`` and the
    TTL check's ``DescribeTimeToLive`` instead. With ``write_mode =
    "partiql"`` claims and completions are PartiQL statements, which need
    ``PartiQLUpdate``, ``PartiQLInsert`` and, to delete completed events,
    ``PartiQLDelete`` instead of ``DeleteItem``.
    """
    if config.write_mode is WriteMode.PARTIQL:
        actions = _ALWAYS + _PARTIQL + _PARTIQL_BY_COMPLETION[config.completion]
    else:
        actions = _ALWAYS + _BY_COMPLETION[config.completion]
    return sorted(actions + (SETUP_ACTIONS if setup else ()))


def policy(
    config: OutboxConfig,
    *,
    region: str = "*",
    account: str = "*",
    partition: str = "aws",
    setup: bool = False,
) -> dict[str, Any]:
    """The IAM policy document for ``config``'s table and index.

    Args:
        region: the table's region; ``*`` matches any.
        account: the AWS account id; ``*`` matches any.
        partition: ``aws``, ``aws-cn`` or ``aws-us-gov``.
        setup: also grant what ``create-table`` needs.
    """
    table_arn = f"arn:{partition}:dynamodb:{region}:{account}:table/{config.table_name}"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "OutboxTable",
                "Effect": "Allow",
                "Action": table_actions(config, setup=setup),
                "Resource": table_arn,
            },
            {
                "Sid": "OutboxStatusIndex",
                "Effect": "Allow",
                "Action": list(INDEX_ACTIONS),
                "Resource": f"{table_arn}/index/{config.status_index_name}",
            },
        ],
    }
