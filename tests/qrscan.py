"""Reading QR codes back as a scanner would: a matrix (or the half-block text
``agent.qrcode.render`` prints) drawn into a bitmap and decoded by zbarimg (Debian's
zbar-tools, installed by scripts/bootstrap.sh dev), a decoder written apart from the
encoder under test.

Not a test module: tests/test_qrcode.py and tests/test_provision.py use it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agent.qrcode import Matrix

_HALF_BLOCKS = {" ": (False, False), "\u2580": (True, False), "\u2584": (False, True),
                "\u2588": (True, True)}


def zbarimg() -> str:
    """The zbarimg executable; fails the test (never skips) when it is not installed."""
    found = shutil.which("zbarimg")
    if found is None:
        pytest.fail("zbarimg is not installed; the QR tests need a real decoder: "
                    "apt-get install zbar-tools, or run scripts/bootstrap.sh dev as root",
                    pytrace=False)
    return found


def matrix_from_text(text: str) -> Matrix:
    """The modules drawn by half-block ``text`` (quiet zone included, ANSI colours
    dropped): two rows per line."""
    rows: Matrix = []
    for line in text.replace("\x1b[30;47m", "").replace("\x1b[0m", "").splitlines():
        if not line or any(c not in _HALF_BLOCKS for c in line):
            continue
        cells = [_HALF_BLOCKS[c] for c in line]
        rows.append([top for top, _ in cells])
        rows.append([bottom for _, bottom in cells])
    return rows


def decode(modules: Matrix, folder: Path, *, quiet: int = 4, scale: int = 4) -> str:
    """The text zbarimg reads from ``modules`` drawn as a bitmap with a light border of
    ``quiet`` modules, ``scale`` pixels a module."""
    width = len(modules[0]) + 2 * quiet
    height = len(modules) + 2 * quiet
    lines = []
    for y in range(-quiet, height - quiet):
        row = []
        for x in range(-quiet, width - quiet):
            dark = 0 <= y < len(modules) and 0 <= x < len(modules[0]) and modules[y][x]
            row.extend(["1" if dark else "0"] * scale)
        lines.extend([" ".join(row)] * scale)
    image = folder / "qr.pbm"
    image.write_text(f"P1\n{width * scale} {height * scale}\n" + "\n".join(lines) + "\n")
    done = subprocess.run([zbarimg(), "--quiet", "--raw", "-Sbinary", str(image)],
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, f"zbarimg read no code: {done.stderr.decode(errors='replace')}"
    return done.stdout.decode("utf-8").removesuffix("\n")
