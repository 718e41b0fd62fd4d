"""The outbox's configuration: one validated, immutable object.

The options and defaults follow the TypeScript ``outbox-event-bus`` DynamoDB
adapter (batch size 50, poll interval 1 s, processing timeout 30 s, five
retries, 1 s base backoff, 30 s error backoff), in milliseconds as there, plus
what a Python service needs: the table, the endpoint, a backoff cap and what
to do with completed events.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from celery_outbox.errors import ConfigError

__all__ = ["Completion", "OutboxConfig", "WriteMode"]

DEFAULT_INDEX = "status-gsiSortKey-index"
DAY_MS = 24 * 3600 * 1000
# DynamoDB's rule for table and index names.
_NAME = re.compile(r"[A-Za-z0-9_.-]{3,255}")
# lastError must leave room in the 400 KB item for the event itself.
_MAX_ERROR_CHARS = 10_000
MAX_SHARDS = 64


class Completion(StrEnum):
    """What happens to an event once its handler succeeded."""

    DELETE = "delete"
    """Delete the item (the least storage; nothing left to inspect)."""

    KEEP = "keep"
    """Keep it as ``completed`` with a TTL of ``retention_ms``."""


class WriteMode(StrEnum):
    """How claims and write-backs reach DynamoDB (see docs/performance.md)."""

    ITEM = "item"
    """One conditional request per claim and per write-back; runs everywhere."""

    PARTIQL = "partiql"
    """Conditional PartiQL batches of up to 25 statements (DynamoDB and
    DynamoDB Local; moto cannot run them)."""


def _whole(name: str, value: Any, *, minimum: int = 1, unit: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        what = f"a whole number of {unit}" if unit else "a whole number"
        raise ConfigError(name, f"expected {what}, got {value!r}")
    if value < minimum:
        raise ConfigError(name, f"must be at least {minimum}, got {value}")


@dataclass(frozen=True, kw_only=True)
class OutboxConfig:
    """Settings for one outbox table. Every field is validated on creation.

    Times are in milliseconds, as in DynamoDB's ``gsiSortKey``.
    """

    table_name: str = "outbox"
    """The DynamoDB table holding the events."""

    status_index_name: str = DEFAULT_INDEX
    """The GSI on ``status`` (S) and ``gsiSortKey`` (N)."""

    endpoint_url: str | None = None
    """DynamoDB endpoint, e.g. ``http://127.0.0.1:8000`` for DynamoDB Local."""

    region_name: str | None = None
    """AWS region; botocore's usual lookup applies when left unset."""

    batch_size: int = 50
    """Events claimed per drain at most."""

    max_query_pages: int = 5
    """Pages of the status index a drain reads at most to fill a batch."""

    poll_interval_ms: int = 1000
    """How often beat runs the drain."""

    processing_timeout_ms: int = 30_000
    """The lease: how long a claimed event may run before it can be reclaimed."""

    max_retries: int = 5
    """Retries after the first attempt; the event is ``failed`` after that."""

    base_backoff_ms: int = 1000
    """Delay before the first retry; doubled for each further one."""

    max_backoff_ms: int = 300_000
    """Cap on the retry delay."""

    max_error_backoff_ms: int = 30_000
    """Cap on the pause between drains after DynamoDB errors."""

    completion: Completion = Completion.DELETE
    """Delete completed events, or keep them for ``retention_ms``."""

    retention_ms: int = 7 * DAY_MS
    """How long a kept completed event stays before its TTL removes it."""

    max_error_chars: int = 500
    """``lastError`` is cut to this many characters."""

    handler_queue: str | None = None
    """Queue for handler tasks that name none of their own."""

    payload_repr: str = "redact"
    """How task argument reprs (Flower, logs) show payloads: ``redact`` keeps
    only the keys, ``truncate`` cuts the repr, ``full`` shows it (see
    :mod:`celery_outbox.redaction`)."""

    payload_repr_chars: int = 200
    """The longest payload repr shown in ``redact`` and ``truncate`` modes."""

    # -- performance (docs/performance.md) --------------------------------

    write_mode: WriteMode = WriteMode.ITEM
    """``item`` or ``partiql``: claims, handler starts and completions one
    request each, or batched in conditional PartiQL statements (fewer
    requests per event)."""

    flush_interval_ms: int = 50
    """``partiql``: how long a worker buffers completions and handler start
    marks before writing them together (sooner when 25 are waiting)."""

    busy_poll_interval_ms: int = 100
    """While drains keep finding events, the next one runs after this instead
    of the poll interval (at once after a full batch); 0 turns it off."""

    nudge: bool = False
    """After an emit commits, ask for a drain at once (debounced) instead of
    waiting for the next beat tick."""

    shards: int = 1
    """Spread due and leased events over this many index partitions
    (``created#0``...); 1 keeps the TypeScript adapter's layout."""

    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)
    """Options that are not the outbox's own, kept for integrations."""

    def __new__(cls, *args: Any, **kwargs: Any) -> OutboxConfig:
        # The generated __init__ would raise a bare TypeError for a misspelt
        # option; name it, and the option meant, as for Celery settings.
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, names, n=1)
            hint = (
                f"did you mean {close[0]!r}?"
                if close
                else "see the configuration reference in the README"
            )
            raise ConfigError(name, f"is not an outbox option; {hint}")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        for name in ("table_name", "status_index_name"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _NAME.fullmatch(value):
                raise ConfigError(
                    name,
                    "expected a DynamoDB name: 3-255 letters, digits, '_', '-' "
                    f"or '.', got {value!r}",
                )
        for name in ("endpoint_url", "region_name", "handler_queue"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(name, f"expected a non-empty string, got {value!r}")
        if self.endpoint_url and not self.endpoint_url.startswith(
            ("http://", "https://")
        ):
            raise ConfigError(
                "endpoint_url",
                f"expected an http:// or https:// URL, got {self.endpoint_url!r}",
            )
        _whole("batch_size", self.batch_size)
        _whole("max_query_pages", self.max_query_pages)
        _whole("max_retries", self.max_retries, minimum=0)
        _whole("max_error_chars", self.max_error_chars, minimum=20)
        for name in (
            "poll_interval_ms",
            "processing_timeout_ms",
            "base_backoff_ms",
            "max_backoff_ms",
            "max_error_backoff_ms",
            "retention_ms",
        ):
            _whole(name, getattr(self, name), unit="milliseconds")
        _whole("payload_repr_chars", self.payload_repr_chars, minimum=20)
        self._check_performance()
        if self.payload_repr not in ("redact", "truncate", "full"):
            raise ConfigError(
                "payload_repr",
                f"expected 'redact', 'truncate' or 'full', got {self.payload_repr!r}",
            )
        if self.batch_size > 1000:
            raise ConfigError(
                "batch_size", f"must be at most 1000, got {self.batch_size}"
            )
        if self.max_error_chars > _MAX_ERROR_CHARS:
            raise ConfigError(
                "max_error_chars",
                f"must be at most {_MAX_ERROR_CHARS}, got {self.max_error_chars}",
            )
        if not isinstance(self.extra, Mapping):
            raise ConfigError(
                "extra", f"expected a mapping, got {type(self.extra).__name__}"
            )
        if self.base_backoff_ms > self.max_backoff_ms:
            raise ConfigError(
                "base_backoff_ms",
                f"{self.base_backoff_ms} exceeds max_backoff_ms "
                f"({self.max_backoff_ms}); the base cannot be above the cap",
            )
        if not isinstance(self.completion, Completion):
            try:
                object.__setattr__(self, "completion", Completion(self.completion))
            except (ValueError, TypeError):
                raise ConfigError(
                    "completion",
                    f"expected 'delete' or 'keep', got {self.completion!r}",
                ) from None

    def _check_performance(self) -> None:
        _whole("flush_interval_ms", self.flush_interval_ms, unit="milliseconds")
        _whole(
            "busy_poll_interval_ms",
            self.busy_poll_interval_ms,
            minimum=0,
            unit="milliseconds",
        )
        if not isinstance(self.nudge, bool):
            raise ConfigError("nudge", f"expected True or False, got {self.nudge!r}")
        if (
            isinstance(self.shards, bool)
            or not isinstance(self.shards, int)
            or not (1 <= self.shards <= MAX_SHARDS)
        ):
            raise ConfigError(
                "shards",
                f"expected a whole number from 1 to {MAX_SHARDS}, got {self.shards!r}",
            )
        if not isinstance(self.write_mode, WriteMode):
            try:
                object.__setattr__(self, "write_mode", WriteMode(self.write_mode))
            except ValueError:
                raise ConfigError(
                    "write_mode",
                    f"expected 'item' or 'partiql', got {self.write_mode!r}",
                ) from None

    @property
    def retention_s(self) -> int:
        """The retention in whole seconds, as DynamoDB's TTL wants it."""
        return math.ceil(self.retention_ms / 1000)

    def replace(self, **changes: Any) -> OutboxConfig:
        """Return a copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def option_names(cls) -> list[str]:
        """The names of the outbox's own options."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> OutboxConfig:
        """Build from a mapping, rejecting keys that name no option."""
        names = set(cls.option_names())
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(
                unknown[0],
                f"unknown option; the options are: {', '.join(sorted(names))}",
            )
        return cls(**dict(values))
