"""When the office has stored a gateway's reports, for the benchmarks that time them.

``AppliedHook`` is a structlog processor: put it first in the office's processors and it
notes, with ``time.perf_counter()``, each ``gateway_applied`` / ``gateway_refused`` log
line (which follows the commit of the gateway's ``applied`` report), how far the
office has stored the gateway's events (``events_stored``), and when a snapshot's last
chunk was handed to the broker client (``snapshot_published`` when none was left to pace,
else ``snapshot_chunks_sent`` from the office's chunk pacer). ``OfficeBench`` is the
office, broker and gateway folder those benchmarks set up alike. Used by bench/load.py,
bench/revocation.py and bench/snapshot.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import structlog

from tests.broker import Broker
from tests.harness import SITE_KEY, Office


class AppliedHook:
    """A structlog processor that notes when the office has stored a gateway's
    ``applied`` report (the ``gateway_applied`` log line follows the commit), and how far
    it has stored (and is about to acknowledge) the gateway's events."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seen: dict[tuple[str, int], tuple[float, str]] = {}
        self._acked: tuple[int, float] = (0, 0.0)
        self._sent: dict[int, float] = {}

    def __call__(self, _logger: Any, _method: str, event: MutableMapping[str, Any]
                 ) -> MutableMapping[str, Any]:
        if event.get("event") == "events_stored":
            with self._cond:
                if int(event["acked_upto"]) > self._acked[0]:
                    self._acked = (int(event["acked_upto"]), time.perf_counter())
                    self._cond.notify_all()
        if (event.get("event") == "snapshot_chunks_sent"
                or (event.get("event") == "snapshot_published" and not event.get("paced_chunks"))):
            with self._cond:
                self._sent[int(event["version"])] = time.perf_counter()
                self._cond.notify_all()
        if event.get("event") in ("gateway_applied", "gateway_refused"):
            with self._cond:
                status = "applied" if event["event"] == "gateway_applied" else "refused"
                self._seen[(str(event["stream"]), int(event["seq"] or 0))] = (
                    time.perf_counter(), status)
                self._cond.notify_all()
        return event

    def at(self, stream: str, seq: int) -> float | None:
        """When ``(stream, seq)`` was reported, or None if not yet."""
        with self._cond:
            seen = self._seen.get((stream, seq))
        return None if seen is None else seen[0]

    def wait(self, stream: str, seq: int, timeout: float = 10.0) -> float:
        """When ``(stream, seq)`` was reported applied; raises if refused or late."""
        with self._cond:
            if not self._cond.wait_for(lambda: (stream, seq) in self._seen, timeout):
                raise SystemExit(f"no applied report for {stream} {seq} in {timeout:g} s")
            at, status = self._seen[(stream, seq)]
        if status != "applied":
            raise SystemExit(f"the gateway refused {stream} {seq}")
        return at

    def first(self, stream: str, timeout: float) -> int:
        """The seq of the first report of ``stream`` applied; raises if none in time."""
        with self._cond:
            def applied() -> list[int]:
                return sorted(seq for (s, seq), (_at, status) in self._seen.items()
                              if s == stream and status == "applied")
            if not self._cond.wait_for(applied, timeout):
                raise SystemExit(f"no applied report for {stream} in {timeout:g} s")
            return applied()[0]

    def wait_sent(self, version: int, timeout: float) -> float:
        """When the office had handed the last chunk of list ``version`` to its broker
        client (its chunks are paced: ``--chunk-rate``)."""
        with self._cond:
            if not self._cond.wait_for(lambda: version in self._sent, timeout):
                raise SystemExit(f"the chunks of list {version} were not all sent in "
                                 f"{timeout:g} s")
            return self._sent[version]

    def wait_stored(self, upto: int, timeout: float) -> float:
        """When the office had stored every event up to ``upto`` (its acknowledgement is
        published right after)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._acked[0] >= upto, timeout):
                raise SystemExit(f"the office stored events up to {self._acked[0]}, not "
                                 f"{upto}, in {timeout:g} s")
            return self._acked[1]


@dataclass(slots=True)
class OfficeBench:
    """What the sync benchmarks set up the same way: the office's JSON log (with ``hook``
    first), a private Mosquitto, the gateway's folder with its site key, and the office."""

    log_file: TextIO
    broker: Broker
    gw: Path
    office: Office

    @classmethod
    def start(cls, folder: Path, hook: AppliedHook, *, info_only: bool = False,
              broker: dict[str, Any] | None = None, **central: Any) -> OfficeBench:
        """Set it all up in ``folder``; ``broker`` holds ``Broker`` options, ``central``
        the office's."""
        folder.mkdir(parents=True, exist_ok=True)
        log_file = (folder / "office.log").open("w")
        structlog.configure(
            processors=[hook, structlog.processors.TimeStamper(fmt="iso", utc=True),
                        structlog.processors.JSONRenderer()],
            wrapper_class=structlog.make_filtering_bound_logger(
                logging.INFO if info_only else logging.NOTSET),
            logger_factory=structlog.PrintLoggerFactory(log_file))
        mosquitto = Broker(folder / "broker", persistence=True, **(broker or {}))
        mosquitto.start()
        gw = folder / "gw"
        gw.mkdir(parents=True, exist_ok=True)
        (gw / "site.key").write_text(SITE_KEY.hex())
        (gw / "site.key").chmod(0o600)
        return cls(log_file, mosquitto, gw, Office(folder / "central", mosquitto,
                                                   gw / "site.key", **central))

    def close(self) -> None:
        """Close the office, stop the broker, close the log."""
        self.office.close()
        self.broker.stop()
        self.log_file.close()
