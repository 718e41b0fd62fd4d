"""Outbox settings in a Celery app's configuration, under ``outbox_``.

Every :class:`~celery_outbox.config.OutboxConfig` option is a Celery setting
named ``outbox_<option>`` (``outbox_table_name``, ``outbox_batch_size``...).
They are read through ``app.conf`` like Celery's own settings, so a Django
project that loads its Celery settings with ``namespace="CELERY"`` writes
``CELERY_OUTBOX_TABLE_NAME`` like ``CELERY_BROKER_URL``.

Defaults are registered with ``app.add_defaults``. Celery places such
defaults in front of the configuration object given to
``config_from_object``, so a plain dict of defaults would hide the user's
values; the defaults registered here leave out every setting the user has
set, and :func:`config_from_app` reads past them either way.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from celery.utils.text import match_case

from celery_outbox.config import OutboxConfig
from celery_outbox.errors import ConfigError

__all__ = [
    "PREFIX",
    "config_from_app",
    "defaults",
    "install",
    "setting_name",
]

PREFIX = "outbox_"


class _Defaults(dict[str, Any]):
    """The outbox's entry in ``app.conf``'s chain of defaults."""


def defaults() -> dict[str, Any]:
    """The ``outbox_*`` settings with their default values."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(OutboxConfig):
        if f.name == "extra" or f.default is dataclasses.MISSING:
            continue
        values[PREFIX + f.name] = getattr(f.default, "value", f.default)
    return values


def install(app: Any) -> None:
    """Register the ``outbox_*`` defaults on ``app``, the Celery way.

    Registration is lazy: the defaults are computed when Celery loads the
    configuration, and leave out whatever the configuration already sets.
    """

    def unset_defaults() -> _Defaults:
        conf = app.conf  # loading: Celery has bound the configuration
        return _Defaults({k: v for k, v in defaults().items() if k not in conf})

    app.add_defaults(unset_defaults)


def setting_name(app: Any, option: str) -> str:
    """The name the user writes for ``option``, e.g. ``CELERY_OUTBOX_BATCH_SIZE``."""
    namespace = _namespace(app)
    if not namespace:
        return PREFIX + option
    return str(match_case(namespace + PREFIX + option, namespace))


def _namespace(app: Any) -> str:
    """The app's settings namespace with its underscore, e.g. ``CELERY_``."""
    namespace = getattr(app, "namespace", None) or ""
    return namespace.rstrip("_") + "_" if namespace else ""


def _user_values(app: Any) -> dict[str, Any]:
    """The ``outbox_*`` settings the user set, by option name.

    A key counts when ``app.conf`` itself would find it: ``outbox_<option>``
    or, under a namespace, ``<NAMESPACE>_OUTBOX_<OPTION>`` in the namespace's
    case. Mappings of defaults are skipped; the first mapping wins.
    """
    conf = app.conf
    conf.finalize()  # the first read loads the configuration
    namespace = _namespace(app)
    starts = [PREFIX]
    if namespace:
        starts.insert(0, match_case(namespace + PREFIX, namespace))
    names = set(OutboxConfig.option_names())
    found: dict[str, Any] = {}
    for mapping in conf.maps:
        if isinstance(mapping, _Defaults):
            continue
        for key in _keys(mapping):
            start = next((s for s in starts if key.startswith(s)), None)
            if start is None:
                continue
            option = key[len(start) :]
            if start != PREFIX:
                option = option.lower()
            if option not in names:
                raise _unknown(app, key, option, names)
            found.setdefault(option, mapping[key])
    return found


def _keys(mapping: Mapping[str, Any] | Any) -> list[str]:
    try:
        return [k for k in mapping if isinstance(k, str)]
    except TypeError:  # pragma: no cover - a mapping Celery would reject too
        return []


def _unknown(app: Any, key: str, option: str, names: set[str]) -> ConfigError:
    close = difflib.get_close_matches(option, sorted(names), n=1)
    hint = (
        f"did you mean {setting_name(app, close[0])!r}?"
        if close
        else "see the configuration reference in the README"
    )
    return ConfigError(key, f"is not an outbox setting; {hint}")


def config_from_app(app: Any, **overrides: Any) -> OutboxConfig:
    """Build the outbox configuration from ``app.conf`` and ``overrides``.

    Settings left unset, or set to None, take the defaults of
    :class:`OutboxConfig`; ``overrides`` (the keyword arguments given to
    :class:`~celery_outbox.Outbox`) win over the app's settings.

    Raises:
        ConfigError: a setting has an invalid value or names no option; the
            message names the setting as the user writes it
            (``outbox_batch_size: ...`` or ``CELERY_OUTBOX_BATCH_SIZE: ...``).
    """
    values = {k: v for k, v in _user_values(app).items() if v is not None}
    values.update(overrides)
    try:
        return OutboxConfig(**values)
    except ConfigError as exc:
        if exc.option in overrides:
            # A keyword of Outbox(...), misspelt ones included: OutboxConfig
            # names it as written, with the option meant.
            raise
        message = str(exc).split(": ", 1)[-1]
        raise ConfigError(setting_name(app, exc.option), message) from None
