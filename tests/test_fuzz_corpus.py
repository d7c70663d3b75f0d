"""The fuzz corpus as regression cases: every file under tests/fuzz_corpus/<target>/ (seeds
and past findings) is replayed through its target.

A finding reported but not fixed yet is listed in tests/fuzz/common.py ``KNOWN_BUGS`` and
runs here as xfail(strict=True) naming the bug: once the lead fixes it, the case passes,
strict xfail fails the suite, and deleting the KnownBug entry makes it an ordinary test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fuzz import TARGETS
from tests.fuzz.common import CORPUS, KNOWN_BUGS, REPO, corpus_files, known_bug


def _cases() -> list[object]:
    cases: list[object] = []
    for name in sorted(TARGETS):
        for path in corpus_files(name):
            bug = known_bug(name, path.name)
            marks = [pytest.mark.xfail(strict=True, reason=bug.reason)] if bug else []
            cases.append(pytest.param(name, path, marks=marks, id=f"{name}/{path.name}"))
    return cases


@pytest.mark.parametrize(("target", "path"), _cases())
def test_corpus_input_passes_its_target(target: str, path: Path) -> None:
    """A corpus input (a seed or a past finding) passes its target's contract."""
    TARGETS[target].fn(path.read_bytes())


def test_every_target_has_a_seeded_corpus() -> None:
    """Every target has a corpus folder with seeds in it (``python -m tests.fuzz seed``
    writes them), and there is no folder without a target."""
    assert {p.name for p in CORPUS.iterdir() if p.is_dir()} == set(TARGETS)
    for name in TARGETS:
        assert any(p.name.startswith("seed-") for p in corpus_files(name)), name


def test_every_known_bug_has_its_corpus_files() -> None:
    """Each known bug names a target and corpus files that exist, so its xfail runs."""
    for bug in KNOWN_BUGS:
        assert bug.target in TARGETS, bug
        for file in bug.files:
            assert (CORPUS / bug.target / file).is_file(), (bug.target, file)


def test_the_fuzz_script_stops_by_itself() -> None:
    """``scripts/fuzz.sh TARGET SECONDS`` with the hypothesis engine fuzzes for about that
    long, stops on its own and exits 0 when it finds nothing."""
    started = time.monotonic()
    done = subprocess.run(
        [str(REPO / "scripts" / "fuzz.sh"), "em4100", "2"], cwd=REPO, capture_output=True,
        text=True, timeout=90, check=False,
        env={**os.environ, "FUZZ_ENGINE": "hypothesis", "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "em4100: nothing found" in done.stdout, done.stdout
    assert time.monotonic() - started < 60
