"""What ``celery outbox check`` looks at: the table, and settings that clash.

Each finding is a :class:`Finding`. A *problem* means the outbox cannot work
as configured or may run an event twice; a *warning* means a setting an
operator should look at. The command exits non-zero on problems only.

The settings checks are the worker's own start-up checks
(:func:`celery_outbox.checks.find_problems`), so the command and the worker
never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from botocore.exceptions import BotoCoreError

from celery_outbox import checks
from celery_outbox.errors import OutboxError
from celery_outbox.store import OutboxStore

__all__ = ["Finding", "diagnose"]


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
    # The checks read only these three attributes of an outbox; the CLI's
    # table options may have replaced the installed outbox's config.
    subject: Any = SimpleNamespace(app=app, handlers=handlers, config=store.config)
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
