"""The self-contained demo, and the demo allowlist of the embedded defaults.

``permitgate demo`` builds a two-door building in a temporary folder, opens the real
serial driver on two pseudo-terminals (entry and exit readers speaking the 125 kHz EM4100
frame), writes card frames into them as a reader would, and prints each decision with its
reason. No hardware, no broker, a few seconds.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TextIO

from agent.config import WEEKDAYS, Config, parse_config
from agent.decision import Decision
from agent.runtime import Agent, ReadTiming
from agent.store import CredentialEntry, Store
from drivers.serial_reader import em4100_frame
from protocol.hashing import CredentialHasher


@dataclass(frozen=True, slots=True)
class DemoCard:
    """A card of the demo building (no real person behind it)."""

    hex_id: str
    label: str
    permit: str
    valid_days: tuple[int | None, int | None] = (None, 365)
    doors: tuple[str, ...] | None = None
    schedule: str = "always"

    @property
    def card_id(self) -> str:
        """The normalised identifier the EM4100 driver reports."""
        return f"em4100:{self.hex_id}"


DEMO_CARDS = (
    DemoCard("67003B51C6", "tenant, flat 301", "DEMO-PERMIT-301"),
    DemoCard("67003BA86C", "tenant, flat 302", "DEMO-PERMIT-302"),
    DemoCard("1A2B3C4D5E", "tenant whose permit was revoked", "DEMO-PERMIT-303"),
    DemoCard("0F0E0D0C0B", "tenant whose permit expired", "DEMO-PERMIT-304", (-400, -10)),
    DemoCard("0102030405", "tenant moving in next week", "DEMO-PERMIT-305", (7, 365)),
    DemoCard("A1B2C3D4E5", "bike-room cleaner (back door only)", "DEMO-PERMIT-306",
             doors=("back",)),
    DemoCard("5A5A5A5A5A", "contractor (tomorrow only)", "DEMO-PERMIT-307",
             schedule="contractor"),
)
REVOKED_PERMITS = ("DEMO-PERMIT-303",)
UNKNOWN_CARD = "DEADBEEF00"


def demo_entries(hasher: CredentialHasher, now: datetime) -> list[CredentialEntry]:
    """The demo allowlist, hashed with the site key."""
    base = int(now.timestamp())
    entries = []
    for card in DEMO_CARDS:
        start, end = card.valid_days
        entries.append(CredentialEntry(
            cred=hasher.credential(card.card_id), permit=hasher.permit(card.permit),
            valid_from=None if start is None else base + start * 86400,
            valid_until=None if end is None else base + end * 86400,
            doors=card.doors, schedule=card.schedule))
    return entries


def seed_demo(store: Store, hasher: CredentialHasher, now: datetime) -> bool:
    """Load the demo allowlist into an empty store (embedded defaults and demo only)."""
    if any(s["stream"] == "list" for s in store.sync_states()):
        return False
    store.replace_allowlist(demo_entries(hasher, now), version=0, stream="list")
    store.revoke([(hasher.permit(p), "permit") for p in REVOKED_PERMITS])
    return True


def demo_config(folder: Path, entry_port: str, exit_port: str, now: datetime) -> Config:
    """A two-door building whose front readers are serial ports."""
    tomorrow = WEEKDAYS[(now.weekday() + 1) % 7]
    return parse_config(f"""
[site]
site_id = "demo-site"
gateway_id = "demo-gw"
timezone = "UTC"

[store]
path = "{folder / 'permitgate.db'}"

[keys]
site_key = "{folder / 'site.key'}"
generate_missing = true

[policy]
anti_passback = "hard"
schedules.contractor = {{ {tomorrow} = ["00:00-24:00"] }}

[[doors]]
id = "front"
unlock_s = 1
relay = {{ driver = "simulated" }}

[[doors]]
id = "back"
relay = {{ driver = "simulated" }}

[[readers]]
id = "front-in"
door = "front"
direction = "entry"
driver = "serial"
debounce_s = 0.5
options = {{ port = "{entry_port}", format = "em4100" }}

