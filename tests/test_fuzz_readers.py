"""Fuzz tests of the reader drivers' frame parsers (tests/fuzz/readers.py): arbitrary bytes,
edited seeds and valid frames cut at random, a profile's worth of examples each.

Each target checks its decoder's whole contract (docs/fuzzing.md); a failure prints the
input, which belongs in tests/fuzz_corpus/<target>/ as a regression case.
"""

from __future__ import annotations

from hypothesis import given

from tests.fuzz import TARGETS
from tests.fuzz.common import fuzz_settings, tolerant
from tests.fuzz.strategies import inputs


@fuzz_settings()
@given(inputs(TARGETS["em4100"]))
def test_em4100_streams_give_checked_reads_or_known_refusals(data: bytes) -> None:
    """RDM6300 byte streams in any pieces decode to reads that re-encode to themselves, or
    to refusals with a known reason, the same whatever the pieces."""
    tolerant(TARGETS["em4100"])(data)


@fuzz_settings()
@given(inputs(TARGETS["ascii_lines"]))
def test_ascii_line_streams_give_ascii_reads_or_known_refusals(data: bytes) -> None:
    """ASCII reader lines under any configured pattern and limit decode to ASCII reads no
    longer than a line, or to refusals with a known reason, the same whatever the pieces."""
    tolerant(TARGETS["ascii_lines"])(data)


@fuzz_settings()
@given(inputs(TARGETS["qr"]))
def test_qr_scans_leave_the_driver_only_as_digests(data: bytes) -> None:
    """Scanner lines decode to SHA-256 digests or to refusals with a known reason, the
    same whatever the pieces."""
    tolerant(TARGETS["qr"])(data)


@fuzz_settings()
@given(inputs(TARGETS["pn532"]))
def test_pn532_frames_decode_with_a_bounded_buffer(data: bytes) -> None:
    """PN532 chip frames decode to documented events with a bounded buffer, responses
    re-encode to themselves, and target lists parse or name a known reason."""
    tolerant(TARGETS["pn532"])(data)


@fuzz_settings()
@given(inputs(TARGETS["idcard"]))
def test_idcard_replies_decode_with_a_bounded_buffer(data: bytes) -> None:
    """ID-card module replies decode to replies that re-encode to themselves or to known
    refusals, holding at most one frame of partial input."""
    tolerant(TARGETS["idcard"])(data)


@fuzz_settings()
@given(inputs(TARGETS["wiegand_codec"]))
def test_wiegand_bits_decode_to_round_tripping_cards_or_refusals(data: bytes) -> None:
    """Any bit string under any format is a card that re-encodes to the same bits or a
    refusal with a known reason."""
    tolerant(TARGETS["wiegand_codec"])(data)


@fuzz_settings()
@given(inputs(TARGETS["wiegand_edges"]))
def test_wiegand_edges_assemble_into_bounded_ordered_frames(data: bytes) -> None:
    """Edges on either line with any gaps assemble into ordered frames of at most
    MAX_BITS bits that each judge to a card or a refusal, with nothing left pending."""
    tolerant(TARGETS["wiegand_edges"])(data)
