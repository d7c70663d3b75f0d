"""The documentation agrees with the code it describes: every configuration key has its
row in docs/configuration.md, and every module the architecture's table names exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from agent import config as config_models

ROOT = Path(__file__).resolve().parent.parent
SECTIONS: dict[str, type[BaseModel]] = {
    "## `[site]`": config_models.SiteConfig,
    "## `[store]`": config_models.StoreConfig,
    "## `[keys]`": config_models.KeysConfig,
    "## `[policy]`": config_models.PolicyConfig,
    "### `[policy.schedules.NAME]`": config_models.WeeklySchedule,
    "## `[sync]`": config_models.SyncConfig,
    "## `[logging]`": config_models.LoggingConfig,
    "## `[enrollment]`": config_models.EnrollmentConfig,
    "## `[web]`": config_models.WebConfig,
    "## `[[doors]]`": config_models.DoorConfig,
    "## `[[readers]]`": config_models.ReaderConfig,
}


def first_table(text: str, heading: str) -> list[str]:
    """The rows of the first table under ``heading`` (before the next heading)."""
    assert heading in text, f"docs/configuration.md has no section {heading}"
    body = re.split(r"\n#{2,3} ", text.split(heading, 1)[1], maxsplit=1)[0]
    rows: list[str] = []
    for line in body.splitlines():
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return rows


@pytest.mark.parametrize("heading", list(SECTIONS))
def test_every_configuration_key_has_a_row(heading: str) -> None:
    """Each key of a configuration section (agent/config.py) has a row in that section's
    table in docs/configuration.md, and the table names no key the code lacks."""
    documented = set()
    for line in first_table((ROOT / "docs" / "configuration.md").read_text(), heading):
        if line.startswith("| `"):
            documented.update(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    assert documented == set(SECTIONS[heading].model_fields)


def test_top_level_sections_are_all_documented() -> None:
    """Every table of the configuration file has a section in docs/configuration.md."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    for name in config_models.Config.model_fields:
        assert f"`[{name}]`" in text or f"`[[{name}]]`" in text, name


def test_architecture_module_table_names_existing_files() -> None:
    """Every file or package the architecture's module tables name exists, and every
    Python module of the agent, protocol and common packages is named there."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = [line.split("|")[1] for line in text.splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`([a-z_/]+(?:\.py|/))`", row)}
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, missing
    unnamed = [f"{package}/{module.name}" for package in ("agent", "protocol", "common")
               for module in sorted((ROOT / package).glob("*.py"))
               if module.name != "__init__.py" and f"{package}/{module.name}" not in named]
    assert not unnamed, unnamed
