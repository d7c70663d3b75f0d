"""The terminal QR code (agent/qrcode.py), read back by zbarimg (tests/qrscan.py): every
version the encoder makes, the text as UTF-8 bytes, and the half-block drawing."""

from __future__ import annotations

import string
from pathlib import Path

import pytest

from agent import qrcode
from tests.qrscan import decode, matrix_from_text

CAPACITIES = (14, 26, 42, 62, 84, 106, 122, 152, 180, 213)
"""Bytes per version 1 to 10 at level M (ISO/IEC 18004, Table 7)."""


def test_capacities_are_the_standards() -> None:
    """Each version holds as many bytes at level M as the standard's table says."""
    assert tuple(qrcode.capacity(v) for v in range(1, qrcode.MAX_VERSION + 1)) == CAPACITIES


@pytest.mark.parametrize("version", range(1, qrcode.MAX_VERSION + 1))
def test_a_full_symbol_of_every_version_reads_back(version: int, tmp_path: Path) -> None:
    """A text filling each version exactly is encoded in that version (4v + 17 modules a
    side) and a decoder reads the same text back."""
    alphabet = string.ascii_letters + string.digits + ":-/"
    text = "".join(alphabet[(i * 7 + version) % len(alphabet)]
                   for i in range(CAPACITIES[version - 1]))
    matrix = qrcode.encode(text)
    assert len(matrix) == len(matrix[0]) == 4 * version + 17
    assert decode(matrix, tmp_path) == text


def test_one_byte_more_takes_the_next_version(tmp_path: Path) -> None:
    """A text one byte longer than a version holds moves to the next version, and reads
    back."""
    text = "x" * (CAPACITIES[3] + 1)
    matrix = qrcode.encode(text)
    assert len(matrix) == 4 * 5 + 17
    assert decode(matrix, tmp_path) == text


def test_text_is_encoded_as_utf8(tmp_path: Path) -> None:
    """Characters beyond ASCII travel as their UTF-8 bytes."""
    text = "居住证 permitgate:gw-0001"
    assert decode(qrcode.encode(text), tmp_path) == text


def test_too_long_a_text_is_refused() -> None:
    """A text over a version 10 symbol's capacity raises QrError naming the limit."""
    with pytest.raises(qrcode.QrError, match="213"):
        qrcode.encode("x" * 214)


@pytest.mark.parametrize("ansi", [False, True])
def test_the_half_block_drawing_is_the_symbol_with_its_quiet_zone(
        ansi: bool, tmp_path: Path) -> None:
    """The printed lines hold the matrix surrounded by four light modules (an extra light
    row making the count even), two rows a line, and read back as drawn; with ANSI
    colours every line is set black on white."""
    text = "permitgate:gw-0001:ABCDE-FGHJK-MNPQR-STVWX-YZ012"
    matrix = qrcode.encode(text)
    printed = qrcode.render(matrix, ansi=ansi)
    drawn = matrix_from_text(printed)
    side = len(matrix)
    assert [row[4:4 + side] for row in drawn[4:4 + side]] == matrix
    assert not any(any(row) for row in drawn[:4] + drawn[4 + side:])
    assert not any(any(row[:4] + row[4 + side:]) for row in drawn)
    assert decode(drawn, tmp_path, quiet=0) == text
    lines = printed.splitlines()
    assert len(lines) == (side + 9) // 2
    assert all(line.startswith("\x1b[30;47m") == ansi for line in lines)


def test_the_chosen_mask_scores_lowest(tmp_path: Path) -> None:
    """Of the eight masks, each of which reads back, the symbol made is one with the lowest
    penalty."""
    text = "permitgate:gw-0001:ABCDE-FGHJK-MNPQR-STVWX-YZ012"
    masked = [qrcode.encode(text, mask=mask) for mask in range(8)]
    assert all(decode(matrix, tmp_path) == text for matrix in masked)
    assert len({str(matrix) for matrix in masked}) == 8
    assert qrcode.penalty(qrcode.encode(text)) == min(map(qrcode.penalty, masked))
