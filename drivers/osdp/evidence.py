"""What the wire showed of one PD since its handshake started, and the reason for a failed
handshake or a lost PD that follows from it. Pure code: frames in, a sentence out.

The frames are the ones libosdp itself was given (the commands it wrote, the replies the
channel handed it whole), so a reason never rests on a frame libosdp did not see.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from drivers.osdp.frames import (
    CMD_CAP,
    CMD_CHLNG,
    CMD_ID,
    CMD_LSTAT,
    CMD_POLL,
    CMD_SCRYPT,
    REPLY_CCRYPT,
    REPLY_NAK,
    REPLY_PDCAP,
    REPLY_PDID,
    Frame,
    offers_secure_channel,
)

_HANDSHAKE = frozenset({CMD_CHLNG, CMD_SCRYPT, CMD_POLL, CMD_ID, CMD_CAP})
"""Commands whose NAK is part of a failed handshake, not a refused command."""


@dataclass(slots=True)
class LinkEvidence:
    """The evidence for the reason given when an address fails."""

    replies: int = 0
    last_reply: float = 0.0
    sent: set[int] = field(default_factory=set)
    got: set[int] = field(default_factory=set)
    nak_codes: list[int] = field(default_factory=list)
    last_command: int = 0
    refused: tuple[int, int] | None = None
    """(command, NAK code) of the last command the PD refused."""
    scbkd_challenge: bool = False
    sc_offered: bool | None = None
    """What the PD's ``osdp_PDCAP`` said of Secure Channel; None before one came."""

    def command(self, frame: Frame) -> None:
        """A command the CP sent to this address."""
        self.sent.add(frame.code)
        self.last_command = frame.code
        if frame.code == CMD_CHLNG and frame.scb_data[:1] == b"\x00":
            self.scbkd_challenge = True

    def reply(self, frame: Frame, now: float) -> bool:
        """A reply from this address; True when it refused ``osdp_LSTAT``."""
        self.replies += 1
        self.last_reply = now
        self.got.add(frame.code)
        if frame.code == REPLY_PDCAP and frame.readable:
            self.sc_offered = offers_secure_channel(frame)
        if frame.code != REPLY_NAK or not frame.readable or not frame.data:
            return False
        self.nak_codes.append(frame.data[0])
        if self.last_command not in _HANDSHAKE:
            self.refused = (self.last_command, frame.data[0])
        return self.last_command == CMD_LSTAT


def diagnose(s: LinkEvidence, *, secure: bool, online: bool,  # noqa: PLR0911 - a table
             now: float) -> str:
    """Why the handshake failed (``online`` False) or the PD went away, from ``s``."""
    if s.refused is not None:
        return (f"the PD refused command 0x{s.refused[0]:02X} (NAK {s.refused[1]}), "
                "and libosdp takes a PD offline for that")
    if online:
        return f"the PD stopped answering (no reply for {now - s.last_reply:.1f} s)"
    if s.replies == 0:
        return "no answer from the PD (check wiring, address, baud rate)"
    if not secure:
        return "the PD answered but did not complete the handshake"
    if REPLY_CCRYPT in s.got and CMD_SCRYPT not in s.sent:
        return ("Secure Channel failed: key mismatch (the PD's cryptogram does not "
                "verify with the configured SCBK)")
    if CMD_SCRYPT in s.sent and s.nak_codes:
        return ("Secure Channel failed: key mismatch (the PD refused the CP's "
                f"cryptogram, NAK {s.nak_codes[-1]})")
    if CMD_SCRYPT in s.sent:
        return ("Secure Channel failed: the PD did not confirm the CP's cryptogram "
                "(osdp_SCRYPT unanswered)")
    if CMD_CHLNG in s.sent and REPLY_CCRYPT not in s.got:
        if s.nak_codes:
            return (f"Secure Channel failed: the PD refused the challenge (NAK "
                    f"{s.nak_codes[-1]}); is SC enabled on it?")
        return "Secure Channel failed: the PD did not answer the challenge (osdp_CHLNG)"
    if REPLY_PDCAP in s.got:
        if s.sc_offered is False:
            return ("Secure Channel failed: the PD does not offer Secure Channel (its "
                    "capability reply has no AES-128 communication security)")
        return ("Secure Channel failed: the handshake did not start after the PD's "
                "capability reply (osdp_PDCAP)")
    if REPLY_PDID in s.got:
        return ("Secure Channel failed: the PD answered osdp_ID but not the capability "
                "request (osdp_CAP)")
    return "Secure Channel failed"
