"""Installing the outbox into an app: settings, namespaces and the beat entry."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from celery_outbox import ConfigError, Outbox, OutboxConfig
from celery_outbox import settings as outbox_settings
from celery_outbox.tasks import BEAT_ENTRY, DRAIN_TASK


def app_from(source: type, namespace: str | None = None) -> Celery:
    """An app configured from a settings class, as Django projects do."""
    app = Celery("settings-test")
    app.config_from_object(source, namespace=namespace)
    return app


class DjangoSettings:
    """A Django settings module with the CELERY_ namespace."""

    CELERY_BROKER_URL = "memory://"
    CELERY_OUTBOX_TABLE_NAME = "shop-outbox"
    CELERY_OUTBOX_BATCH_SIZE = 25
    CELERY_OUTBOX_POLL_INTERVAL_MS = 2500
    OUTBOX_TABLE_NAME = "not-celery"  # another library's setting, not ours


class TestSettings:
    """outbox_* settings are read like Celery's own."""

    def test_django_namespace(self) -> None:
        """CELERY_OUTBOX_* settings configure the outbox under namespace=CELERY."""
        config = Outbox(app_from(DjangoSettings, "CELERY")).config
        assert config.table_name == "shop-outbox"
        assert config.batch_size == 25
        assert config.poll_interval_ms == 2500
        assert config.processing_timeout_ms == OutboxConfig().processing_timeout_ms

    def test_config_object_wins_over_defaults(self) -> None:
        """Values from config_from_object are not hidden by the registered defaults."""

        class Plain:
            broker_url = "memory://"
            outbox_table_name = "plain-outbox"
            outbox_max_retries = 2

        app = app_from(Plain)
        outbox = Outbox(app)
        assert outbox.config.table_name == "plain-outbox"
        assert outbox.config.max_retries == 2
        assert app.conf.outbox_table_name == "plain-outbox"
        assert app.conf.outbox_batch_size == OutboxConfig().batch_size

    def test_defaults_are_registered(self) -> None:
        """Every option has its outbox_* default in app.conf."""
        app = Celery("defaults", broker="memory://")
        Outbox(app)
        for name in OutboxConfig.option_names():
            default = getattr(OutboxConfig(), name)
            assert app.conf[f"outbox_{name}"] == getattr(default, "value", default)

    def test_conf_set_after_install_is_read(self) -> None:
        """Settings assigned on app.conf after Outbox(app) are used."""
        app = Celery("late", broker="memory://")
        outbox = Outbox(app)
        app.conf.outbox_table_name = "late-outbox"
        assert outbox.config.table_name == "late-outbox"

    def test_keyword_options_override_settings(self) -> None:
        """Outbox(app, batch_size=...) wins over the app's setting."""
        app = app_from(DjangoSettings, "CELERY")
        assert Outbox(app, batch_size=7).config.batch_size == 7

    @pytest.mark.parametrize(
        ("namespace", "key", "named"),
        [
            ("CELERY", "CELERY_OUTBOX_BATCH_SIZE", "CELERY_OUTBOX_BATCH_SIZE"),
            (None, "outbox_batch_size", "outbox_batch_size"),
        ],
    )
    def test_invalid_value_names_the_setting(
        self, namespace: str | None, key: str, named: str
    ) -> None:
        """A bad value raises ConfigError naming the setting as the user wrote it."""
        source = type("Source", (), {key: "fifty"})
        with pytest.raises(ConfigError) as info:
            Outbox(app_from(source, namespace)).config  # noqa: B018
        assert info.value.option == named
        assert str(info.value).startswith(f"{named}: ")

    def test_unknown_setting_suggests_the_right_one(self) -> None:
        """A misspelt outbox setting is refused with the likely intended name."""
        source = type("Source", (), {"CELERY_OUTBOX_BATCHSIZE": 10})
        with pytest.raises(
            ConfigError, match="did you mean 'CELERY_OUTBOX_BATCH_SIZE'"
        ):
            Outbox(app_from(source, "CELERY")).config  # noqa: B018

    def test_a_misspelt_keyword_beside_an_app_suggests_the_option(self) -> None:
        """A keyword of ``Outbox(app, ...)`` is named as written, with the
        option meant, as without an app."""
        with pytest.raises(ConfigError, match="did you mean 'batch_size'") as info:
            Outbox(Celery("a"), batchsize=5).config  # noqa: B018
        assert info.value.option == "batchsize"

    def test_setting_name(self) -> None:
        """setting_name gives the spelling of the app's namespace."""
        assert outbox_settings.setting_name(Celery("a"), "batch_size") == (
            "outbox_batch_size"
        )
        app = app_from(DjangoSettings, "CELERY")
        assert outbox_settings.setting_name(app, "batch_size") == (
            "CELERY_OUTBOX_BATCH_SIZE"
        )


def drain_entries(app: Celery) -> dict[str, Any]:
    """The beat entries that run the drain task."""
    return {
        name: entry
        for name, entry in app.conf.beat_schedule.items()
        if entry["task"] == DRAIN_TASK
    }


class TestBeatEntry:
    """The drain is scheduled at the poll interval unless the user did it."""

    def test_added_with_interval_and_expiry(self) -> None:
        """The entry runs every poll interval and its messages expire."""
        app = Celery("beat", broker="memory://")
        app.conf.outbox_poll_interval_ms = 2500
        Outbox(app)
        entry = drain_entries(app)[BEAT_ENTRY]
        assert entry["schedule"] == 2.5
        assert entry["options"]["expires"] == 2.5

    def test_short_interval_expires_after_a_second(self) -> None:
        """A drain never expires in under a second (clock differences)."""
        app = Celery("beat", broker="memory://")
        app.conf.outbox_poll_interval_ms = 200
        Outbox(app)
        entry = drain_entries(app)[BEAT_ENTRY]
        assert entry["schedule"] == 0.2
        assert entry["options"]["expires"] == 1.0

    def test_user_entry_wins(self) -> None:
        """A user's own entry for celery_outbox.drain is left alone and alone."""
        app = Celery("beat", broker="memory://")
        app.conf.beat_schedule = {
            "my-drain": {"task": DRAIN_TASK, "schedule": 10.0},
        }
        Outbox(app)
        assert list(drain_entries(app)) == ["my-drain"]

    def test_added_when_app_already_configured(self) -> None:
        """Installing into an app whose configuration is loaded still schedules."""
        app = Celery("beat", broker="memory://")
        assert app.conf.broker_url == "memory://"  # loads the configuration
        Outbox(app)
        assert BEAT_ENTRY in drain_entries(app)

    def test_drain_task_registered(self) -> None:
        """The drain is a task of the app under its fixed name."""
        app = Celery("beat", broker="memory://")
        outbox = Outbox(app)
        assert app.tasks[DRAIN_TASK].name == outbox.drain_task.name
