"""Start-up checks: settings that would make an event run twice.

An event is leased for ``outbox_processing_timeout_ms``. Two settings
elsewhere can outlast that lease while the first attempt is still alive,
after which a drain reclaims the event and a second attempt runs beside it:

* a handler's time limit (the task's ``time_limit``, else the worker's or
  ``task_time_limit``) at or above the processing timeout, or no limit at
  all on a pool that enforces none;
* the broker's visibility timeout (Redis and SQS redeliver a message that
  was not acknowledged within ``visibility_timeout``, by default 3600 s on
  Redis and 1800 s on SQS) at
  or below the processing timeout: the broker itself sends the live
  attempt's message again.

:func:`find_problems` returns what it finds, for ``celery outbox check``
and tests. When a worker starts, :func:`install` logs every problem and
stops the worker when one is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from celery import signals
from celery.utils.log import get_logger

from celery_outbox import settings

if TYPE_CHECKING:
    from celery_outbox.outbox import Outbox

__all__ = [
    "DEFAULT_VISIBILITY_TIMEOUT_S",
    "Level",
    "Problem",
    "StartupCheckError",
    "find_problems",
    "install",
]

logger = get_logger("celery_outbox.checks")

DEFAULT_VISIBILITY_TIMEOUT_S = {
    "redis": 3600,
    "rediss": 3600,
    "sentinel": 3600,
    "sqs": 1800,
}
"""kombu's visibility timeout, per transport that has one, when none is set.

