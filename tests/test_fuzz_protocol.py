"""Fuzz tests of the protocol package (tests/fuzz/protocol.py): envelopes, central bodies,
chunks, gateway messages, permit numbers and sealed permit numbers."""

from __future__ import annotations

import json

from hypothesis import given

from protocol.messages import parse_central
from tests.fuzz import TARGETS
from tests.fuzz.common import fuzz_settings, tolerant
from tests.fuzz.protocol import BODIES, OFFICE_KEY, TOPIC_CHOICES, TRUSTED, sign_text
from tests.fuzz.strategies import inputs


def test_every_template_body_is_a_valid_central_message() -> None:
    """The bodies the structure-aware strategies mutate are valid, one of each type, so
    mutations start from messages the gateway applies."""
    types = {parse_central(json.dumps(body)).type for body in BODIES}
    assert types == {"snapshot", "delta", "revocation", "command", "heartbeat", "event_ack",
                     "enrollment_decision", "keys", "site_key"}


def test_a_body_signed_for_one_topic_opens_only_there() -> None:
    """The harness signs as the office does: an envelope opens for its own topic and is
    refused on every other (so the envelope target's oracle is not vacuous)."""
    from protocol.messages import RefusedError  # noqa: PLC0415
    from protocol.signing import open_envelope  # noqa: PLC0415

    payload = sign_text(OFFICE_KEY, TOPIC_CHOICES[1], json.dumps(BODIES[2]))
    assert open_envelope(payload, TOPIC_CHOICES[1], TRUSTED, 1 << 20) == json.dumps(BODIES[2])
    for topic in TOPIC_CHOICES[2:]:
        try:
            open_envelope(payload, topic, TRUSTED, 1 << 20)
        except RefusedError as exc:
            assert exc.reason == "bad_signature"
        else:
            raise AssertionError(f"opened on {topic}")


@fuzz_settings()
@given(inputs(TARGETS["envelope"]))
def test_envelopes_open_to_the_signed_body_or_are_refused(data: bytes) -> None:
    """Any payload on any central topic opens to exactly the body the office signed for
    that topic, or is refused with a documented reason."""
    tolerant(TARGETS["envelope"])(data)


@fuzz_settings()
@given(inputs(TARGETS["central"]))
def test_central_bodies_parse_and_round_trip_or_are_malformed(data: bytes) -> None:
    """Any body text parses to a central message that the office's serialisation gives
    back unchanged, or is refused as malformed."""
    tolerant(TARGETS["central"])(data)


@fuzz_settings()
@given(inputs(TARGETS["chunk"]))
def test_chunks_parse_with_decodable_hashes_or_are_refused(data: bytes) -> None:
    """Any chunk payload parses to a chunk whose hashes decode to 32 bytes, or is
    refused as malformed or oversized."""
    tolerant(TARGETS["chunk"])(data)


@fuzz_settings()
@given(inputs(TARGETS["gateway_message"]))
def test_gateway_messages_validate_with_a_stable_serialisation(data: bytes) -> None:
    """Any payload of any gateway topic kind validates to a model whose JSON parses back to
    the same JSON, or raises ValidationError."""
    tolerant(TARGETS["gateway_message"])(data)


@fuzz_settings()
@given(inputs(TARGETS["permit"]))
def test_typed_permit_numbers_validate_idempotently_or_name_a_rule(data: bytes) -> None:
    """Any typed text is a permit whose number validates to the same permit, or a
    PermitError naming a known rule and a position in the number."""
    tolerant(TARGETS["permit"])(data)


@fuzz_settings(0.5)
@given(inputs(TARGETS["sealed"]))
def test_sealed_numbers_open_to_what_was_sealed_or_not_at_all(data: bytes) -> None:
    """A sealed number, edited or not, opens to exactly what was sealed or raises
    SealError, and never opens for another enrollment."""
    tolerant(TARGETS["sealed"])(data)
