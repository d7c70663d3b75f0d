"""QR codes for the terminal: a short text (byte mode, error correction level M, versions 1
to 10, up to 213 bytes) as a matrix of modules, and that matrix drawn with half-block
characters, two module rows to a line.

``permitgate provision`` shows its fingerprint this way, so that the office can scan it
from the gateway's screen instead of reading it out (ISO/IEC 18004; the same text a
serial QR scanner sends as a line, ``drivers/qr.py``). Everything the standard fixes is
here: finder, timing and alignment patterns, Reed-Solomon error correction in GF(256)
with its blocks interleaved, the eight masks scored by the four penalty rules, format and
version information.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

QUIET = 4
"""Light modules around the symbol, as the standard asks."""

# Per version 1..10 at level M: error correction codewords per block, and blocks.
_ECC_PER_BLOCK = (10, 16, 26, 18, 24, 16, 18, 22, 22, 26)
_BLOCKS = (1, 1, 1, 2, 2, 4, 4, 4, 5, 5)
_FORMAT_LEVEL_M = 0b00
MAX_VERSION = len(_BLOCKS)

Matrix = list[list[bool]]
"""Rows of modules, True for dark."""


class QrError(ValueError):
    """The text does not fit in a version-10 symbol."""


# -- GF(256) and Reed-Solomon ---------------------------------------------------------


def _gf_mul(x: int, y: int) -> int:
    """Multiplication in GF(2^8) modulo x^8 + x^4 + x^3 + x^2 + 1."""
    z = 0
    for i in range(7, -1, -1):
        z = (z << 1) ^ ((z >> 7) * 0x11D)
        z ^= ((y >> i) & 1) * x
    return z


def _rs_divisor(degree: int) -> list[int]:
    """The generator polynomial's coefficients, highest power first, leading 1 dropped."""
    result = [0] * (degree - 1) + [1]
    root = 1
    for _ in range(degree):
        for j in range(degree):
            result[j] = _gf_mul(result[j], root)
            if j + 1 < degree:
                result[j] ^= result[j + 1]
        root = _gf_mul(root, 0x02)
    return result


def _rs_remainder(data: Sequence[int], divisor: Sequence[int]) -> list[int]:
    result = [0] * len(divisor)
    for byte in data:
        factor = byte ^ result.pop(0)
        result.append(0)
        for i, coefficient in enumerate(divisor):
            result[i] ^= _gf_mul(coefficient, factor)
    return result


# -- sizes ------------------------------------------------------------------------------


def _size(version: int) -> int:
    return version * 4 + 17


def _alignment_positions(version: int) -> list[int]:
    if version == 1:
        return []
    count = version // 7 + 2
    step = (version * 8 + count * 3 + 5) // (count * 4 - 4) * 2
    size = _size(version)
    return [6, *sorted(size - 7 - i * step for i in range(count - 1))]


def _raw_modules(version: int) -> int:
    """Modules left for data and error correction once the function patterns are drawn."""
    result = (16 * version + 128) * version + 64
    if version >= 2:
        count = version // 7 + 2
        result -= (25 * count - 10) * count - 55
        if version >= 7:
            result -= 36
    return result


def _data_codewords(version: int) -> int:
    blocks = _BLOCKS[version - 1]
    return _raw_modules(version) // 8 - _ECC_PER_BLOCK[version - 1] * blocks


def capacity(version: int) -> int:
    """Bytes of text a symbol of ``version`` holds at level M."""
    count_bits = 8 if version < 10 else 16
    return (_data_codewords(version) * 8 - 4 - count_bits) // 8


# -- the codewords ---------------------------------------------------------------------


