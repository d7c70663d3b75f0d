"""The benchmarks run (at smoke size) and print their figures as one JSON object.

Figures are not judged here (benchmarks measure, tests don't time): these tests keep the
benchmark programs working and their output contract intact.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize(("script", "keys"), [
    ("decision.py", {"entries", "decisions", "p50_ms", "p99_ms", "rss_mb", "apply_s"}),
    ("revocation.py", {"p50_ms", "p99_ms", "during_snapshot_p99_ms", "snapshot_applied_s"}),
    ("backlog.py", {"events", "events_per_s", "max_decision_ms"}),
    ("snapshot.py", {"entries", "seconds"}),
    ("office_ingest.py", {"gateways", "events", "events_per_s", "lost", "duplicates_stored"}),
    ("load.py", {"taps", "p99_ms", "max_decision_ms", "rss_start_mb", "rss_peak_mb",
                 "rss_end_mb"}),
    ("reconcile.py", {"seconds", "rss_mb", "findings", "planted"}),
])
def test_benchmark_prints_its_figures_as_json(script: str, keys: set[str]) -> None:
    """``python bench/<script> --quick`` exits 0 and its last line is a JSON object with
    the figures the benchmark promises, each a number."""
    result = subprocess.run([sys.executable, str(BENCH / script), "--quick"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert keys <= figures.keys()
    assert all(isinstance(figures[k], int | float) for k in keys)
