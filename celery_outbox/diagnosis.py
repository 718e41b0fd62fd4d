"""What ``celery outbox check`` looks at: the table, and settings that clash.

Each finding is a :class:`Finding`. A *problem* means the outbox cannot work
as configured or may run an event twice; a *warning* means a setting an
operator should look at. The command exits non-zero on problems only.

The settings checks are the worker's start-up checks
(:func:`celery_outbox.checks.find_problems`) when that module is installed;
the functions below cover the same ground until then.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlparse

from botocore.exceptions import BotoCoreError

from celery_outbox.config import OutboxConfig
from celery_outbox.errors import OutboxError
from celery_outbox.store import OutboxStore

__all__ = ["Finding", "diagnose"]

# Transports that redeliver a message nobody acknowledged within a
# visibility timeout, and the timeout they use when none is set.
_VISIBILITY_DEFAULT_S = {"redis": 3600, "rediss": 3600, "sentinel": 3600, "sqs": 1800}


@dataclass(frozen=True)
class Finding:
    """One thing ``check`` found."""

    problem: bool
    """True for a problem (non-zero exit), False for a warning."""

    message: str


def _problem(message: str) -> Finding:
    return Finding(True, message)


def _warning(message: str) -> Finding:
    return Finding(False, message)


def diagnose(
    store: OutboxStore, *, app: Any = None, handlers: dict[str, Any] | None = None
) -> list[Finding]:
    """Check ``store``'s table and, given the app, its Celery settings."""
    findings = _table(store)
    if app is None:
        return findings
    handlers = handlers or {}
    try:
        checks = importlib.import_module("celery_outbox.checks")
    except ImportError:
        findings += _time_limits(store.config, app, handlers)
        findings += _visibility(store.config, app)
    else:
        subject = SimpleNamespace(app=app, handlers=handlers, config=store.config)
        findings += [
            Finding(str(p.level) == "error", f"{p.setting}: {p.message}")
            for p in checks.find_problems(subject)
        ]
    if not handlers:
        findings.append(
            _warning(
                "no outbox handlers are registered in this app; the drain will mark "
                "every event failed (import the modules that declare them)"
            )
        )
    return findings


def _table(store: OutboxStore) -> list[Finding]:
    try:
        warnings = store.verify_table()
    except (OutboxError, BotoCoreError) as exc:
        return [_problem(str(exc))]
    return [_problem(w) for w in warnings]


def _time_limits(
    config: OutboxConfig, app: Any, handlers: dict[str, Any]
) -> list[Finding]:
    """Each handler must be stopped before its lease can be reclaimed.

    Otherwise a slow run is still going when another drain reclaims the
    event and starts it again: the event runs twice at once.
    """
    lease_ms = config.processing_timeout_ms
    findings = []
    for event_type, task in sorted(handlers.items()):
        limit_s = getattr(task, "time_limit", None) or app.conf.task_time_limit
        if limit_s is None:
            findings.append(
                _warning(
                    f"handler {task.name!r} ({event_type}) has no time limit: a run "
                    f"longer than the lease ({lease_ms} ms) may be reclaimed and run "
                    "twice; set time_limit below outbox_processing_timeout_ms"
                )
            )
        elif limit_s * 1000 >= lease_ms:
            findings.append(
                _problem(
                    f"handler {task.name!r} ({event_type}) has time_limit {limit_s} s, "
                    f"not below the lease (outbox_processing_timeout_ms = {lease_ms}): "
                    "a run that long may be reclaimed and run twice; lower the time "
                    "limit or raise the lease"
                )
            )
    return findings


def _visibility(config: OutboxConfig, app: Any) -> list[Finding]:
    """The broker must not redeliver a handler message while its lease lives.

    Redis and SQS hand an unacknowledged message to another worker after
    the visibility timeout; within the lease that runs the event twice.
    """
    url = app.conf.broker_url or ""
    scheme = urlparse(str(url).split(";")[0]).scheme.split("+")[0]
    default = _VISIBILITY_DEFAULT_S.get(scheme)
    if default is None:
        return []
    options = app.conf.broker_transport_options or {}
    timeout_s = options.get("visibility_timeout", default)
    if timeout_s * 1000 > config.processing_timeout_ms:
        return []
    return [
        _problem(
            f"the broker's visibility_timeout ({timeout_s} s) is not above the lease "
            f"(outbox_processing_timeout_ms = {config.processing_timeout_ms}): "
            "an unacknowledged handler message is redelivered while its lease "
            "lives; raise broker_transport_options['visibility_timeout']"
        )
    ]
