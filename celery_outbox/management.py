"""Management tasks: look at and act on the outbox from Flower or any client.

Installing an outbox registers these Celery tasks on its app:

=================================  =========================================
``celery_outbox.failed_events``    one page of failed events (``type``,
                                   ``limit``, ``cursor``)
``celery_outbox.retry_failed``     retry failed events: the ``ids`` given,
                                   or every failed one (of ``type``)
``celery_outbox.stats``            counts per status, due count, oldest due
                                   event's age
``celery_outbox.purge_completed``  delete kept completed events older than
                                   ``older_than_ms``
=================================  =========================================

Each returns plain JSON values, so any result backend stores it and Flower
shows it. They run wherever the app's workers run, e.g. from Flower's HTTP
API::

    curl -X POST -d '{"kwargs": {"type": "order.created"}}' \\
        http://flower:5555/api/task/async-apply/celery_outbox.retry_failed

Payloads in ``failed_events`` results go through the same redaction as task
arguments (``outbox_payload_repr``): a result backend and Flower keep them.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from celery.utils.log import get_task_logger

from celery_outbox import redaction
from celery_outbox.errors import ArgumentError

if TYPE_CHECKING:
    from celery_outbox.outbox import Outbox

__all__ = [
    "FAILED_EVENTS",
    "PURGE_COMPLETED",
    "RETRY_FAILED",
    "STATS",
    "TASK_NAMES",
    "installed",
    "register",
]

logger = get_task_logger("celery_outbox.management")

FAILED_EVENTS = "celery_outbox.failed_events"
RETRY_FAILED = "celery_outbox.retry_failed"
STATS = "celery_outbox.stats"
PURGE_COMPLETED = "celery_outbox.purge_completed"
TASK_NAMES = (FAILED_EVENTS, RETRY_FAILED, STATS, PURGE_COMPLETED)

# The outbox installed on each app, for the ``celery outbox`` command. Weak,
# so an app that is dropped (tests make many) takes its outbox with it.
_installed: weakref.WeakKeyDictionary[Any, Outbox] = weakref.WeakKeyDictionary()


def installed(app: Any) -> Outbox | None:
    """The outbox installed on ``app``, or None."""
    return _installed.get(app)


def register(outbox: Outbox) -> None:
    """Register the management tasks of ``outbox`` on its Celery app."""
    app = outbox.app
    _installed[app] = outbox
    # Results are the point of these tasks: keep them whatever the app's
    # task_ignore_result says.
    options = {"shared": False, "ignore_result": False, "serializer": "json"}

    @app.task(name=FAILED_EVENTS, **options)  # type: ignore[untyped-decorator]
    def failed_events(
        type: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> dict[str, Any]:
        """One page of failed events, newest failure first.

        Returns ``{"events": [...], "cursor": ...}``; pass ``cursor`` back
        for the next page (it is None after the last one).
        """
        page = outbox.store.failed(limit=limit, cursor=cursor, type=type)
        config = outbox.config
        events = []
        for failed in page.events:
            body = failed.as_dict()
            body["payload"] = redaction.event_repr(
                failed.event, config.payload_repr, config.payload_repr_chars
            )["payload"]
            events.append(body)
        return {"events": events, "cursor": page.cursor}

    @app.task(name=RETRY_FAILED, **options)  # type: ignore[untyped-decorator]
    def retry_failed(
        ids: list[str] | None = None, type: str | None = None
    ) -> dict[str, Any]:
        """Retry failed events: ``ids``, or all failed ones (of ``type``).

        Returns which ids were retried, which are not stored and which were
        not ``failed`` (left untouched). Ids given, even none, are the only
        ones retried; ``type`` narrows the retry of all failed events and is
        refused with ids, as in ``celery outbox retry``.
        """
        if ids is not None and type is not None:
            raise ArgumentError(
                "type",
                "narrows the retry of all failed events (ids=None); "
                "it does not filter ids",
            )
        if ids is not None:
            report = outbox.store.retry(ids)
        else:
            report = outbox.store.retry_failed(type=type)
        if ids is not None:
            chosen = "given ids"
        else:
            chosen = f"failed events of type {type!r}" if type else "all failed events"
        logger.info(
            "Operator retry of %s: %d retried, %d missing, %d not failed",
            chosen,
            len(report.retried),
            len(report.missing),
            len(report.not_failed),
        )
        return report.as_dict()

    @app.task(name=STATS, **options)  # type: ignore[untyped-decorator]
    def stats() -> dict[str, Any]:
        """Counts per status, the due count and the oldest due event's age."""
        return outbox.store.stats().as_dict()

    @app.task(name=PURGE_COMPLETED, **options)  # type: ignore[untyped-decorator]
    def purge_completed(older_than_ms: int | None = None) -> dict[str, int]:
        """Delete kept completed events older than ``older_than_ms``.

        Defaults to ``outbox_retention_ms``; returns ``{"purged": n}``.
        """
        age = outbox.config.retention_ms if older_than_ms is None else older_than_ms
        return {"purged": outbox.store.purge_completed(age)}
