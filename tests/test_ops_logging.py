"""What the outbox logs for operators: one line per busy drain, one per failure."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery

from celery_outbox import Event, Outbox, OutboxConfig


@pytest.fixture
def outbox(moto_endpoint: str) -> Iterator[Outbox]:
    """An eager app with one failing handler, on a fresh moto table."""
    table = f"log-{uuid.uuid4().hex[:10]}"
    app = Celery(table, broker="memory://", set_as_current=False)
    app.conf.task_always_eager = True
    config = OutboxConfig(table_name=table, endpoint_url=moto_endpoint, max_retries=0)
    made = Outbox(app, config=config)

    @made.handler("order.created", name=f"{table}.created")
    def created(event: Event) -> None:
        """Always fails."""
        raise ValueError("card declined")

    made.store.create_table()
    yield made
    made.store.delete_table()


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    """The outbox's own records at ``level``."""
    return [
        r
        for r in caplog.records
        if r.name.startswith("celery_outbox") and r.levelno == level
    ]


def test_idle_drain_logs_nothing(
    outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """A drain that finds nothing due writes no log line at INFO or above."""
    caplog.set_level(logging.DEBUG)
    outbox.drain()
    assert [
        r
        for r in caplog.records
        if r.name.startswith("celery_outbox") and r.levelno >= logging.INFO
    ] == []


def test_busy_drain_logs_one_info_line(
    outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """A drain with work writes one INFO line with its counts."""
    outbox.emit("order.created")
    caplog.set_level(logging.INFO)
    outbox.drain()
    (line,) = [r for r in records(caplog, logging.INFO) if "Drained" in r.message]
    assert "claimed 1" in line.message and "dispatched 1" in line.message
    assert "skipped 0" in line.message


def test_failures_log_a_warning_with_event_type_attempt_and_error(
    outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """Handler failures and missing handlers are WARNINGs naming all four."""
    failing = outbox.emit("order.created")
    orphan = outbox.emit("order.unknown")
    caplog.set_level(logging.WARNING)
    outbox.drain()
    warnings = [r.message for r in records(caplog, logging.WARNING)]
    assert any(
        repr(failing.id) in m
        and "(order.created)" in m
        and "attempt 1" in m
        and "ValueError: card declined" in m
        for m in warnings
    ), warnings
    assert any(
        repr(orphan.id) in m
        and "(order.unknown)" in m
        and "attempt 1" in m
        and "no handler is registered" in m
        for m in warnings
    ), warnings


def test_logs_go_through_celery_loggers_without_handlers(outbox: Outbox) -> None:
    """The drain and handler loggers hang under Celery's and write nowhere."""
    for name in ("celery_outbox.drain", "celery_outbox.handlers"):
        logger = logging.getLogger(name)
        # Celery's get_logger adds a NullHandler; nothing that writes.
        assert all(isinstance(h, logging.NullHandler) for h in logger.handlers)
        assert logger.parent is not None and logger.parent.name.startswith("celery")
