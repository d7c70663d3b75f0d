"""Fuzz targets of the control socket: one datagram in, a request model or a
``RequestError`` out (the simulation's requests and the tenant requests of the landlord
page), and the server's ``handle``, which answers every datagram and never raises.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any, cast

from hypothesis import strategies as st

from agent.control import (
    MAX_DATAGRAM,
    REQUEST_TYPES,
    ControlServer,
    RequestError,
    parse_request,
)
from agent.tenant_ops import TenantHost, TenantOps
from tests.fuzz.common import Target
from tests.fuzz.strategies import JSON_VALUES, mutate_json

ALL_TYPES = {**REQUEST_TYPES, **{op: model for op, (model, _handler)
                                 in TenantOps(cast(TenantHost, None)).handlers().items()}}
"""Every request either socket accepts, by ``op`` (sim.sock serves them all)."""
PARSE_CODES = {"too_large", "malformed", "bad_request", "unknown_op"}
HANDLE_CODES = PARSE_CODES | {"unknown_reader", "unknown_input", "busy", "internal"}
_CARD_LIKE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}:[!-~]{4,}")
"""A value that looks like a card id: no refusal may repeat one (it would reach the log)."""


class FakeAgent:
    """The agent as the control socket sees it: two simulated readers and inputs."""

    def __init__(self) -> None:
        self.taps: list[tuple[str, str]] = []
        self.inputs: dict[str, bool] = {}

    def sim_readers(self) -> Collection[str]:
        """The simulated readers."""
        return ("front-in", "front-out")

    def sim_inputs(self) -> Collection[str]:
        """The simulated inputs."""
        return ("front.contact", "front.rex")

    def sim_queued(self, reader: str) -> int:
        """Taps waiting at ``reader`` (none are ever taken here)."""
        return sum(1 for r, _ in self.taps if r == reader)

    def sim_tap(self, reader: str, card: str) -> None:
        """Queue a tap."""
        self.taps.append((reader, card))

    def sim_set_input(self, name: str, active: bool) -> None:
        """Set an input."""
        self.inputs[name] = active


def _strings(value: Any) -> list[str]:
    """Every string (keys included) inside a parsed JSON value, iteratively."""
    out: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            out.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return out


def _sent_cards(data: bytes) -> list[str]:
    """Card-like strings the client sent, when the datagram is JSON at all."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return []
    return [s for s in _strings(value) if _CARD_LIKE.fullmatch(s)]


def control_request(data: bytes) -> None:
    """Any datagram parses to one of the accepted request models or is refused with a
    known error code whose message repeats no card-like value the client sent."""
    try:
        request = parse_request(data, types=ALL_TYPES)
    except RequestError as exc:
        assert exc.code in PARSE_CODES, exc.code
        assert isinstance(exc.message, str) and exc.message
        for card in _sent_cards(data):
            assert card not in exc.message, (card, exc.message)
        return
    assert len(data) <= MAX_DATAGRAM
    op = getattr(request, "op", None)
    assert isinstance(op, str) and type(request) is ALL_TYPES[op]


def control_handle(data: bytes) -> None:
    """The server answers every datagram (or defers a queued tap) without raising; the
    reply is JSON, ``ok`` or an error with a known code."""
    agent = FakeAgent()
    server = ControlServer(Path("/nonexistent/sim.sock"), agent)
    # Split on a byte that never occurs in a request's JSON text: several datagrams, so a
    # tap can meet a full queue.
    for datagram in data.split(b"\x00")[:16]:
        reply = server.handle(datagram, b"\x00client")
        if reply is None:
            assert agent.taps, "only a queued tap is answered later"
            continue
        json.dumps(reply)
        if reply["ok"]:
            assert reply["op"] == "input" and reply["name"] in agent.sim_inputs()
        else:
            assert reply["error"] in HANDLE_CODES, reply
            for card in _sent_cards(datagram):
                assert card not in reply["message"], (card, reply)
    server.decided("front-in", granted=False, reason="unknown_card")
    server.expire()


CARDS = st.builds(lambda kind, ident: f"{kind}:{ident}",
                  st.sampled_from(["em4100", "uid", "qr", "osdp"]),
                  st.text(alphabet="0123456789ABCDEF", min_size=8, max_size=20))
"""Card ids: sent in any field, they must never come back in a refusal."""


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """A request object of a real ``op`` with its own fields (and a few others), each set
    to a card id, a plausible value or any JSON value."""
    op = draw(st.sampled_from(sorted(ALL_TYPES)))
    names = [*ALL_TYPES[op].model_fields, "card", "extra"]
    fields = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    value = st.one_of(CARDS, JSON_VALUES, st.sampled_from(["front-in", "front.contact", True]))
    doc: dict[str, Any] = {"op": op}
    for name in fields:
        doc[name] = draw(value)
    if draw(st.booleans()):
        doc = draw(mutate_json(doc))
    return doc


def _text(doc: Any) -> st.SearchStrategy[bytes]:
    raw = json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")
    tricks = [raw, raw.replace(b"}", b', "op": "tap"}', 1), b"[" * 6 + raw + b"]" * 6,
              raw.replace(b"true", b"NaN"), b" " * 1000 + raw]
    return st.sampled_from(tricks)


def _request_structured() -> st.SearchStrategy[bytes]:
    return requests().flatmap(_text)


def _handle_structured() -> st.SearchStrategy[bytes]:
    return st.lists(_request_structured(), min_size=1, max_size=10).map(b"\x00".join)


SEEDS = [
    b'{"op": "tap", "reader": "front-in", "card": "em4100:67003B51C6"}',
    b'{"op": "input", "name": "front.contact", "active": true}',
    b'{"op": "enroll", "capture": "0123456789abcdef", "unit": "301", '
    b'"permit": "11010519491231002X", "lease_end": "2027-12-31"}',
    b'{"op": "audit", "kind": "web_sign_in", "account": "landlord", "data": {"n": 1}}',
    b'{"op": "move_out", "unit": "301"}',
    b'{"op": "door_summary", "days": 7}',
]

TARGETS: list[Target] = [
    Target("control_request", control_request, MAX_DATAGRAM + 64,
           "control.parse_request (simulation and tenant requests)", lambda: list(SEEDS),
           _request_structured),
    Target("control_handle", control_handle, 4 * MAX_DATAGRAM, "control.ControlServer.handle",
           lambda: [b"\x00".join(SEEDS[:2] * 5)], _handle_structured),
]
