"""The topic tree (docs/protocol.md, "Topics") and how a topic is read back."""

from __future__ import annotations

from dataclasses import dataclass

from protocol import PROTOCOL

INBOUND_KINDS = ("list", "rev", "cmd", "ack", "hb", "enr", "keys", "site")
"""Central → gateway topic kinds."""
OUTBOUND_KINDS = ("events", "status", "applied", "request", "rekey")
"""Gateway → central topic kinds."""


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic tree of one gateway."""

    gateway: str
    prefix: str = PROTOCOL

    def inbound(self, kind: str) -> str:
        """Central → this gateway: ``list``, ``rev``, ``cmd``, ``ack``, ``hb``, ``enr``,
        ``keys``, ``site``."""
        return f"{self.prefix}/gw/{self.gateway}/in/{kind}"

    def outbound(self, kind: str) -> str:
        """This gateway → central: ``events``, ``status``, ``applied``, ``request``,
        ``rekey``."""
        return f"{self.prefix}/gw/{self.gateway}/out/{kind}"

    @property
    def broadcast_revocations(self) -> str:
        """Permit revocations sent to every gateway."""
        return f"{self.prefix}/all/rev"

    def subscriptions(self) -> list[str]:
        """What the gateway subscribes to."""
        return [f"{self.prefix}/gw/{self.gateway}/in/+", self.broadcast_revocations,
                self.outbound("status")]


def office_subscription(prefix: str = PROTOCOL) -> str:
    """The filter an office subscribes to for every gateway's outbound topics."""
    return f"{prefix}/gw/+/out/#"


def stream_of(topic: str, gateway: str, prefix: str = PROTOCOL) -> str | None:
    """The stream a central topic carries (``list``, ``rev``, ``cmd``, ``ack``, ``hb``,
    ``enr``, ``keys``, ``site``, ``all``), or None when the topic is not one the gateway
    consumes."""
    if topic == f"{prefix}/all/rev":
        return "all"
    head = f"{prefix}/gw/{gateway}/in/"
    if topic.startswith(head) and topic[len(head):] in INBOUND_KINDS:
        return topic[len(head):]
    return None


def parse_outbound(topic: str, prefix: str = PROTOCOL) -> tuple[str, str] | None:
    """``(gateway, kind)`` of a gateway → central topic, or None when ``topic`` is not
    ``<prefix>/gw/<gateway>/out/<kind>`` (the caller checks the gateway is known)."""
    head = prefix.split("/")
    parts = topic.split("/")
    if len(parts) != len(head) + 4 or parts[:len(head)] != head:
        return None
    gw_word, gateway, out_word, kind = parts[len(head):]
    if gw_word != "gw" or out_word != "out":
        return None
    return gateway, kind
