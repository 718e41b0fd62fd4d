"""Start-up checks: time limits and the broker's visibility timeout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery, signals

from celery_outbox import Event, Outbox
from celery_outbox.checks import Level, StartupCheckError, find_problems


def outbox_with(broker: str = "memory://", **conf: object) -> Outbox:
    """An outbox whose app has ``conf`` and a 30 s processing timeout."""
    app = Celery("checks", broker=broker)
    app.conf.outbox_processing_timeout_ms = 30_000
    for key, value in conf.items():
        app.conf[key] = value
    return Outbox(app)


def register(outbox: Outbox, event_type: str, **options: object) -> None:
    """Register a do-nothing handler for ``event_type``."""
    options.setdefault("name", f"h.{event_type}")

    def handle(event: Event) -> None: ...

    outbox.handler(event_type, **options)(handle)


@dataclass(eq=False)
class FakeWorker:
    """What the checks read from a starting worker."""

    app: Any
    time_limit: float | None = None
    pool_cls: str | None = "prefork"


class TestTimeLimits:
    """The processing timeout must outlast every handler."""

    def test_limit_below_timeout_is_fine(self) -> None:
        """A handler with a 20 s limit under a 30 s lease raises nothing."""
        outbox = outbox_with()
        register(outbox, "a.b", time_limit=20)
        assert find_problems(outbox) == []

    def test_limit_at_or_above_timeout_is_an_error(self) -> None:
        """A 30 s time limit on a 30 s lease is an error naming the setting."""
        outbox = outbox_with()
        register(outbox, "a.b", time_limit=30, name="h.slow")
        (problem,) = find_problems(outbox)
        assert problem.level is Level.ERROR
        assert problem.setting == "outbox_processing_timeout_ms"
        assert "'a.b' (h.slow) may run for 30 s" in problem.message

    def test_app_wide_and_worker_limits_count(self) -> None:
        """task_time_limit, and a worker's --time-limit, apply to every handler."""
        outbox = outbox_with(task_time_limit=60)
        register(outbox, "a.b")
        assert [p.level for p in find_problems(outbox)] == [Level.ERROR]
        outbox = outbox_with()
        register(outbox, "a.b")
        assert [p.level for p in find_problems(outbox, time_limit_s=45)] == [
            Level.ERROR
        ]

    def test_soft_limit_alone_counts(self) -> None:
        """A soft time limit at or above the lease is an error too."""
        outbox = outbox_with()
        register(outbox, "a.b", soft_time_limit=40)
        assert "soft_time_limit" in find_problems(outbox)[0].message

    def test_no_limit_is_a_warning(self) -> None:
        """Handlers without any time limit are listed in one warning."""
        outbox = outbox_with()
        register(outbox, "a.b")
        register(outbox, "c.d")
        (problem,) = find_problems(outbox)
        assert problem.level is Level.WARNING
        assert "'a.b', 'c.d'" in problem.message

    def test_pool_without_time_limits_is_a_warning(self) -> None:
        """On the threads pool a time limit is not enforced: a warning."""
        outbox = outbox_with()
        register(outbox, "a.b", time_limit=10)
        (problem,) = find_problems(outbox, pool="threads")
        assert problem.level is Level.WARNING
        assert "threads pool does not enforce" in problem.message


class TestVisibilityTimeout:
    """Redis and SQS must not redeliver a message under a live lease."""

    @pytest.mark.parametrize("broker", ["redis://127.0.0.1:6379/0", "sqs://"])
    def test_short_visibility_timeout_is_an_error(self, broker: str) -> None:
        """A visibility timeout not above the lease is an error."""
        outbox = outbox_with(
            broker, broker_transport_options={"visibility_timeout": 30}
        )
        (problem,) = find_problems(outbox)
        assert problem.level is Level.ERROR
        assert problem.setting == "broker_transport_options"
        assert "visibility_timeout of 30 s" in problem.message

    def test_default_visibility_timeout_against_a_long_lease(self) -> None:
        """The 3600 s default counts when no visibility_timeout is set."""
        outbox = outbox_with(
            "redis://127.0.0.1:6379/0", outbox_processing_timeout_ms=4_000_000
        )
        assert "3600 s" in find_problems(outbox)[0].message

    def test_default_is_fine_and_amqp_has_none(self) -> None:
        """Redis with the default, and AMQP, raise nothing."""
        assert find_problems(outbox_with("redis://127.0.0.1:6379/0")) == []
        assert find_problems(outbox_with("amqp://guest@127.0.0.1//")) == []


class TestWorkerStart:
    """The checks run when a worker of the app starts."""

    def test_errors_refuse_to_start(self) -> None:
        """A worker start with an error raises StartupCheckError (a SystemExit)."""
        outbox = outbox_with()
        register(outbox, "a.b", time_limit=60)
        worker = FakeWorker(outbox.app)
        with pytest.raises(StartupCheckError) as info:
            signals.celeryd_after_setup.send(sender="w@h", instance=worker, conf=None)
        assert "would run events twice" in str(info.value.code)
        assert info.value.problems[0].level is Level.ERROR

    def test_warnings_are_logged(self, caplog: pytest.LogCaptureFixture) -> None:
        """Warnings are logged and the worker starts."""
        outbox = outbox_with()
        register(outbox, "a.b")
        worker = FakeWorker(outbox.app)
        signals.celeryd_after_setup.send(sender="w@h", instance=worker, conf=None)
        assert "have no time limit" in caplog.text

    def test_other_apps_are_not_checked(self) -> None:
        """A worker of another app does not run this outbox's checks."""
        outbox = outbox_with()
        register(outbox, "a.b", time_limit=60)
        other = FakeWorker(Celery("other"))
        signals.celeryd_after_setup.send(sender="w@h", instance=other, conf=None)


def test_problem_as_dict() -> None:
    """Problems serialise for the CLI's JSON output."""
    outbox = outbox_with()

    @outbox.handler("a.b", time_limit=31)
    def handle(event: Event) -> None: ...

    (problem,) = find_problems(outbox)
    assert problem.as_dict()["level"] == "error"
    assert str(problem).startswith("error: outbox_processing_timeout_ms: ")


def test_sqs_default_visibility_is_half_an_hour() -> None:
    """SQS's 1800 s default counts against a lease of half an hour or more."""
    outbox = outbox_with("sqs://", outbox_processing_timeout_ms=1_800_000)
    assert "visibility_timeout of 1800 s" in find_problems(outbox)[0].message
    assert find_problems(outbox_with("sqs://")) == []
