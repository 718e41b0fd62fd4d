"""What of an event's payload Flower, logs and task results may show.

Celery puts a text form of every task's arguments (``argsrepr``) in the
message, and Flower, the worker's log and monitoring events show it. For an
outbox handler that text would hold the event's payload, which often carries
personal data. The drain therefore writes its own ``argsrepr``: the event's
id, type and attempt in full, and the payload in the form the
``outbox_payload_repr`` setting picks:

``redact`` (the default)
    the payload's shape without its values: map keys are kept, every other
    value becomes its type, e.g. ``{'email': '<str>', 'items': '<list of 2>'}``;
``truncate``
    the payload's repr cut to ``outbox_payload_repr_chars`` characters;
``full``
    the payload's repr, cut at Celery's usual 1024 characters (for
    development only).

The event's id, type and attempt are shown in full whatever the mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery_outbox.event import Event

__all__ = ["MODES", "event_repr", "payload_repr", "redact", "task_argsrepr"]

MODES = ("redact", "truncate", "full")

FULL_CHARS = 1024
"""Celery's own cap on an argument repr, kept in ``full`` mode."""

# Nested maps deeper than this are summarised as a whole: deep structures
# add length to the repr, not information an operator needs.
_MAX_DEPTH = 3


def redact(value: Any, depth: int = 0) -> Any:
    """``value`` with its keys kept and every other value replaced by its type.

    The result is JSON-serialisable, so management tasks can return it.
    """
    if isinstance(value, Mapping):
        if depth >= _MAX_DEPTH:
            return f"<map of {len(value)}>"
        return {str(k): redact(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return f"<list of {len(value)}>"
    if value is None:
        return None
    return f"<{type(value).__name__}>"


def payload_repr(payload: Any, mode: str, max_chars: int) -> str:
    """The text form of ``payload`` that ``mode`` allows, within ``max_chars``."""
    shown = redact(payload) if mode == "redact" else payload
    return _cut(repr(shown), FULL_CHARS if mode == "full" else max_chars)


def _cut(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def event_repr(event: Event, mode: str, max_chars: int) -> dict[str, Any]:
    """The event as handler tasks receive it, with its payload made safe.

    In ``redact`` mode the payload is a JSON-serialisable structure; in the
    other modes it is a string.
    """
    body = event.as_dict()
    if mode == "redact":
        body["payload"] = redact(event.payload)
    elif mode == "truncate":
        body["payload"] = payload_repr(event.payload, mode, max_chars)
    return body


def task_argsrepr(event: Event, mode: str, max_chars: int) -> str:
    """The ``argsrepr`` of the handler task that runs ``event``.

    It reads like the real arguments, a list holding the event's dict, so
    Flower's task page looks as it does for any other task.
    """
    fields = (
        f"'id': {event.id!r}, 'type': {event.type!r}, "
        f"'attempt': {event.attempt}, 'operator_retries': {event.operator_retries}, "
        f"'occurred_at': {event.occurred_at!r}"
    )
    return f"[{{{fields}, 'payload': {payload_repr(event.payload, mode, max_chars)}}}]"