These transports hide a delivered message and redeliver it after the
visibility timeout unless it was acknowledged."""
# Pools that cannot interrupt a running task, so time limits do nothing.
_NO_TIME_LIMITS = ("threads", "solo", "eventlet", "gevent")


class Level(StrEnum):
    """How serious a problem is."""

    ERROR = "error"
    """Events can run twice: the worker refuses to start."""

    WARNING = "warning"
    """Events can run twice in circumstances worth knowing about."""


@dataclass(frozen=True)
class Problem:
    """One finding of the start-up checks.

    Attributes:
        level: error or warning.
        setting: the setting to change, as the user writes it.
        message: what is wrong and how to fix it, in full sentences.
    """

    level: Level
    setting: str
    message: str

    def __str__(self) -> str:
        return f"{self.level.value}: {self.setting}: {self.message}"

    def as_dict(self) -> dict[str, str]:
        """A JSON-serialisable dict."""
        return {
            "level": self.level.value,
            "setting": self.setting,
            "message": self.message,
        }


class StartupCheckError(SystemExit):
    """The worker refuses to start: a setting would make events run twice.

    A :class:`SystemExit`, because Celery's signal dispatch logs and swallows
    ordinary exceptions raised by receivers.
    """

    def __init__(self, problems: list[Problem]) -> None:
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            "celery_outbox: the worker would run events twice; fix these "
            f"settings:\n{lines}"
        )
        self.problems = problems


def find_problems(
    outbox: Outbox,
    *,
    time_limit_s: float | None = None,
    pool: str | None = None,
) -> list[Problem]:
    """Check ``outbox``'s app for settings that would run events twice.

    Args:
        outbox: the installed outbox; its app's handlers and broker are
            checked against its processing timeout.
        time_limit_s: the worker's own hard time limit (``--time-limit``),
            when checking for a particular worker.
        pool: the worker's pool name (``prefork``, ``threads``...).

    Returns:
        The problems found, errors first; empty when all is well.
    """
    problems = _time_limits(outbox, time_limit_s, pool) + _visibility(outbox)
    return sorted(problems, key=lambda p: p.level is not Level.ERROR)


def _timeout_setting(outbox: Outbox) -> str:
    if outbox.app is None:
        return "processing_timeout_ms"
    return settings.setting_name(outbox.app, "processing_timeout_ms")


def _time_limits(
    outbox: Outbox, worker_limit_s: float | None, pool: str | None
) -> list[Problem]:
    timeout_s = outbox.config.processing_timeout_ms / 1000
    conf = outbox.app.conf
    default_limit = worker_limit_s or conf.task_time_limit
    enforced = (pool or conf.worker_pool or "prefork") not in _NO_TIME_LIMITS
    problems: list[Problem] = []
    unlimited: list[str] = []
    for event_type, task in sorted(outbox.handlers.items()):
        hard = getattr(task, "time_limit", None) or default_limit
        soft = getattr(task, "soft_time_limit", None) or conf.task_soft_time_limit
        limit = hard or soft
        if limit is None:
            unlimited.append(event_type)
            continue
        if limit >= timeout_s:
            which = "time_limit" if hard else "soft_time_limit"
            problems.append(
                Problem(
                    Level.ERROR,
                    _timeout_setting(outbox),
                    f"the handler of {event_type!r} ({task.name}) may run for "
                    f"{limit:g} s ({which}) but its lease lasts {timeout_s:g} s: a "
                    "drain would reclaim the event while it still runs. Make the "
                    "processing timeout longer than the time limit plus the time "
                    "a task may wait in the queue, or lower the time limit.",
                )
            )
        elif not enforced:
            problems.append(
                Problem(
                    Level.WARNING,
                    "worker_pool",
                    f"the {pool or conf.worker_pool} pool does not enforce time "
                    f"limits, so the handler of {event_type!r} can outlive its "
                    f"{timeout_s:g} s lease and run twice; keep it well under the "
                    "processing timeout.",
                )
            )
    if unlimited:
        problems.append(
            Problem(
                Level.WARNING,
                "time_limit",
                f"the handlers of {', '.join(repr(t) for t in unlimited)} have no "
                f"time limit: one running longer than the {timeout_s:g} s lease "
                "is reclaimed and runs twice. Give them a time_limit below the "
                "processing timeout (task option, or task_time_limit).",
            )
        )
    return problems


def _visibility(outbox: Outbox) -> list[Problem]:
    app = outbox.app
    conf = app.conf
    transport = _transport(app)
    default_s = DEFAULT_VISIBILITY_TIMEOUT_S.get(transport)
    if default_s is None:
        return []
    options = conf.broker_transport_options or {}
    visibility_s = float(options.get("visibility_timeout", default_s))
    timeout_s = outbox.config.processing_timeout_ms / 1000
    if visibility_s > timeout_s:
        return []
    name = settings.setting_name(app, "processing_timeout_ms")
    return [
        Problem(
            Level.ERROR,
            "broker_transport_options",
            f"the {transport} broker redelivers an unacknowledged message after "
            f"its visibility_timeout of {visibility_s:g} s, which is not longer "
            f"than the {timeout_s:g} s lease ({name}): a handler still running "
            "under a live lease would be started again. Raise visibility_timeout "
            "in broker_transport_options above the processing timeout.",
        )
    ]


def _transport(app: Any) -> str:
    url = app.conf.broker_url or ""
    scheme = str(url).split("://", 1)[0].split("+", 1)[0].lower()
    return str(app.conf.broker_transport or scheme or "amqp").lower()


def install(outbox: Outbox) -> None:
    """Run the checks when a ``celery worker`` of ``outbox``'s app starts.

    They run on ``celeryd_after_setup``: the worker's logging is set up by
    then, and no pool or consumer has started, so refusing to start leaves
    every message in the broker.
    """

    def on_worker_setup(
        sender: Any = None, instance: Any = None, **kwargs: Any
    ) -> None:
        if getattr(instance, "app", None) is not outbox.app:
            return  # another app's worker in this process (tests)
        problems = find_problems(
            outbox,
            time_limit_s=getattr(instance, "time_limit", None),
            pool=_pool_name(getattr(instance, "pool_cls", None)),
        )
        for problem in problems:
            log = logger.error if problem.level is Level.ERROR else logger.warning
            log("Outbox start-up check: %s", problem)
        errors = [p for p in problems if p.level is Level.ERROR]
        if errors:
            raise StartupCheckError(errors)

    # A weak receiver, kept alive by the outbox: an app dropped by its
    # owner (tests make many) takes its receiver with it.
    outbox.receivers.append(on_worker_setup)
    signals.celeryd_after_setup.connect(on_worker_setup)


def _pool_name(pool: Any) -> str | None:
    if pool is None or isinstance(pool, str):
        return pool
    module = getattr(pool, "__module__", "") or ""
    return {
        "celery.concurrency.prefork": "prefork",
        "celery.concurrency.thread": "threads",
        "celery.concurrency.solo": "solo",
        "celery.concurrency.eventlet": "eventlet",
        "celery.concurrency.gevent": "gevent",
    }.get(module, module.rsplit(".", 1)[-1])
