"""Fuzz test of the office's receiving side on a real office database
(tests/fuzz/office.py): sequences of gateway messages on gateway topics."""

from __future__ import annotations

from hypothesis import given

from tests.fuzz import TARGETS
from tests.fuzz.common import fuzz_settings, tolerant
from tests.fuzz.strategies import inputs


@fuzz_settings(0.25)
@given(inputs(TARGETS["office_receive"]))
def test_gateway_messages_are_stored_or_counted_malformed_without_raising(data: bytes
                                                                          ) -> None:
    """Any gateway message is accepted for the topic's registered gateway or counted as
    malformed, and handling what was accepted never raises."""
    tolerant(TARGETS["office_receive"])(data)
