r"""Reader line patterns: whether a pattern is safe to apply to every line a serial reader
sends (``line_pattern_problem``, which :mod:`agent.config` applies to every reader's
``options.pattern`` at load).

A serial reader applies its ``pattern`` to every line the device sends, on the card path.
Python's re backtracks: a pattern with a repeat inside a repeat, such as (a+)+, (a*)* or
(a|a)*, takes time exponential in the line length on a line that almost matches, and the
reader thread would hang there. The driver's max_line already bounds the line (128 bytes
by default, at most 4096), but 2**128 steps is no better than forever; bounding the length
only tames the polynomial cases (.*x.* is about n**2, 17 million steps at 4096 bytes, well
under a second in re's C engine). So the exponential shape is refused here, at load, with
the line of the pattern in the message.

The test is deliberately simple and errs on the strict side: a repeat that can run more
than once may not contain anything whose length varies (another variable repeat, an
optional part, an alternation). A character class says the same thing safely
((?:a|b)+ is [ab]+), and a possessive repeat or an atomic group, which never backtrack
into what they matched, is accepted: (?:\s*[0-9A-F]{2})++ or (?>...)+.

The pattern is read with Python's own regex parser (re._parser, the home of the former
sre_parse since 3.11; sre_parse itself warns on import) so that escapes, classes,
verbose mode and inline flags are read exactly as re.compile reads them.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

MAX_PATTERN_CHARS = 1000
"""The longest reader line pattern accepted."""

_RE_PARSER: Any = importlib.import_module("re._parser")
_UNBOUNDED: int = _RE_PARSER.MAXREPEAT


def _varies(items: Any) -> bool:
    """Whether a parsed (sub)pattern can match texts of different lengths in more than one
    way that backtracking could revisit."""
    stack: list[Any] = [items]
    while stack:
        for op, arg in stack.pop():
            if op in (_RE_PARSER.MAX_REPEAT, _RE_PARSER.MIN_REPEAT):
                low, high, body = arg
                if low != high:
                    return True
                stack.append(body)
            elif op is _RE_PARSER.BRANCH:
                return True
            elif op is _RE_PARSER.SUBPATTERN:
                stack.append(arg[3])
            elif op is _RE_PARSER.GROUPREF_EXISTS:
                return True
            # POSSESSIVE_REPEAT and ATOMIC_GROUP never give back what they matched;
            # lookarounds match no text; everything else is one character or none.
    return False


_CHILDREN: dict[Any, Callable[[Any], list[Any]]] = {
    _RE_PARSER.MAX_REPEAT: lambda arg: [arg[2]],
    _RE_PARSER.MIN_REPEAT: lambda arg: [arg[2]],
    _RE_PARSER.POSSESSIVE_REPEAT: lambda arg: [arg[2]],
    _RE_PARSER.SUBPATTERN: lambda arg: [arg[3]],
    _RE_PARSER.BRANCH: lambda arg: list(arg[1]),
    _RE_PARSER.ATOMIC_GROUP: lambda arg: [arg],
    _RE_PARSER.ASSERT: lambda arg: [arg[1]],
    _RE_PARSER.ASSERT_NOT: lambda arg: [arg[1]],
    _RE_PARSER.GROUPREF_EXISTS: lambda arg: [part for part in arg[1:] if part is not None],
}
"""The parsed subpatterns directly inside one parsed item, by its opcode."""


def line_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is unsafe to apply to device input, or None when it is fine.

    Refuses patterns that do not compile, longer than ``MAX_PATTERN_CHARS``, and repeats
    nested in repeats (see the module's docstring).
    """
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"longer than {MAX_PATTERN_CHARS} characters"
    try:
        re.compile(pattern)
        stack: list[Any] = [_RE_PARSER.parse(pattern)]
        while stack:
            for op, arg in stack.pop():
                if (op in (_RE_PARSER.MAX_REPEAT, _RE_PARSER.MIN_REPEAT)
                        and (arg[1] == _UNBOUNDED or arg[1] > 1) and _varies(arg[2])):
                    return ("a repeated group holds another repeat, an optional part or an "
                            "alternation (as in (a+)+, (a*)* or (a|b)*): on a line that "
                            "almost matches it backtracks for a time exponential in the "
                            "line's length. Use a character class ([ab]+) or a possessive "
                            "repeat ((...)++)")
                stack.extend(_CHILDREN.get(op, lambda _arg: [])(arg))
    except re.error as exc:
        return f"not a valid regular expression: {exc}"
    except RecursionError:
        return "groups nested too deeply"
    return None