def _codewords(data: bytes, version: int) -> list[int]:
    """Mode, count, data, terminator and padding, then each block's error correction,
    interleaved as the symbol carries them."""
    count_bits = 8 if version < 10 else 16
    bits: list[int] = []

    def put(value: int, length: int) -> None:
        bits.extend((value >> i) & 1 for i in range(length - 1, -1, -1))

    put(0b0100, 4)  # byte mode
    put(len(data), count_bits)
    for byte in data:
        put(byte, 8)
    room = _data_codewords(version) * 8
    put(0, min(4, room - len(bits)))
    put(0, -len(bits) % 8)
    words = [int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8)]
    pad = 0xEC
    while len(words) < _data_codewords(version):
        words.append(pad)
        pad ^= 0xEC ^ 0x11
    blocks_count = _BLOCKS[version - 1]
    ecc_len = _ECC_PER_BLOCK[version - 1]
    raw = _raw_modules(version) // 8
    short_count = blocks_count - raw % blocks_count
    short_len = raw // blocks_count
    divisor = _rs_divisor(ecc_len)
    blocks: list[list[int]] = []
    start = 0
    for i in range(blocks_count):
        length = short_len - ecc_len + (0 if i < short_count else 1)
        block = words[start:start + length]
        start += length
        ecc = _rs_remainder(block, divisor)
        if i < short_count:
            block.append(0)  # a place holder, skipped below, so all blocks align
        blocks.append(block + ecc)
    result = []
    for i in range(len(blocks[0])):
        for j, block in enumerate(blocks):
            if i != short_len - ecc_len or j >= short_count:
                result.append(block[i])
    return result


# -- the symbol -------------------------------------------------------------------------


class _Symbol:
    def __init__(self, version: int) -> None:
        self.version = version
        self.size = _size(version)
        self.modules: Matrix = [[False] * self.size for _ in range(self.size)]
        self.function = [[False] * self.size for _ in range(self.size)]

    def set_function(self, x: int, y: int, dark: bool) -> None:
        self.modules[y][x] = dark
        self.function[y][x] = True

    def draw_function_patterns(self) -> None:
        size = self.size
        for i in range(size):
            self.set_function(6, i, i % 2 == 0)
            self.set_function(i, 6, i % 2 == 0)
        for cx, cy in ((3, 3), (size - 4, 3), (3, size - 4)):
            for dy in range(-4, 5):
                for dx in range(-4, 5):
                    x, y = cx + dx, cy + dy
                    if 0 <= x < size and 0 <= y < size:
                        self.set_function(x, y, max(abs(dx), abs(dy)) not in (2, 4))
        positions = _alignment_positions(self.version)
        last = len(positions) - 1
        for i, cx in enumerate(positions):
            for j, cy in enumerate(positions):
                if (i, j) in ((0, 0), (0, last), (last, 0)):
                    continue  # under a finder pattern
                for dy in range(-2, 3):
                    for dx in range(-2, 3):
                        self.set_function(cx + dx, cy + dy, max(abs(dx), abs(dy)) != 1)
        self.draw_format(0)
        if self.version >= 7:
            self.draw_version()

    def draw_version(self) -> None:
        remainder = self.version
        for _ in range(12):
            remainder = (remainder << 1) ^ ((remainder >> 11) * 0x1F25)
        bits = self.version << 12 | remainder
        for i in range(18):
            dark = (bits >> i) & 1 == 1
            a, b = self.size - 11 + i % 3, i // 3
            self.set_function(a, b, dark)
            self.set_function(b, a, dark)

    def draw_format(self, mask: int) -> None:
        data = _FORMAT_LEVEL_M << 3 | mask
        remainder = data
        for _ in range(10):
            remainder = (remainder << 1) ^ ((remainder >> 9) * 0x537)
        bits = (data << 10 | remainder) ^ 0x5412

        def bit(i: int) -> bool:
            return (bits >> i) & 1 == 1

        size = self.size
        for i in range(6):
            self.set_function(8, i, bit(i))
        self.set_function(8, 7, bit(6))
        self.set_function(8, 8, bit(7))
        self.set_function(7, 8, bit(8))
        for i in range(9, 15):
            self.set_function(14 - i, 8, bit(i))
        for i in range(8):
            self.set_function(size - 1 - i, 8, bit(i))
        for i in range(8, 15):
            self.set_function(8, size - 15 + i, bit(i))
        self.set_function(8, size - 8, True)  # the dark module

    def draw_codewords(self, words: Sequence[int]) -> None:
        size = self.size
        i = 0
        right = size - 1
        while right >= 1:
            if right == 6:
                right = 5  # the vertical timing pattern
            upward = (right + 1) & 2 == 0
            for vertical in range(size):
                y = size - 1 - vertical if upward else vertical
                for x in (right, right - 1):
                    if not self.function[y][x] and i < len(words) * 8:
                        self.modules[y][x] = (words[i >> 3] >> (7 - (i & 7))) & 1 == 1
                        i += 1
            right -= 2

    def apply_mask(self, mask: int) -> None:
        for y in range(self.size):
            for x in range(self.size):
                if not self.function[y][x] and _MASKS[mask](x, y):
                    self.modules[y][x] = not self.modules[y][x]


