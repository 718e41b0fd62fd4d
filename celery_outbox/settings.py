"""Outbox settings in a Celery app's configuration, under ``outbox_``.

Every :class:`~celery_outbox.config.OutboxConfig` option is a Celery setting
named ``outbox_<option>`` (``outbox_table_name``, ``outbox_batch_size``...).
Defaults are registered with ``app.add_defaults``, so a Django project that
loads Celery settings with ``namespace="CELERY"`` sets
``CELERY_OUTBOX_TABLE_NAME`` like any other Celery setting.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from celery_outbox.config import OutboxConfig
from celery_outbox.errors import ConfigError

__all__ = ["PREFIX", "config_from_app", "defaults"]

PREFIX = "outbox_"


def defaults() -> dict[str, Any]:
    """The ``outbox_*`` settings with their default values."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(OutboxConfig):
        if f.name == "extra":
            continue
        default = f.default
        if isinstance(default, dataclasses._MISSING_TYPE):  # pragma: no cover
            continue
        values[PREFIX + f.name] = getattr(default, "value", default)
    return values


def config_from_app(app: Any, **overrides: Any) -> OutboxConfig:
    """Build the outbox configuration from ``app.conf`` and ``overrides``.

    Raises:
        ConfigError: a setting has an invalid value; the message names the
            Celery setting (``outbox_batch_size: ...``).
    """
    values: dict[str, Any] = {}
    for name in OutboxConfig.option_names():
        value = app.conf.get(PREFIX + name)
        if value is not None or name in ("endpoint_url", "region_name", "handler_queue"):
            values[name] = value
    unknown = sorted(set(overrides) - set(OutboxConfig.option_names()))
    if unknown:
        raise ConfigError(unknown[0], "unknown outbox option")
    values.update(overrides)
    try:
        return OutboxConfig(**values)
    except ConfigError as exc:
        if exc.option in overrides:
            raise
        raise ConfigError(PREFIX + exc.option, str(exc).split(": ", 1)[1]) from None
