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

from celery_outbox.config import OutboxConfig

__all__ = [
    "INDEX_ACTIONS",
    "SETUP_ACTIONS",
    "TABLE_ACTIONS",
    "iam_actions",
    "policy",
]

TABLE_ACTIONS = (
    "dynamodb:BatchWriteItem",  # purge of kept completed events
    "dynamodb:DeleteItem",  # completion when completed events are deleted
    "dynamodb:DescribeTable",  # check, and waiting for a new table
    "dynamodb:DescribeTimeToLive",  # check, when completed events are kept
    "dynamodb:GetItem",  # confirming a resent put, operator retries
    "dynamodb:PutItem",  # emits, alone or inside a transaction
    "dynamodb:UpdateItem",  # claims and every write-back
)
"""Actions on the table's items and description, for producers and workers."""

INDEX_ACTIONS = ("dynamodb:Query",)
"""Every read of events goes through the status index."""

SETUP_ACTIONS = ("dynamodb:CreateTable", "dynamodb:UpdateTimeToLive")
"""Only ``create-table`` needs these; leave them out of runtime roles."""

# The parts of a transaction, and the IAM action each is authorised as.
_TRANSACT_PARTS = {
    "Put": "dynamodb:PutItem",
    "Update": "dynamodb:UpdateItem",
    "Delete": "dynamodb:DeleteItem",
    "ConditionCheck": "dynamodb:ConditionCheckItem",
}


def iam_actions(operation: str, params: dict[str, Any], table: str) -> set[str]:
    """The IAM actions a DynamoDB API call needs on ``table``.

    ``operation`` is the API name (``PutItem``); ``params`` its request.
    Parts of a transaction on other tables are the caller's and not counted.
    """
    if operation != "TransactWriteItems":
        return {f"dynamodb:{operation}"}
    actions = set()
    for part in params.get("TransactItems", []):
        for kind, body in part.items():
            if body.get("TableName") == table:
                actions.add(_TRANSACT_PARTS[kind])
    return actions


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
    table_arn = (
        f"arn:{partition}:dynamodb:{region}:{account}:table/{config.table_name}"
    )
    table_actions = sorted(TABLE_ACTIONS + (SETUP_ACTIONS if setup else ()))
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "OutboxTable",
                "Effect": "Allow",
                "Action": table_actions,
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
