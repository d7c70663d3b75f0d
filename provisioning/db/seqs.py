"""How the office numbers its streams: the rule both database backends allocate by.

Every new sequence number or list version is ``max(stored + 1, now_ms)``: the larger of
the stream's next number and the office's clock in Unix milliseconds, read once for the
allocation. Numbers still only go up, one allocation at a time, and are committed before
the message that carries them is built; what the clock adds is that an office restored
from an older backup continues above what its gateways already stored (they refuse a seq
at or below their own as ``replay`` or ``rollback``), as long as its clock has moved on
since the last message it sent before the restore. A clock set back is covered by the
other half (``reported_counters``): the versions a gateway reports (its status, a
resync request) raise the office's counters, never lower them, up to a day ahead of the
office's clock (``REPORTED_AHEAD_MS``).

Ms times stay far inside ``protocol.messages.MAX_INT`` (2**53 ms is about 285,000 years);
a stream that would pass it is refused (``CentralError``), never wrapped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from protocol.messages import MAX_INT
from provisioning.errors import CentralError

GATEWAY_COUNTERS: dict[str, str] = {
    "list": "list_version", "staging": "list_version", "rev": "rev_seq", "cmd": "cmd_seq",
    "hb": "hb_seq", "enr": "enr_seq",
}
"""The ``gateways`` column of each per-gateway stream a gateway reports in
``status.versions`` (``staging``, the version of the newest snapshot it began to stage,
counts for the list). The ``all`` stream is one counter for every gateway (table
``streams``); ``mode`` is a ``cmd`` seq, and acks are never checked, so neither counts."""
REPORTED_AHEAD_MS = 86_400_000
"""A reported version further than this ahead of the office's clock is not taken in. A
gateway holds one only if the office numbered it with its clock more than a day ahead of
its clock now: either the clock was fast then (and the gateway refused those messages as
``from_future``) or it is slow now (and the gateway refuses the office's messages, a
day's lifetime, as ``expired``); revocations, which the gateway applies whatever the
clock says, are the exception. What the bound prevents is a gateway (a compromised one)
pushing a counter, the ``all`` stream shared by every gateway included, towards 2**53,
where it could allocate no more."""


@dataclass(frozen=True, slots=True)
class ReportedCounters:
    """What a gateway reports having stored: the highest seq of each ``gateways`` column
    (``GATEWAY_COUNTERS``) and of the ``all`` stream; 0 where it names none."""

    gateway: dict[str, int]
    all: int


def next_seq(stored: int, now_ms: int) -> int:
    """The seq (or list version) after ``stored`` at ``now_ms``: ``max(stored + 1,
    now_ms)``; ``CentralError`` beyond ``MAX_INT``."""
    seq = max(stored + 1, now_ms)
    if seq > MAX_INT:
        raise CentralError(f"sequence number {seq} would pass the protocol's largest "
                           f"integer (2**53)")
    return seq


def reported_counters(versions: Mapping[str, object], now_ms: int) -> ReportedCounters:
    """The counters a gateway's reported versions (``status.versions``, or a resync
    request's ``list``/``rev``/``all``) vouch for at ``now_ms``. Keys it does not know,
    values that are not integers from 0 to ``MAX_INT`` and values more than
    ``REPORTED_AHEAD_MS`` ahead of ``now_ms`` are left out."""
    limit = min(MAX_INT, now_ms + REPORTED_AHEAD_MS)

    def value(reported: object) -> int:
        if isinstance(reported, int) and not isinstance(reported, bool) \
                and 0 <= reported <= limit:
            return reported
        return 0

    columns = dict.fromkeys(GATEWAY_COUNTERS.values(), 0)
    for stream, column in GATEWAY_COUNTERS.items():
        columns[column] = max(columns[column], value(versions.get(stream)))
    return ReportedCounters(columns, value(versions.get("all")))
