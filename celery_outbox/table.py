"""Table set-up: create the outbox table, and verify one that exists.

The layout (DESIGN.md, and the TypeScript adapter's README): partition key
``id`` (S), no sort key; a global secondary index, by default
``status-gsiSortKey-index``, keyed on ``status`` (S) and ``gsiSortKey`` (N)
and projecting every attribute, so a drain reads whole events from it. TTL
on ``expiresAt`` removes completed events kept for inspection.

:meth:`TableSetup.verify_table` turns the adapter's "events not moving"
symptom into an error at start-up that says what is wrong and how to fix it.
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from celery.utils.log import get_logger

from celery_outbox import event as ev
from celery_outbox.config import Completion
from celery_outbox.dynamo import DynamoTable, error_code
from celery_outbox.errors import TableError

__all__ = ["TableSetup", "index_definition"]

logger = get_logger(__name__)


def index_definition(name: str) -> dict[str, Any]:
    """The status index as ``create_table`` and ``update_table`` take it."""
    return {
        "IndexName": name,
        "KeySchema": [
            {"AttributeName": ev.STATUS, "KeyType": "HASH"},
            {"AttributeName": ev.SORT_KEY, "KeyType": "RANGE"},
        ],
        "Projection": {"ProjectionType": "ALL"},
    }


def _keys(schema: list[dict[str, str]]) -> dict[str, str]:
    return {k["KeyType"]: k["AttributeName"] for k in schema}


def _described(keys: dict[str, str], types: dict[str, str]) -> str:
    """A key schema as error messages name it: ``hash key 'id' (S), ...``."""
    return ", ".join(
        f"{kind.lower()} key {name!r} ({types.get(name, '?')})"
        for kind, name in sorted(keys.items())
    )


def _is_status_index(index: dict[str, Any]) -> bool:
    keys = _keys(index["KeySchema"])
    return keys.get("HASH") == ev.STATUS and keys.get("RANGE") == ev.SORT_KEY


class TableSetup(DynamoTable):
    """Create, verify and delete the outbox table."""

    def create_table(self, *, wait: bool = True) -> bool:
        """Create the table, its status index and TTL; False if it exists.

        Billing is on demand. With ``wait`` (the default) the call returns
        once the table is active and TTL is enabled on ``expiresAt``; without
        it, TTL is left to :meth:`verify_table`'s warning.
        """
        try:
            self.client.create_table(
                TableName=self.table,
                BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[
                    {"AttributeName": ev.ID, "AttributeType": "S"},
                    {"AttributeName": ev.STATUS, "AttributeType": "S"},
                    {"AttributeName": ev.SORT_KEY, "AttributeType": "N"},
                ],
                KeySchema=[{"AttributeName": ev.ID, "KeyType": "HASH"}],
                GlobalSecondaryIndexes=[index_definition(self.index)],
            )
        except ClientError as exc:
            if error_code(exc) == "ResourceInUseException":
                return False
            raise self._error("create table", exc) from exc
        except BotoCoreError as exc:
            raise self._error("create table", exc) from exc
        if wait:
            # A new table refuses TTL changes until it is active.
            self.client.get_waiter("table_exists").wait(
                TableName=self.table, WaiterConfig={"Delay": 1, "MaxAttempts": 120}
            )
            self._enable_ttl()
        logger.info("Created outbox table %r with index %r", self.table, self.index)
        return True

    def _enable_ttl(self) -> None:
        try:
            self.client.update_time_to_live(
                TableName=self.table,
                TimeToLiveSpecification={
                    "Enabled": True,
                    "AttributeName": ev.EXPIRES_AT,
                },
            )
        except ClientError as exc:
            # Enabling twice is refused; anything else is a real problem.
            if "already enabled" not in str(exc).lower():
                raise self._error("enable TTL", exc) from exc

    def delete_table(self) -> None:
        """Delete the table (tests and demos); no error if it is gone."""
        try:
            self.client.delete_table(TableName=self.table)
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise self._error("delete table", exc) from exc

    def verify_table(self) -> list[str]:
        """Check the table and its index; raise :class:`TableError` if wrong.

        Returns warnings that do not stop the outbox: an index still being
        built, TTL off while completed events are kept.

        Raises:
            TableError: the table is missing, or its key or index would keep
                events from moving. The message says how to fix it.
        """
        try:
            table = self.client.describe_table(TableName=self.table)["Table"]
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":
                raise TableError(
                    self.table,
                    f"table {self.table!r} does not exist; create it with "
                    "`celery -A proj outbox create-table` or "
                    "OutboxStore.create_table(), or set table_name to your table",
                ) from exc
            raise self._error("describe table", exc) from exc
        except BotoCoreError as exc:
            raise self._error("describe table", exc) from exc
        types = {
            a["AttributeName"]: a["AttributeType"]
            for a in table["AttributeDefinitions"]
        }
        self._check_key(_keys(table["KeySchema"]), types)
        index = self._check_index(table.get("GlobalSecondaryIndexes") or [], types)
        warnings = []
        if index.get("IndexStatus", "ACTIVE") != "ACTIVE":
            warnings.append(
                f"index {self.index!r} is {index['IndexStatus']}; events will not "
                "move until it is ACTIVE"
            )
        if self.config.completion is Completion.KEEP and not self._ttl_enabled():
            warnings.append(
                f"TTL is not enabled on {ev.EXPIRES_AT!r}; kept completed events "
                "will never expire (enable it, or run purge_completed)"
            )
        for warning in warnings:
            logger.warning("Outbox table %r: %s", self.table, warning)
        return warnings

    def _check_key(self, keys: dict[str, str], types: dict[str, str]) -> None:
        if keys.get("HASH") != ev.ID or "RANGE" in keys or types.get(ev.ID) != "S":
            raise TableError(
                self.table,
                f"table {self.table!r} has {_described(keys, types)}; the "
                "outbox needs the partition key 'id' of type S and no sort "
                "key. Create a new table for the outbox (key schemas cannot "
                "be changed)",
            )

    def _check_index(
        self, indexes: list[dict[str, Any]], types: dict[str, str]
    ) -> dict[str, Any]:
        by_name = {i["IndexName"]: i for i in indexes}
        index = by_name.get(self.index)
        if index is None:
            raise TableError(self.table, self._missing_index(indexes))
        keys = _keys(index["KeySchema"])
        key_types = (types.get(ev.STATUS), types.get(ev.SORT_KEY))
        if not _is_status_index(index) or key_types != ("S", "N"):
            found = _described(keys, types)
            raise TableError(
                self.table,
                f"index {self.index!r} of table {self.table!r} has {found}; the "
                "outbox needs partition key 'status' (S) and sort key "
                "'gsiSortKey' (N). Delete the index and add it again with "
                "that key (an attribute's type is fixed once any index uses it)",
            )
        projection = index.get("Projection", {}).get("ProjectionType")
        if projection != "ALL":
            raise TableError(
                self.table,
                f"index {self.index!r} of table {self.table!r} projects "
                f"{projection}; the outbox needs ALL so a drain reads whole "
                "events from it. Delete the index and add it again with "
                "ProjectionType ALL",
            )
        return index

    def _missing_index(self, indexes: list[dict[str, Any]]) -> str:
        names = sorted(i["IndexName"] for i in indexes)
        matching = [i["IndexName"] for i in indexes if _is_status_index(i)]
        message = (
            f"table {self.table!r} has no index {self.index!r} (its indexes: "
            f"{', '.join(map(repr, names)) or 'none'}), so no event would move. "
        )
        if matching:
            return message + (
                f"The index {matching[0]!r} is keyed on status/gsiSortKey: set "
                f"status_index_name (outbox_status_index_name) to {matching[0]!r}"
            )
        return message + (
            f"Add a global secondary index named {self.index!r} with partition "
            "key 'status' (S), sort key 'gsiSortKey' (N) and projection ALL, or "
            "set status_index_name to the name of such an index"
        )

    def _ttl_enabled(self) -> bool:
        try:
            ttl = self.client.describe_time_to_live(TableName=self.table)
        except (ClientError, BotoCoreError):
            return False
        spec = ttl.get("TimeToLiveDescription", {})
        return bool(
            spec.get("TimeToLiveStatus") in ("ENABLED", "ENABLING")
            and spec.get("AttributeName") == ev.EXPIRES_AT
        )
