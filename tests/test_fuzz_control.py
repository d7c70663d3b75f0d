"""Fuzz tests of the control socket (tests/fuzz/control.py): every datagram parses to an
accepted request or a refusal with a known code, and the server answers every datagram
without raising and without repeating a card id it was sent."""

from __future__ import annotations

import json

from hypothesis import given

from agent.control import RequestError, parse_request
from tests.fuzz import TARGETS
from tests.fuzz.common import fuzz_settings, tolerant
from tests.fuzz.control import ALL_TYPES, control_handle
from tests.fuzz.strategies import inputs


@fuzz_settings()
@given(inputs(TARGETS["control_request"]))
def test_any_datagram_is_a_request_model_or_a_known_refusal(data: bytes) -> None:
    """Any datagram parses to the model of its op (simulation or tenant request) or raises
    RequestError with a known code and no card id the client sent."""
    tolerant(TARGETS["control_request"])(data)


@fuzz_settings(0.5)
@given(inputs(TARGETS["control_handle"]))
def test_the_server_answers_any_datagrams_without_raising(data: bytes) -> None:
    """The server answers any sequence of datagrams with a JSON reply (or defers a queued
    tap) and never raises."""
    tolerant(TARGETS["control_handle"])(data)


def test_a_card_id_in_the_wrong_field_is_not_repeated() -> None:
    """A card id typed into the reader field, or as a field name, is refused without the
    refusal repeating it."""
    card = "em4100:67003B51C6"
    for request in ({"op": "tap", "reader": card, "card": 5},
                    {"op": "tap", "reader": "front-in", card: "x"},
                    {"op": "input", "name": card, "active": "yes"}):
        data = json.dumps(request).encode()
        try:
            parse_request(data, types=ALL_TYPES)
        except RequestError as exc:
            assert card not in exc.message
        else:
            raise AssertionError(f"accepted {request}")
        control_handle(data)