[[readers]]
id = "front-out"
door = "front"
direction = "exit"
driver = "serial"
debounce_s = 0.5
options = {{ port = "{exit_port}", format = "em4100" }}
""", "<demo>")


SCRIPT: tuple[tuple[str, str, str], ...] = (
    ("in", "67003B51C6", "A tenant of flat 301 comes home"),
    ("in", UNKNOWN_CARD, "A card the building has never seen"),
    ("in", "1A2B3C4D5E", "A tenant whose permit the office revoked"),
    ("in", "0F0E0D0C0B", "A permit that expired ten days ago"),
    ("in", "0102030405", "A new tenant, valid from next week"),
    ("in", "A1B2C3D4E5", "The cleaner, allowed at the back door only"),
    ("in", "5A5A5A5A5A", "A contractor, allowed tomorrow only"),
    ("in", "67003BA86C", "A tenant of flat 302 comes home"),
    ("in", "67003BA86C", "The same card again, passed back to a friend outside"),
    ("out", "67003B51C6", "The tenant of flat 301 goes out"),
)


def run_demo(out: TextIO, folder: Path | None = None,
             pause: Callable[[float], None] = time.sleep) -> int:
    """Run the scripted demo, printing each decision; returns the exit status."""
    with tempfile.TemporaryDirectory(prefix="permitgate-demo-") as tmp:
        work = folder or Path(tmp)
        ptys = {side: os.openpty() for side in ("in", "out")}
        now = datetime.now().astimezone()
        config = demo_config(work, os.ttyname(ptys["in"][1]), os.ttyname(ptys["out"][1]), now)
        agent = Agent(config)
        done = threading.Event()
        results: list[tuple[str, Decision, ReadTiming]] = []

        def on_decision(reader: object, decision: Decision, timing: ReadTiming) -> None:
            results.append((getattr(reader, "id", "?"), decision, timing))
            done.set()

        agent.on_decision = on_decision
        out.write("permitgate demo: a simulated building, real serial driver on two "
                  "pseudo-terminals (EM4100 frames)\n\n")
        try:
            agent.start()
            assert agent.store is not None and agent.hasher is not None
            seed_demo(agent.store, agent.hasher, now)
            for side, hex_id, story in SCRIPT:
                done.clear()
                os.write(ptys[side][0], em4100_frame(hex_id))
                if not done.wait(5.0):
                    out.write(f"  {story}: no decision within 5 s\n")
                    return 1
                _, decision, timing = results[-1]
                verdict = "OPEN  " if decision.granted else "DENIED"
                ms = (timing.granted - timing.received) * 1000
                out.write(f"  {verdict} {decision.reason.value:<28} {ms:5.2f} ms  "
                          f"{'entry' if side == 'in' else 'exit '}  {story}\n")
                pause(0.6)  # past the 0.5 s reader debounce, so a repeated card counts again
            os.write(ptys["in"][0], b"\x0268003B51C6CB\x03")
            pause(0.3)
            out.write("  (a garbled frame with a bad checksum was refused by the driver: "
                      f"{agent.readers['front-in'].rejected} rejected)\n")
        finally:
            agent.stop()
            for master, slave in ptys.values():
                os.close(master)
                os.close(slave)
        store = Store(work / "permitgate.db")
        report = store.verify_chain()
        store.close()
        out.write(f"\n{report.checked} events recorded, hash chain "
                  f"{'intact' if report.ok else 'BROKEN'}.\n")
        out.write("\nTry your own (from a checkout, run ./permitgate instead of permitgate):\n"
                  "  permitgate run                      # the simulated building, "
                  "no hardware needed\n"
                  "  permitgate sim tap front-in em4100:67003B51C6   # in another terminal\n"
                  "  permitgate status; permitgate events tail\n"
                  "  permitgate check-config -c config/permitgate.example.toml  "
                  "# then edit it for your readers\n")
        return 0 if report.ok and len(results) == len(SCRIPT) else 1

