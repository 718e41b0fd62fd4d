"""The README's configuration reference matches OutboxConfig."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from celery_outbox import OutboxConfig

README = Path(__file__).resolve().parent.parent / "README.md"


def documented_options() -> dict[str, str]:
    """Option name -> default, from the README's configuration table."""
    text = README.read_text()
    section = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| `([^`]*)` \|", section, flags=re.M)
    return dict(rows)


def as_documented(value: Any) -> str:
    """A default as the README writes it: JSON, with None for null."""
    value = getattr(value, "value", value)
    return "None" if value is None else json.dumps(value)


def test_every_option_is_documented_with_its_default() -> None:
    """Each OutboxConfig option has a README row with the right default."""
    defaults = OutboxConfig()
    expected = {
        name: as_documented(getattr(defaults, name))
        for name in OutboxConfig.option_names()
    }
    assert documented_options() == expected


def test_readme_opens_with_the_two_commands() -> None:
    """The README's first code block installs and runs the demo, then the tests."""
    block = README.read_text().split("```bash", 1)[1].split("```", 1)[0]
    commands = [
        line for line in block.splitlines() if line and not line.startswith("#")
    ]
    assert commands == [
        "python3 -m venv .venv && .venv/bin/pip install -e '.[embedded,redis]' "
        "&& .venv/bin/celery-outbox demo",
        "bash .ci/run",
    ]
