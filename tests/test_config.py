"""The configuration object: the seed's defaults, and every invalid value refused."""

from __future__ import annotations

from typing import Any

import pytest

from celery_outbox import Completion, ConfigError, OutboxConfig


def test_defaults_follow_the_typescript_adapter() -> None:
    """The shared options default to the TypeScript adapter's values."""
    config = OutboxConfig()
    assert config.batch_size == 50
    assert config.poll_interval_ms == 1000
    assert config.processing_timeout_ms == 30_000
    assert config.max_retries == 5
    assert config.base_backoff_ms == 1000
    assert config.max_error_backoff_ms == 30_000
    assert config.status_index_name == "status-gsiSortKey-index"
    assert config.completion is Completion.DELETE


def test_completion_accepts_its_string_value() -> None:
    """``completion="keep"`` (as a Celery setting would give it) becomes the enum."""
    config = OutboxConfig(completion="keep")  # type: ignore[arg-type]
    assert config.completion is Completion.KEEP


def test_retention_in_seconds_rounds_up() -> None:
    """TTL wants whole seconds; a part second is kept, not dropped."""
    assert OutboxConfig(retention_ms=1500).retention_s == 2


def test_replace_validates() -> None:
    """A copy with changes is validated like a new object."""
    with pytest.raises(ConfigError, match="batch_size"):
        OutboxConfig().replace(batch_size=0)


INVALID: list[tuple[str, Any, str]] = [
    ("table_name", "ab", "3-255"),
    ("table_name", "orders table", "DynamoDB name"),
    ("table_name", None, "DynamoDB name"),
    ("status_index_name", "", "DynamoDB name"),
    ("status_index_name", "idx/1", "DynamoDB name"),
    ("endpoint_url", "localhost:8000", "http:// or https://"),
    ("endpoint_url", "", "non-empty string"),
    ("region_name", "", "non-empty string"),
    ("region_name", 42, "non-empty string"),
    ("handler_queue", "", "non-empty string"),
    ("batch_size", 0, "at least 1"),
    ("batch_size", -5, "at least 1"),
    ("batch_size", 1001, "at most 1000"),
    ("batch_size", "50", "whole number"),
    ("batch_size", 2.5, "whole number"),
    ("batch_size", True, "whole number"),
    ("max_query_pages", 0, "at least 1"),
    ("poll_interval_ms", 0, "at least 1"),
    ("poll_interval_ms", 1.5, "whole number of milliseconds"),
    ("processing_timeout_ms", -1, "at least 1"),
    ("processing_timeout_ms", None, "whole number of milliseconds"),
    ("max_retries", -1, "at least 0"),
    ("max_retries", "5", "whole number"),
    ("base_backoff_ms", 0, "at least 1"),
    ("max_backoff_ms", 0, "at least 1"),
    ("max_error_backoff_ms", -30_000, "at least 1"),
    ("retention_ms", 0, "at least 1"),
    ("retention_ms", False, "whole number"),
    ("max_error_chars", 5, "at least 20"),
    ("max_error_chars", 100_000, "at most 10000"),
    ("completion", "archive", "'delete' or 'keep'"),
    ("completion", ["keep"], "'delete' or 'keep'"),
    ("extra", ["not", "a", "mapping"], "mapping"),
    ("payload_repr", "hide", "'redact', 'truncate' or 'full'"),
    ("payload_repr_chars", 5, "at least 20"),
    # performance options (docs/performance.md)
    ("write_mode", "fast", "'item' or 'partiql'"),
    ("write_mode", ["partiql"], "'item' or 'partiql'"),
    ("flush_interval_ms", 0, "at least 1"),
    ("busy_poll_interval_ms", -1, "at least 0"),
    ("nudge", "yes", "True or False"),
    ("shards", 0, "from 1 to 64"),
    ("shards", 65, "from 1 to 64"),
    ("shards", True, "from 1 to 64"),
]


@pytest.mark.parametrize(
    ("option", "value", "words"),
    INVALID,
    ids=[f"{o}={v!r}" for o, v, _ in INVALID],
)
def test_invalid_value_is_refused(option: str, value: Any, words: str) -> None:
    """An invalid value is refused on creation with a message naming the option."""
    with pytest.raises(ConfigError) as caught:
        OutboxConfig(**{option: value})
    assert caught.value.option == option
    assert str(caught.value).startswith(f"{option}: ")
    assert words in str(caught.value)


def test_base_backoff_above_cap_is_refused() -> None:
    """A base backoff above the cap names both options."""
    with pytest.raises(ConfigError) as caught:
        OutboxConfig(base_backoff_ms=60_000, max_backoff_ms=30_000)
    assert caught.value.option == "base_backoff_ms"
    assert "max_backoff_ms" in str(caught.value)


def test_unknown_option_in_mapping_is_refused() -> None:
    """A mapping key that names no option is refused, and the options listed."""
    with pytest.raises(ConfigError) as caught:
        OutboxConfig.from_mapping({"batchSize": 10})
    assert caught.value.option == "batchSize"
    assert "batch_size" in str(caught.value)


def test_a_misspelt_option_is_named_with_the_one_meant() -> None:
    """Keyword arguments and ``replace`` refuse an unknown option by name."""
    with pytest.raises(ConfigError, match="did you mean 'batch_size'") as caught:
        OutboxConfig(batchsize=3)
    assert caught.value.option == "batchsize"
    with pytest.raises(ConfigError, match="did you mean 'poll_interval_ms'"):
        OutboxConfig().replace(pol_interval_ms=500)
    with pytest.raises(ConfigError, match="configuration reference"):
        OutboxConfig(zzzz=1)
    assert OutboxConfig(batch_size=3).replace(batch_size=4).batch_size == 4


def test_every_option_has_an_invalid_case() -> None:
    """The catalogue above covers every option of the configuration."""
    covered = {option for option, _, _ in INVALID}
    assert covered == set(OutboxConfig.option_names()) | {"extra"}
