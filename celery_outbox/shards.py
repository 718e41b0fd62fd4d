"""Sharded status keys: spread due and leased events over index partitions.

Every due event shares the index partition key ``created``, and every leased
one ``active``; one DynamoDB partition takes about 1,000 writes a second, and
each event is written to both. With ``shards = N`` above 1 an event's status
is ``created#k`` or ``active#k``, with ``k`` fixed by its id, so the writes
spread over ``2 N`` partitions and drains fan out over them. ``failed`` and
``completed`` stay unsharded: operators list them, and they are not on the
hot path.

``shards = 1`` (the default) keeps the TypeScript adapter's layout.
"""

from __future__ import annotations

import itertools
import zlib

from celery_outbox.event import Status

__all__ = ["SHARDED", "StatusKeys", "shard_of"]

SHARDED = (Status.CREATED, Status.ACTIVE)
SEPARATOR = "#"


def shard_of(event_id: str, shards: int) -> int:
    """The shard of ``event_id``: stable across processes and versions."""
    return zlib.crc32(event_id.encode("utf-8")) % shards


class StatusKeys:
    """The ``status`` values of one table's layout.

    Args:
        shards: how many partitions ``created`` and ``active`` are spread
            over; 1 for the plain values.
    """

    def __init__(self, shards: int = 1) -> None:
        self.shards = shards
        self._turn = itertools.count()

    def __repr__(self) -> str:
        return f"<StatusKeys shards={self.shards}>"

    def value(self, status: Status, event_id: str) -> str:
        """The ``status`` attribute of ``event_id`` in ``status``."""
        if self.shards == 1 or status not in SHARDED:
            return status.value
        return f"{status.value}{SEPARATOR}{shard_of(event_id, self.shards)}"

    def partitions(self, status: Status, start: int | None = None) -> list[str]:
        """Every ``status`` value of ``status``, beginning at shard ``start``.

        Without ``start`` each call begins one shard further than the last,
        so drains that stop once their batch is full still visit every shard.
        """
        if self.shards == 1 or status not in SHARDED:
            return [status.value]
        if start is None:
            start = next(self._turn) % self.shards
        order = [(start + i) % self.shards for i in range(self.shards)]
        return [f"{status.value}{SEPARATOR}{k}" for k in order]

    @staticmethod
    def status(value: str) -> Status:
        """The lifecycle state a ``status`` attribute names, sharded or not."""
        return Status(value.split(SEPARATOR, 1)[0])