_MASKS = (
    lambda x, y: (x + y) % 2 == 0,
    lambda x, y: y % 2 == 0,
    lambda x, y: x % 3 == 0,
    lambda x, y: (x + y) % 3 == 0,
    lambda x, y: (x // 3 + y // 2) % 2 == 0,
    lambda x, y: x * y % 2 + x * y % 3 == 0,
    lambda x, y: (x * y % 2 + x * y % 3) % 2 == 0,
    lambda x, y: ((x + y) % 2 + x * y % 3) % 2 == 0,
)

_FINDER_LIKE = ("10111010000", "00001011101")


def penalty(modules: Matrix) -> int:
    """The standard's score of a masked symbol (lower reads better): runs of five or more,
    2x2 blocks, finder-like patterns, and the balance of dark and light."""
    size = len(modules)
    score = 0
    lines = ["".join("1" if m else "0" for m in row) for row in modules]
    lines += ["".join("1" if modules[y][x] else "0" for y in range(size))
              for x in range(size)]
    for line in lines:
        for _colour, run in itertools.groupby(line):
            length = len(list(run))
            if length >= 5:
                score += length - 2
        padded = "0000" + line + "0000"
        for pattern in _FINDER_LIKE:
            start = padded.find(pattern)
            while start != -1:
                score += 40
                start = padded.find(pattern, start + 1)
    for y in range(size - 1):
        for x in range(size - 1):
            if modules[y][x] == modules[y][x + 1] == modules[y + 1][x] == modules[y + 1][x + 1]:
                score += 3
    dark = sum(row.count(True) for row in modules)
    total = size * size
    score += ((abs(dark * 20 - total * 10) + total - 1) // total - 1) * 10
    return score


def encode(text: str, *, mask: int | None = None) -> Matrix:
    """The smallest level-M symbol holding ``text`` (UTF-8), with the mask of the lowest
    penalty (or ``mask``, 0 to 7)."""
    data = text.encode("utf-8")
    version = next((v for v in range(1, MAX_VERSION + 1) if len(data) <= capacity(v)), None)
    if version is None:
        raise QrError(f"{len(data)} bytes do not fit in a QR code of version {MAX_VERSION} "
                      f"(at most {capacity(MAX_VERSION)})")
    words = _codewords(data, version)
    best: tuple[int, Matrix] | None = None
    for candidate in range(len(_MASKS)) if mask is None else (mask,):
        symbol = _Symbol(version)
        symbol.draw_function_patterns()
        symbol.draw_codewords(words)
        symbol.apply_mask(candidate)
        symbol.draw_format(candidate)
        score = penalty(symbol.modules)
        if best is None or score < best[0]:
            best = (score, symbol.modules)
    assert best is not None
    return best[1]


_HALF_BLOCKS = {(False, False): " ", (True, False): "\u2580", (False, True): "\u2584",
                (True, True): "\u2588"}
_ANSI_ON = "\x1b[30;47m"
"""Black on white, so the symbol reads the same on a dark terminal."""
_ANSI_OFF = "\x1b[0m"


def render(modules: Matrix, *, ansi: bool = False) -> str:
    """The symbol with its quiet zone as lines of half blocks (the ink is dark). With
    ``ansi``, each line is set black on white for terminals with a dark background."""
    size = len(modules)
    width = size + 2 * QUIET
    padded = ([[False] * width for _ in range(QUIET)]
              + [[False] * QUIET + list(row) + [False] * QUIET for row in modules]
              + [[False] * width for _ in range(QUIET + 1)])  # +1: an even number of rows
    lines = []
    for y in range(0, size + 2 * QUIET, 2):
        line = "".join(_HALF_BLOCKS[(padded[y][x], padded[y + 1][x])] for x in range(width))
        lines.append(f"{_ANSI_ON}{line}{_ANSI_OFF}" if ansi else line)
    return "\n".join(lines) + "\n"
