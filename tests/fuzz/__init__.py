"""Fuzz targets for every parser of outside bytes (docs/fuzzing.md).

``TARGETS`` maps a target's name (its folder under tests/fuzz_corpus/) to the target. The
targets run three ways: a profile's worth of hypothesis examples each in the test suite
(tests/test_fuzz_*.py), every corpus file replayed as a regression case
(tests/test_fuzz_corpus.py), and for minutes under atheris or hypothesis through
``scripts/fuzz.sh`` (``python -m tests.fuzz``).

The target modules are imported on first use of ``TARGETS``, not with the package, so
that ``python -m tests.fuzz`` can import them (and the project modules they import) under
atheris's instrumentation of the project's packages only.
"""

from __future__ import annotations

import importlib

from tests.fuzz.common import Target

FAMILIES = ("readers", "osdp", "control", "config", "protocol", "sync", "office")
"""One module per family of parsers."""
_loaded: dict[str, Target] = {}


def targets() -> dict[str, Target]:
    """Every fuzz target, by name (the family modules are imported the first time)."""
    if not _loaded:
        for family in FAMILIES:
            module = importlib.import_module(f"tests.fuzz.{family}")
            _loaded.update((t.name, t) for t in module.TARGETS)
    return _loaded


def __getattr__(name: str) -> dict[str, Target]:
    if name == "TARGETS":
        return targets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
