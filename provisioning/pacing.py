"""Pacing of snapshot chunks: each gateway is sent its chunks at most as fast as a gateway
applies them (``DEFAULT_CHUNK_RATE`` bytes a second, ``--chunk-rate``; 0: unpaced).

Sent faster, they only wait in the gateway's inbox while its network thread takes them in
and its card path waits for the CPU (docs/performance.md). The manifest and the chunks
within the allowance (``PACING_BURST_S``: a small building's whole list) go out at once from the
caller's thread, as unpaced; the rest is handed to the broker client by the pacer's
thread. Nothing else waits for them: revocations, commands, acks, decisions and key
announcements, and every message to other gateways, go out at once. Only what must reach
the gateway after the chunks waits behind them in that gateway's lane: the rest of its
``list`` stream (deltas) and its heartbeats (which vouch for the list version being sent:
arriving first, they would make the gateway ask for a snapshot again; the gateway's own
inbox keeps them behind list messages for the same reason, agent/inbox.py).

``provisioning.publish.Publisher`` hands its snapshots, deltas and heartbeats to a
``Pacer``; ``provisioning.central`` makes one per office and gives it the sender.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import structlog

from provisioning.errors import CentralUsageError

log = structlog.get_logger()

DEFAULT_CHUNK_RATE = 4_000_000
"""Bytes of snapshot chunks a second sent to one gateway (``--chunk-rate``; 0: unpaced),
matched to what a Pi-class gateway applies. Derived: the build machine applies a
1,000,000-entry list in about 11 s (bench/decision.py ``apply_s`` 10.9 s), about 100,000
entries a second, and a million entries are 127 MB of chunks (127 bytes an entry, in
chunks of ``CHUNK_ENTRIES``): about 12.7 MB/s there. A Raspberry Pi 4's cores are taken
to be about a third as fast for this work (an assumption: not measured on one), which
gives about 4.2 MB/s, rounded down to 4 MB/s: about 31,000 entries a second, a
million-entry list sent in about 32 s, a building's few thousand entries within a few
hundredths of a second (``PACING_BURST_S``). Counted in bytes, not chunks, because a
gateway's work (taking a message in, parsing, hashing, staging) grows with its bytes, and
chunks differ in size (``--chunk-entries`` 1 to 10,000; entries with doors and schedules
are longer)."""
PACING_BURST_S = 0.05
"""A gateway that has not been sent chunks lately may be sent this many seconds' worth at
once (200 kB at the default rate, about 1,500 entries) with the manifest: a small
building's list goes out whole, in its worker's unit of work as before pacing
(provisioning/serve.py); only longer lists are spread out. It was 0.25 s (1 MB): those
eight chunks arriving at once with the manifest made the slowest decisions of
bench/load.py (docs/performance.md)."""

Send = Callable[[str, bytes], None]
LaneKind = Literal["chunk", "list", "hb"]


@dataclass(frozen=True, slots=True)
class _Queued:
    """A message waiting in a gateway's lane: a ``chunk`` (paced), or a ``list`` (delta)
    or ``hb`` (heartbeat) message that must not overtake the chunks before it."""

    topic: str
    payload: bytes
    kind: LaneKind


@dataclass(slots=True)
class _Lane:
    """What is still to go to one gateway behind its paced chunks."""

    items: deque[_Queued]
    version: int
    chunks: int
    """Chunks of this snapshot handed to the pacer (for the log)."""
    since: float


class Pacer:
    """Sends each gateway its snapshot chunks at most ``rate`` bytes a second (0:
    unpaced), every gateway on its own budget: several snapshots at once are each paced,
    none waits for another (the limit is each gateway's, not the office's or the
    broker's).

    A gateway's budget is a token bucket of ``PACING_BURST_S`` seconds: a chunk may go
    once the gateway's theoretical send time ``tat`` is at most that far ahead of now,
    and moves it on by ``len(chunk) / rate``. The caller's thread sends what is due at
    once; a thread of the pacer's own (started when a lane fills, ending when none is
    left) hands the rest to ``release``, which must be safe to call from that thread.
    Everything for one gateway is handed over under one lock, so its messages leave in
    the order they were given."""

    def __init__(self, rate: int, release: Send, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate < 0:
            raise CentralUsageError(f"--chunk-rate {rate}: must be 0 (snapshots unpaced) "
                                    "or more bytes per second")
        self.rate = rate
        self._release = release
        self._clock = clock
        self._lanes: dict[str, _Lane] = {}
        self._tat: dict[str, float] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def pending(self, gateway: str | None = None) -> int:
        """Messages still waiting for ``gateway`` (for every gateway with None)."""
        with self._cond:
            lanes = (self._lanes.values() if gateway is None
                     else [lane for gw, lane in self._lanes.items() if gw == gateway])
            return sum(len(lane.items) for lane in lanes)

    def snapshot(self, gateway: str, topic: str, manifest: bytes, chunks: Sequence[bytes],
                 *, version: int, send: Send) -> int:
        """Send ``manifest`` now, then the ``chunks`` paced; returns how many were left
        for the pacer's thread. A snapshot still being paced to ``gateway`` is
        superseded: its chunks and the deltas queued behind it are dropped (the gateway
        discards an unfinished staging when a newer manifest comes, and the new snapshot
        holds everything they carried); the heartbeats queued go after the new chunks."""
        with self._cond:
            if not self.rate:
                send(topic, manifest)
                for chunk in chunks:
                    send(topic, chunk)
                return 0
            held: list[_Queued] = []
            old = self._lanes.pop(gateway, None)
            if old is not None:
                held = [q for q in old.items if q.kind == "hb"]
                log.info("snapshot_pacing_superseded", gateway=gateway, version=old.version,
                         by=version, chunks_dropped=sum(q.kind == "chunk" for q in old.items))
            send(topic, manifest)
            lane = _Lane(deque([*(_Queued(topic, c, "chunk") for c in chunks), *held]),
                         version, len(chunks), self._clock())
            self._drain_lane(gateway, lane, send)
            if not lane.items:
                return 0
            self._lanes[gateway] = lane
            self._start()
            return sum(q.kind == "chunk" for q in lane.items)

    def send(self, gateway: str, topic: str, payload: bytes, *, kind: LaneKind,
             send: Send) -> bool:
        """Send a ``list`` or ``hb`` message to ``gateway`` now, or, while chunks are
        being paced to it, queue it behind them; True when it was sent now."""
        with self._cond:
            lane = self._lanes.get(gateway)
            if lane is None:
                send(topic, payload)
                return True
            lane.items.append(_Queued(topic, payload, kind))
            return False

    def drain(self) -> None:
        """Wait until every lane is empty (a one-shot command, before it waits for the
        broker's acknowledgements). Bounded: the pacer's thread hands everything over
        at ``rate``, and handing over does not wait for the broker."""
        with self._cond:
            self._cond.wait_for(lambda: not self._lanes or self._thread is None)

    def stop(self) -> int:
        """Drop whatever is still waiting (``serve`` stops, the folder is closed); returns
        how many messages were dropped. A gateway left with part of a snapshot asks for
        one again (docs/protocol.md, snapshots)."""
        with self._cond:
            lanes, self._lanes = self._lanes, {}
            self._cond.notify_all()
        for gateway, lane in lanes.items():
            log.warning("snapshot_pacing_stopped", gateway=gateway, version=lane.version,
                        messages_dropped=len(lane.items))
        return sum(len(lane.items) for lane in lanes.values())

    def _due(self, gateway: str, now: float) -> float:
        """When ``gateway``'s next chunk may go."""
        return max(self._tat.get(gateway, now), now) - PACING_BURST_S

    def _drain_lane(self, gateway: str, lane: _Lane, send: Send) -> None:
        """Send (under the lock) what may go now from the head of ``lane``: chunks while
        the budget allows, the messages queued behind them as they come up."""
        while lane.items:
            item = lane.items[0]
            if item.kind == "chunk":
                now = self._clock()
                if self._due(gateway, now) > now:
                    return
                tat = max(self._tat.get(gateway, now), now)
                self._tat[gateway] = tat + len(item.payload) / self.rate
            lane.items.popleft()
            send(item.topic, item.payload)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="chunk-pacer",
                                            daemon=True)
            self._thread.start()
        else:
            self._cond.notify_all()

    def _run(self) -> None:
        with self._cond:
            try:
                self._pace()
            finally:
                self._thread = None
                # Spent budgets are forgotten (a lane that starts later begins afresh).
                now = self._clock()
                self._tat = {gw: t for gw, t in self._tat.items() if t > now}
                self._cond.notify_all()

    def _pace(self) -> None:
        """The pacer's thread, under the lock (released while it waits): hand over what
        is due in every lane, sleep until the next is due or a lane is added."""
        while self._lanes:
            wake = math.inf
            for gateway, lane in list(self._lanes.items()):
                try:
                    self._drain_lane(gateway, lane, self._release)
                except Exception:  # this thread's one boundary: logged, lane dropped
                    # (not connected, say: the gateway asks for the snapshot again)
                    log.exception("snapshot_pacing_failed", gateway=gateway,
                                  version=lane.version, messages_dropped=len(lane.items))
                    lane.items.clear()
                else:
                    if lane.items:
                        wake = min(wake, self._due(gateway, self._clock()))
                        continue
                    log.info("snapshot_chunks_sent", gateway=gateway, version=lane.version,
                             chunks=lane.chunks, seconds=round(self._clock() - lane.since, 3))
                del self._lanes[gateway]
                self._cond.notify_all()
            if self._lanes:
                self._cond.wait(max(0.0, wake - self._clock()))
