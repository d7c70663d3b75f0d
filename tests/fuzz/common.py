"""What every fuzz target shares: the target record, a reader of structured fuzz bytes and
its writer (so hypothesis strategies and atheris mutate the same format), the corpus
folders, the known bugs, and hypothesis settings sized for CI.

A target is ``fn(data: bytes) -> None``: it feeds ``data`` to one parser of outside bytes
and asserts that parser's contract (what it returns, and which exceptions may leave it).
Any other exception, or a failed assertion, is a finding.
"""

from __future__ import annotations

import itertools
import os
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "fuzz_corpus"
"""One folder per target: seeds (``seed-*``) and past findings (``crash-*``), replayed by
tests/test_fuzz_corpus.py."""

EXAMPLES_ENV = "PERMITGATE_FUZZ_EXAMPLES"
"""Overrides every fuzz test's example count (scripts/fuzz.sh sets it for long runs)."""


@dataclass(frozen=True, slots=True)
class Target:
    """One fuzz target: a name (its corpus folder), the function, and the largest input
    worth trying (libFuzzer's ``-max_len``; hypothesis strategies stay below it too)."""

    name: str
    fn: Callable[[bytes], None]
    max_len: int
    doc: str
    seeds: Callable[[], list[bytes]] = field(default=lambda: [])
    """Valid inputs that start a corpus (``python -m tests.fuzz seed`` writes them)."""
    structured: Callable[[], st.SearchStrategy[bytes]] | None = None
    """Hypothesis inputs built from the parser's own structure (valid frames cut at random,
    JSON with wrong types), encoded in the bytes the target reads."""


@dataclass(frozen=True, slots=True)
class KnownBug:
    """A finding reported to the lead and not fixed yet: its corpus files are
    xfail(strict=True) cases, and long runs skip exceptions matching its signature so that
    they look further."""

    target: str
    files: tuple[str, ...]
    """Its corpus files, under tests/fuzz_corpus/<target>/."""
    reason: str
    """The bug, in one line (the xfail reason)."""
    exception: str
    """The type name of the exception it raises."""
    where: tuple[str, ...]
    """The functions it is raised in (the traceback's last frame)."""
    message: str = ""
    """Text the exception's message contains."""

    def matches(self, exc: BaseException) -> bool:
        """Whether ``exc`` is this bug (same type, raised in one of its functions)."""
        frames = traceback.extract_tb(exc.__traceback__)
        return (type(exc).__name__ == self.exception and bool(frames)
                and frames[-1].name in self.where and self.message in str(exc))


_SCB = ("drivers/osdp/frames.py parse_frame: a checked 7-byte packet whose CTRL sets CRC and "
        "SCB (53 00 07 00 0C + CRC) reads body[5] past its end: IndexError, in "
        "FrameScanner.feed and in bus._on_rx (the channel then fails the whole bus)")
_OVERFLOW = ("provisioning/receive.py Receiver.handle: an integer of a gateway message at or "
             "above 2**63 (event seq or ts_ms, applied seq/list_version/ts_ms, status "
             "versions; an event seq of 2**63-1 too, as seq+1 is looked up) raises "
             "OverflowError from SQLite out of handle: the serve loop acks the message "
             "unstored and backs off up to 30 s")
KNOWN_BUGS: list[KnownBug] = [
]
"""Findings not fixed yet. The lead fixes one, deletes its entry here, and its corpus
cases (xfail(strict=True) until then) become ordinary regression tests."""


def tolerant(target: Target) -> Callable[[bytes], None]:
    """``target.fn`` with the exceptions of known, unfixed bugs swallowed: fuzzing goes on
    past a bug that is reported already (its corpus case keeps it visible as an xfail)."""
    def run(data: bytes) -> None:
        try:
            target.fn(data)
        except Exception as exc:
            if any(bug.matches(exc) for bug in KNOWN_BUGS):
                return
            raise
    return run


def corpus_dir(target: str) -> Path:
    """The corpus folder of ``target``."""
    return CORPUS / target


def corpus_files(target: str) -> list[Path]:
    """Every corpus file of ``target``, by name."""
    folder = corpus_dir(target)
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def known_bug(target: str, file: str) -> KnownBug | None:
    """The open bug that corpus file ``file`` of ``target`` reproduces, if any."""
    for bug in KNOWN_BUGS:
        if bug.target == target and file in bug.files:
            return bug
    return None


def fuzz_settings(share: float = 1.0) -> settings:
    """Settings of one fuzz test: ``share`` of the active profile's example count
    (tests/conftest.py: 25 in "dev", 300 in "ci"; slow targets take a share below 1 to
    keep the CI cost of all fuzz tests under a minute), or ``PERMITGATE_FUZZ_EXAMPLES``
    when set (scripts/fuzz.sh). No deadline: hangs are bounded by input sizes and
    pytest-timeout, and a slow machine is not a finding."""
    override = os.environ.get(EXAMPLES_ENV)
    examples = int(override) if override else max(1, round(settings().max_examples * share))
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example,
                                           HealthCheck.filter_too_much])


# -- structured fuzz bytes ---------------------------------------------------------------


class Cursor:
    """Reads structured values from fuzz bytes; past the end it reads zeros and empty
    strings, so every byte string means something (atheris's FuzzedDataProvider idea,
    in plain Python so that both engines share it)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def remaining(self) -> int:
        """Bytes not read yet."""
        return len(self.data) - self.pos

    def byte(self) -> int:
        """One byte (0 past the end)."""
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        """Two bytes, big-endian."""
        return self.byte() << 8 | self.byte()

    def take(self, count: int) -> bytes:
        """Up to ``count`` bytes."""
        out = self.data[self.pos:self.pos + count]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        """Everything not read yet."""
        return self.take(self.remaining)

    def chunks(self) -> Iterator[bytes]:
        """Length-prefixed pieces (one length byte each) until the data ends."""
        while self.remaining:
            yield self.take(self.byte())

    def blobs(self) -> Iterator[bytes]:
        """Pieces with a two-byte length each, until the data ends."""
        while self.remaining:
            yield self.take(self.u16())


def pack_chunks(pieces: list[bytes]) -> bytes:
    """The bytes ``Cursor.chunks`` reads back as ``pieces`` (longer pieces are split)."""
    out = bytearray()
    for piece in pieces:
        rest = piece
        while len(rest) > 255:
            out += b"\xff" + rest[:255]
            rest = rest[255:]
        out += bytes([len(rest)]) + rest
    return bytes(out)


def pack_blob(piece: bytes) -> bytes:
    """One piece with a two-byte length, as ``Cursor.blobs`` reads it."""
    assert len(piece) < 1 << 16
    return len(piece).to_bytes(2, "big") + piece


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length, sorted)."""
    if not data:
        return [data]
    points = sorted({c % len(data) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]
