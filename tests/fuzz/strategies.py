"""Hypothesis strategies shared by the targets: arbitrary bytes, seeds with bytes edited
(what libFuzzer mostly does), JSON documents with fields replaced by values of the wrong
type or size, and valid byte streams cut where a UART might cut them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from tests.fuzz.common import Target, pack_chunks, split_at

BINARY_MAX = 512
"""Arbitrary bytes stay short: random bytes rarely get far into a parser, and short inputs
keep the CI run fast."""

JSON_ATOMS: st.SearchStrategy[Any] = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**53, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**300]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(["", "*", "gw-1", "front", "em4100:67003B51C6", "0" * 64, "A" * 43 + "=",
                     "\x00", "\u202e", "\uff46\uff52\uff4f\uff4e\uff54", "2027-12-31", "always"]),
)
"""JSON scalars of every type (a full-width "front" among them), with the boundary sizes
that matter to SQLite and to pydantic (``2**63`` does not fit an SQLite integer; ``2**53``
is the protocol's seq bound)."""

JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    JSON_ATOMS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                        st.dictionaries(st.text(max_size=8), inner,
                                                        max_size=4)),
    max_leaves=12)
"""Any JSON value, nested a little."""


@st.composite
def edited(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` with a few bytes flipped, inserted, deleted or duplicated."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        where = draw(st.integers(min_value=0, max_value=len(data)))
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "repeat"]))
        if action == "flip" and where < len(data):
            data[where] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif action == "set" and where < len(data):
            data[where] = draw(st.integers(min_value=0, max_value=255))
        elif action == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del data[where:where + draw(st.integers(min_value=1, max_value=8))]
        elif action == "repeat":
            data[where:where] = data[where:where + draw(st.integers(min_value=1, max_value=16))]
    return bytes(data)


def mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """A seed, whole or edited."""
    if not seeds:
        return st.binary(max_size=BINARY_MAX)
    return st.sampled_from(seeds).flatmap(lambda s: st.one_of(st.just(s), edited(s)))


def inputs(target: Target) -> st.SearchStrategy[bytes]:
    """What a target is fuzzed with: arbitrary bytes, edited seeds and, where the target
    has one, its structure-aware strategy (twice as often)."""
    parts: list[st.SearchStrategy[bytes]] = [
        st.binary(max_size=min(target.max_len, BINARY_MAX)), mutated(target.seeds())]
    if target.structured is not None:
        structured = target.structured()
        parts += [structured, structured]
    return st.one_of(parts).filter(lambda data: len(data) <= target.max_len)


# -- JSON with fields replaced ---------------------------------------------------------------


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``value`` (keys and list indexes)."""
    out = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            out += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            out += _paths(child, (*prefix, i))
    return out


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    copy = list(value)
    copy[head] = _replace(copy[head], rest, new)
    return copy


def _delete(value: Any, path: tuple[Any, ...]) -> Any:
    head, rest = path[0], path[1:]
    if not rest:
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if k != head}
        return [v for i, v in enumerate(value) if i != head]
    return _replace(value, (head,), _delete(value[head], rest))


BOUNDARY_INTS = st.sampled_from([0, -1, 1, 2**31, 2**53, 2**53 + 1, 2**63 - 2, 2**63 - 1,
                                  2**63, 2**64, -(2**63) - 1, 10**300])
"""Integers at the edges that matter: SQLite stores at most 2**63 - 1, and code that adds
one to a stored value fails one below it."""


def _like(value: Any) -> st.SearchStrategy[Any]:
    """A value of the same type as ``value`` (the wrong size or content), so that a
    mutation gets past the type check and reaches the code behind it."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.one_of(BOUNDARY_INTS, st.integers(min_value=value - 2, max_value=value + 2))
    if isinstance(value, float):
        return st.floats()
    if isinstance(value, str):
        return st.one_of(st.text(max_size=20), st.just(value * 2), st.just(value[:-1]),
                         st.just(value.upper()), st.just(value + "\x00"))
    if isinstance(value, list):
        return st.just(value * 2) if value else st.lists(JSON_ATOMS, max_size=2)
    return JSON_VALUES


@st.composite
def mutate_json(draw: st.DrawFn, template: Any, values: st.SearchStrategy[Any] = JSON_VALUES
                ) -> Any:
    """``template`` with up to three values replaced (same type but the wrong size, or
    any type), keys deleted or unknown keys added."""
    doc = template
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["like", "like", "replace", "delete", "add"]))
        if action == "like":
            doc = _replace(doc, path, draw(_like(_get(doc, path))))
        elif action == "replace":
            doc = _replace(doc, path, draw(values))
        elif action == "delete" and path:
            doc = _delete(doc, path)
        elif action == "add":
            parent = path if isinstance(_get(doc, path), dict) else path[:-1]
            if isinstance(_get(doc, parent), dict):
                key = draw(st.text(min_size=1, max_size=8))
                doc = _replace(doc, parent, {**_get(doc, parent), key: draw(values)})
    return doc


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        value = value[part]
    return value


# -- byte streams ------------------------------------------------------------------------------


@st.composite
def stream(draw: st.DrawFn, pieces: st.SearchStrategy[bytes], max_pieces: int = 6) -> bytes:
    """Frames (and noise) one after another, cut at random points into the pieces
    ``Cursor.chunks`` reads back (``pack_chunks``)."""
    data = b"".join(draw(st.lists(pieces, max_size=max_pieces)))
    cuts = draw(st.lists(st.integers(min_value=0, max_value=max(len(data), 1)), max_size=6))
    return pack_chunks(split_at(data, cuts))


def noise() -> st.SearchStrategy[bytes]:
    """Line noise between frames."""
    return st.binary(max_size=8)


def corrupt(frames: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A frame, often intact, sometimes edited or cut short."""
    return frames.flatmap(lambda f: st.one_of(
        st.just(f), st.just(f), edited(f),
        st.integers(min_value=0, max_value=len(f)).map(lambda n: f[:n])))


Structured = Callable[[], st.SearchStrategy[bytes]]
