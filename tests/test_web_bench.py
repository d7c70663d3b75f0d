"""bench/web.py runs at smoke size and keeps its JSON contract (figures are not asserted:
benchmarks report, tests do not time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_web_benchmark_quick_prints_its_figures() -> None:
    """``bench/web.py --quick`` ends with one JSON object holding every figure it
    documents, and the tenant page it measured showed every tenant."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "web.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("page_p95_ms", "page_p50_ms", "tap_to_page_ms", "tap_to_page_max_ms",
                "login_ms", "web_rss_mb", "web_peak_rss_mb"):
        assert isinstance(figures[key], int | float) and figures[key] > 0, key
    assert figures["tenants_shown"] == figures["tenants"]
