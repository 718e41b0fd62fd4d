"""Every error the outbox raises, in one hierarchy.

::

    OutboxError
    ├── ConfigError              an option has an invalid value
    ├── ArgumentError            a call got an argument it cannot take
    ├── EventError               an event cannot be written as given
    │   ├── PayloadError         the payload holds a value that is not JSON
    │   └── ItemTooLargeError    the item exceeds DynamoDB's 400 KB
    ├── CollectorError           a transaction collector cannot take the events
    │   ├── CollectorFullError   more than 100 actions in one transaction
    │   ├── TransactionTooLargeError   more than 4 MB in one transaction
    │   └── DuplicateEventError  the same id twice in one transaction
    ├── TableError               the table or its index is missing or wrong
    ├── StoreError               DynamoDB refused or gave up on a request
    │   ├── EventExistsError     an event with that id is already stored
    │   ├── EventNotFoundError   no event has that id
    │   ├── EventStatusError     the event is not in the status the call needs
    │   ├── TransactionCancelledError   DynamoDB cancelled a transaction
    │   └── UnprocessedItemsError   a batch write gave up on some items
    └── HandlerError             no handler, or a handler set up wrongly

Errors carry the object they concern (an event id, a table name, an option)
as attributes, so callers can act on them without parsing messages. Every
error raised for bad input is raised before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ArgumentError",
    "CollectorError",
    "CollectorFullError",
    "ConfigError",
    "DuplicateEventError",
    "EventError",
    "EventExistsError",
    "EventNotFoundError",
    "EventStatusError",
    "HandlerError",
    "ItemTooLargeError",
    "OutboxError",
    "PayloadError",
    "StoreError",
    "TableError",
    "TransactionCancelledError",
    "TransactionTooLargeError",
    "UnprocessedItemsError",
]


class OutboxError(Exception):
    """Base class of every error raised by celery_outbox.

    An error's ``args`` are the arguments it was made with, so pickle and
    Celery's result backends, which rebuild an error as
    ``type(error)(*error.args)``, hand a management task's caller the same
    typed error; ``str(error)`` is its message.
    """

    _text: str | None = None

    def _made_with(self, *args: object) -> None:
        """Keep the message, and ``args`` as the constructor's arguments."""
        if self._text is None:
            self._text = Exception.__str__(self)
        self.args = args

    def __str__(self) -> str:
        return Exception.__str__(self) if self._text is None else self._text


class ConfigError(OutboxError, ValueError):
    """An option was given a value it cannot take.

    Attributes:
        option: the name of the offending option.
    """

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self._made_with(option, message)
        self.option = option


class ArgumentError(OutboxError, ValueError):
    """A store or management call got an argument it cannot take.

    Attributes:
        argument: the name of the offending argument.
    """

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self._made_with(argument, message)
        self.argument = argument


class EventError(OutboxError, ValueError):
    """An event cannot be written as given (bad id, type, time or payload)."""


class PayloadError(EventError):
    """The payload holds a value that does not round-trip as JSON.

    Attributes:
        path: where the bad value sits, e.g. ``payload["items"][2]["price"]``.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self._made_with(path, message)
        self.path = path


class ItemTooLargeError(EventError):
    """The event's item is larger than DynamoDB's 400 KB item limit.

    Attributes:
        event_id: the event concerned.
        size: the estimated item size in bytes.
    """

    def __init__(self, event_id: str, size: int, limit: int) -> None:
        super().__init__(
            f"event {event_id!r} is about {size:,} bytes as a DynamoDB item; "
            f"the outbox takes at most {limit:,} bytes (DynamoDB's 400 KB item "
            "limit, less room for what the event's lifecycle writes). Store "
            "large bodies elsewhere (S3) and put a reference in the payload."
        )
        self._made_with(event_id, size, limit)
        self.event_id = event_id
        self.size = size


class CollectorError(OutboxError, ValueError):
    """A transaction collector cannot take the events.

    The collector is left exactly as it was before the call.
    """


class CollectorFullError(CollectorError):
    """Appending would put more actions in one transaction than DynamoDB allows."""


class TransactionTooLargeError(CollectorError):
    """Appending would make the transaction larger than DynamoDB's 4 MB."""


class DuplicateEventError(CollectorError):
    """The same event id (or item key) would appear twice in one transaction.

    Attributes:
        event_id: the duplicated id.
    """

    def __init__(self, event_id: str, message: str) -> None:
        super().__init__(message)
        self._made_with(event_id, message)
        self.event_id = event_id


class TableError(OutboxError):
    """The outbox table or its status index is missing or laid out wrongly.

    Attributes:
        table: the table name.
    """

    def __init__(self, table: str, message: str) -> None:
        super().__init__(message)
        self._made_with(table, message)
        self.table = table


class StoreError(OutboxError):
    """DynamoDB refused a request, or botocore's retries gave up on it.

    Attributes:
        code: DynamoDB's error code (e.g. ``ProvisionedThroughputExceededException``)
            when there is one; the botocore error is the ``__cause__``.
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self._made_with(message, code)
        self.code = code


class EventExistsError(StoreError):
    """An event with this id is already stored; it was not overwritten.

    Attributes:
        event_ids: the ids that already exist (when DynamoDB says which).
    """

    def __init__(self, event_ids: Sequence[str]) -> None:
        ids = ", ".join(repr(i) for i in event_ids)
        super().__init__(
            f"event {ids} already exists; an outbox event is never overwritten",
            "ConditionalCheckFailedException",
        )
        self._made_with(list(event_ids))
        self.event_ids = list(event_ids)


class EventNotFoundError(StoreError):
    """No event is stored under these ids; nothing was changed.

    Attributes:
        event_ids: the ids that are not stored.
    """

    def __init__(self, event_ids: Sequence[str]) -> None:
        ids = ", ".join(repr(i) for i in event_ids)
        super().__init__(f"no outbox event has the id {ids}; nothing was changed")
        self._made_with(list(event_ids))
        self.event_ids = list(event_ids)


class EventStatusError(StoreError):
    """An event is not in the status the call needs; nothing was changed.

    Attributes:
        statuses: each offending id with the status it is in.
        expected: the status the call needs.
    """

    def __init__(self, statuses: dict[str, str], expected: str) -> None:
        found = ", ".join(f"{i!r} is {s}" for i, s in statuses.items())
        super().__init__(
            f"only {expected} events can be changed by this call, but {found}; "
            "nothing was changed"
        )
        self._made_with(dict(statuses), expected)
        self.statuses = dict(statuses)
        self.expected = expected


class TransactionCancelledError(StoreError):
    """DynamoDB cancelled a transaction; none of its actions were applied.

    Attributes:
        reasons: DynamoDB's cancellation code for each action, in order
            (``None`` for the actions that were not at fault).
    """

    def __init__(self, message: str, reasons: Sequence[str]) -> None:
        super().__init__(message, "TransactionCanceledException")
        self._made_with(message, list(reasons))
        self.reasons = list(reasons)


class UnprocessedItemsError(StoreError):
    """A batch write still had unprocessed items after its resends.

    Attributes:
        event_ids: the ids DynamoDB never processed.
    """

    def __init__(self, event_ids: Sequence[str]) -> None:
        super().__init__(
            "DynamoDB left these events unprocessed after retries: "
            + ", ".join(repr(i) for i in event_ids)
        )
        self._made_with(list(event_ids))
        self.event_ids = list(event_ids)


class HandlerError(OutboxError):
    """No handler is registered for an event type, or one is set up wrongly."""
