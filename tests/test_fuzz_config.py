"""Fuzz test of the configuration loader (tests/fuzz/config.py): any file loads to a
configuration whose drivers' options validate and that can be set up, or is refused with
ConfigError or DriverError naming the file or key."""

from __future__ import annotations

from hypothesis import given

from agent.config import load_config
from agent.runtime import check_drivers
from tests.fuzz import TARGETS
from tests.fuzz.common import fuzz_settings, tolerant
from tests.fuzz.config import RICH, SOURCE, toml_document
from tests.fuzz.strategies import inputs


def test_the_rich_document_is_valid_and_names_every_driver() -> None:
    """The document the structure-aware strategy mutates loads, its drivers' options
    validate, and it uses every reader driver, so mutations reach each options model."""
    SOURCE.write_text(toml_document(RICH), "utf-8")
    config = load_config(SOURCE)
    check_drivers(config)
    assert {r.driver for r in config.readers} == {"serial", "pn532", "idcard", "qr",
                                                  "wiegand", "osdp", "pcsc"}


@fuzz_settings(0.5)
@given(inputs(TARGETS["config"]))
def test_any_file_loads_or_is_refused_naming_the_file(data: bytes) -> None:
    """Any file, and valid documents with values of the wrong type or size, load to a
    usable configuration or raise ConfigError or DriverError, nothing else."""
    tolerant(TARGETS["config"])(data)
