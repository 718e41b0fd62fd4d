"""Payloads in task argument reprs: redacted, truncated or full."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.signals import before_task_publish

from celery_outbox import ConfigError, Event, Outbox, OutboxConfig
from celery_outbox.redaction import payload_repr, redact, task_argsrepr

PAYLOAD = {
    "email": "alice@example.com",
    "total": 30.4,
    "items": [{"sku": "A-1"}, {"sku": "B-2"}],
    "address": {"street": "1 Main St", "geo": {"lat": 1.5, "inner": {"x": 1}}},
    "note": None,
}


def test_redact_keeps_keys_and_drops_values() -> None:
    """redact keeps every key and shows each value only as its type."""
    assert redact(PAYLOAD) == {
        "email": "<str>",
        "total": "<float>",
        "items": "<list of 2>",
        "address": {
            "street": "<str>",
            "geo": {"lat": "<float>", "inner": "<map of 1>"},
        },
        "note": None,
    }


def test_redact_scalar_and_list_payloads() -> None:
    """A payload that is not a map is shown as its type alone."""
    assert redact("secret") == "<str>"
    assert redact([1, 2, 3]) == "<list of 3>"
    assert redact(None) is None


def test_truncate_cuts_the_repr() -> None:
    """truncate mode cuts the payload's repr to the configured length."""
    text = payload_repr({"note": "x" * 500}, "truncate", 40)
    assert len(text) == 40
    assert text.startswith("{'note': 'xxx") and text.endswith("…")


def test_redact_mode_is_cut_as_well() -> None:
    """A redacted repr of a payload with many keys is cut to the length too."""
    text = payload_repr({f"key{i}": i for i in range(100)}, "redact", 50)
    assert len(text) == 50


def test_full_mode_shows_values() -> None:
    """full mode shows the payload as it is."""
    assert "alice@example.com" in payload_repr(PAYLOAD, "full", 20)


def test_argsrepr_names_the_event_and_hides_the_payload() -> None:
    """The handler's argsrepr shows id, type and attempt, never the values."""
    event = Event.new("order.created", PAYLOAD, id="evt-1")
    text = task_argsrepr(event, "redact", 200)
    assert "'id': 'evt-1'" in text
    assert "'type': 'order.created'" in text
    assert "'attempt': 1" in text
    assert "'email': '<str>'" in text
    assert "alice" not in text and "Main St" not in text


def test_config_rejects_an_unknown_mode() -> None:
    """outbox_payload_repr accepts only redact, truncate and full."""
    with pytest.raises(ConfigError, match="payload_repr"):
        OutboxConfig(payload_repr="hide")
    with pytest.raises(ConfigError, match="payload_repr_chars"):
        OutboxConfig(payload_repr_chars=5)


@pytest.fixture
def published() -> Iterator[list[dict[str, Any]]]:
    """The headers of every task message published while the test runs."""
    seen: list[dict[str, Any]] = []

    def record(headers: dict[str, Any], **_: Any) -> None:
        seen.append(headers)

    before_task_publish.connect(record, weak=False)
    yield seen
    before_task_publish.disconnect(record)


@pytest.mark.parametrize(
    ("mode", "shown"), [("redact", False), ("truncate", True), ("full", True)]
)
def test_dispatch_sends_the_argsrepr(
    moto_endpoint: str, published: list[dict[str, Any]], mode: str, shown: bool
) -> None:
    """The drain's handler messages carry the redacted argsrepr, per setting."""
    table = f"redact-{uuid.uuid4().hex[:10]}"
    app = Celery(table, broker="memory://", set_as_current=False)
    app.conf.outbox_payload_repr = mode
    outbox = Outbox(app, table_name=table, endpoint_url=moto_endpoint)

    @outbox.handler("order.created", name=f"{table}.handle")
    def handle(event: Event) -> None:
        """Does nothing: the message is what the test looks at."""

    outbox.store.create_table()
    try:
        event = outbox.emit("order.created", PAYLOAD)
        assert outbox.drain()["dispatched"] == 1
    finally:
        outbox.store.delete_table()
    (headers,) = [h for h in published if h["id"] == f"outbox:{event.id}:1"]
    assert event.id in headers["argsrepr"]
    assert ("alice@example.com" in headers["argsrepr"]) is shown
    assert headers["kwargsrepr"] == "{}"
