"""celery_outbox: the transactional outbox pattern for Celery on DynamoDB.

Write business items and outbox events in one DynamoDB transaction; a Celery
beat task drains due events into one handler task each, and the handlers'
outcomes are written back with conditional updates.
"""

from celery_outbox.collector import Transaction, collecting
from celery_outbox.config import Completion, OutboxConfig, WriteMode
from celery_outbox.errors import (
    ArgumentError,
    CollectorError,
    CollectorFullError,
    ConfigError,
    DuplicateEventError,
    EventError,
    EventExistsError,
    EventNotFoundError,
    EventStatusError,
    HandlerError,
    ItemTooLargeError,
    OutboxError,
    PayloadError,
    StoreError,
    TableError,
    TransactionCancelledError,
    TransactionTooLargeError,
    UnprocessedItemsError,
)
from celery_outbox.event import Event, FailedEvent, Lease, Status
from celery_outbox.outbox import Outbox
from celery_outbox.store import (
    ClaimResult,
    FailedPage,
    OutboxStore,
    Outcome,
    RetryReport,
    Stats,
)

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "ClaimResult",
    "CollectorError",
    "CollectorFullError",
    "Completion",
    "ConfigError",
    "DuplicateEventError",
    "Event",
    "EventError",
    "EventExistsError",
    "EventNotFoundError",
    "EventStatusError",
    "FailedEvent",
    "FailedPage",
    "HandlerError",
    "ItemTooLargeError",
    "Lease",
    "Outbox",
    "OutboxConfig",
    "OutboxError",
    "OutboxStore",
    "Outcome",
    "PayloadError",
    "RetryReport",
    "Stats",
    "Status",
    "StoreError",
    "TableError",
    "Transaction",
    "TransactionCancelledError",
    "TransactionTooLargeError",
    "UnprocessedItemsError",
    "WriteMode",
    "collecting",
]
