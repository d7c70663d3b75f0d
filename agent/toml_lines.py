"""Where keys are written in TOML text: the line of every table header and key, by the
path pydantic reports, for the line numbers in :mod:`agent.config`'s error messages.
"""

from __future__ import annotations

import functools
import re

_BARE_OR_QUOTED = r"""[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*'"""
_KEY_PART = re.compile(_BARE_OR_QUOTED)
_KEY_LINE = re.compile(rf"^\s*((?:{_BARE_OR_QUOTED})(?:\s*\.\s*(?:{_BARE_OR_QUOTED}))*)\s*=")
_TABLE_LINE = re.compile(r"^\s*(\[\[?)\s*(.*?)\s*\]\]?\s*(?:#.*)?$")


def _key_parts(dotted: str) -> tuple[str, ...]:
    """The parts of a dotted TOML key, quotes removed (escapes are kept as written)."""
    return tuple(m.group(0)[1:-1] if m.group(0)[0] in "\"'" else m.group(0)
                 for m in _KEY_PART.finditer(dotted))


def _scan_value(text: str, depth: int, quote: str | None) -> tuple[int, str | None]:
    """Bracket depth and open multi-line string after ``text``, a piece of a TOML value."""
    i = 0
    while i < len(text):
        if quote is not None:
            end = text.find(quote, i)
            if end < 0:
                return depth, quote
            i, quote = end + 3, None
            continue
        char = text[i]
        if char == "#":
            break
        if text.startswith(('"""', "'''"), i):
            quote, i = text[i:i + 3], i + 3
            continue
        if char in "\"'":
            j = i + 1
            while j < len(text) and text[j] != char:
                j += 2 if char == '"' and text[j] == "\\" else 1
            i = j + 1
            continue
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        i += 1
    return depth, quote


@functools.lru_cache(maxsize=4)
def key_lines(text: str) -> dict[tuple[int | str, ...], int]:
    """Line (1-based) of every table header and key in valid TOML ``text``, by the path
    pydantic reports: array-of-tables entries get their index (``("doors", 1, "id")``).
    Cached (callers only read the result): a file with a thousand problems is scanned once,
    not once per problem (10 s for 1,000 unknown keys before; found by fuzzing)."""
    lines: dict[tuple[int | str, ...], int] = {}
    arrays: dict[tuple[int | str, ...], int] = {}
    table: tuple[int | str, ...] = ()
    depth, quote = 0, None

    def resolve(parts: tuple[str, ...]) -> tuple[int | str, ...]:
        path: tuple[int | str, ...] = ()
        for part in parts:
            path += (part,)
            if path in arrays:
                path += (arrays[path],)
        return path

    # Lines are counted on "\n" only, as tomllib counts them (str.splitlines would also
    # split on form feeds and U+2028 inside strings and shift every later number).
    for number, line in enumerate(text.split("\n"), start=1):
        if quote is not None or depth > 0:
            depth, quote = _scan_value(line, depth, quote)
            continue
        header = _TABLE_LINE.match(line)
        if header is not None:
            parts = _key_parts(header.group(2))
            if header.group(1) == "[[":
                array = resolve(parts[:-1]) + parts[-1:]
                arrays[array] = arrays.get(array, -1) + 1
                lines.setdefault(array, number)
            table = resolve(parts)
            # [policy.schedules.night] also stands for policy and policy.schedules when
            # those have no header of their own (a problem with the whole schedules table).
            for n in range(1, len(table) + 1):
                lines.setdefault(table[:n], number)
            continue
        key = _KEY_LINE.match(line)
        if key is None:
            continue
        parts = _key_parts(key.group(1))
        for n in range(1, len(parts) + 1):
            lines.setdefault(table + parts[:n], number)
        depth, quote = _scan_value(line[key.end():], 0, None)
    return lines
