"""Rotating a building's site key without locking a tenant out (docs/protocol.md,
"site_key" and "rekey"; docs/operations.md, "Rotating a building's site key").

The office keeps card hashes, never card ids, so it cannot re-key a list by itself: the
cards do it, one tap at a time.

1. ``permitgate-central rotate-site-key GATEWAY`` makes the next generation's key
   (``site-keys/<gateway>.<generation>.key``, mode 0600), records it as the gateway's key
   (cards enrolled at the office from now on are hashed under it), marks every entry the
   gateway holds as still under the previous key (``rekey_pending``), and sends a signed
   ``site_key`` message: the new key sealed to the gateway's own X25519 key (recorded by
   ``register-gateway``), the previous key ``honoured``.
2. The gateway then looks every card up under both keys. A card known only under the
   previous one is reported in a ``rekey`` message; the office moves its entry, its
   revocation and its enrollment record to the new hash (``provisioning.db.rekey_sql``)
   and sends the moved entries as a delta.
3. ``rotate-site-key GATEWAY --status``: the generation, whether the gateway holds it,
   and how many entries are still under the previous key.
4. ``rotate-site-key GATEWAY --finish``, once none is (``--force``: those cards leave the
   list and must be enrolled again): a ``site_key`` message with the previous key
   ``dropped``, then a snapshot of the list under the new key.

A gateway that missed the message gets it again when its status shows it behind (the
same seq, signed anew: ``on_status``). The state is the database setting
``site_key:<gateway>`` (JSON: ``generation``, ``seq``, ``previous``, ``key_path``,
``previous_path``, ``started_ms``, ``finished_ms``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import structlog
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from protocol import bundles
from protocol.messages import Rekey, SiteKey
from protocol.signing import unb64
from protocol.topics import Topics
from provisioning.db import OfficeDatabase
from provisioning.db.seqs import next_seq
from provisioning.enrollment import SITE_KEY_STATE, known_gateway
from provisioning.errors import CentralUsageError
from provisioning.keys import create_secret

if TYPE_CHECKING:
    from provisioning.central import Central
    from provisioning.keys import OfficeKeys
    from provisioning.publish import Publisher

log = structlog.get_logger()

SITE_KEYS_DIR = "site-keys"
GATEWAYS_DIR = "gateways"
"""Where ``register-gateway`` keeps each gateway's record (its public keys)."""


@dataclass(frozen=True, slots=True)
class StartSiteKey:
    """Begin a change-over to a new site key at ``gateway``."""

    gateway: str


@dataclass(frozen=True, slots=True)
class FinishSiteKey:
    """End ``gateway``'s change-over (``force``: even with entries still pending)."""

    gateway: str
    force: bool = False


SiteKeyOp = StartSiteKey | FinishSiteKey


def seal_public_key(folder: Path, gateway: str) -> X25519PublicKey:
    """The gateway's X25519 key recorded by ``register-gateway``; ``CentralUsageError``
    when it has none (a gateway added by hand with ``add-gateway``)."""
    record = folder / GATEWAYS_DIR / f"{gateway}.json"
    try:
        seal = json.loads(record.read_text("utf-8"))["seal_key"]
        return X25519PublicKey.from_public_bytes(bundles.raw_key(seal))
    except FileNotFoundError:
        raise CentralUsageError(
            f"gateway {gateway!r}: no registration record ({record}); only a gateway "
            "registered with 'register-gateway' has a seal key to send a site key to "
            "(provision it again)") from None
    except (OSError, ValueError, KeyError, TypeError, bundles.BundleError) as exc:
        raise CentralUsageError(f"{record}: no usable seal_key ({exc})") from None


class SiteKeyRotation:
    """Site-key change-overs of every gateway (see the module docstring)."""

    def __init__(self, db: OfficeDatabase, keys: OfficeKeys, publisher: Publisher,
                 send: Callable[[str, bytes], None], *, clock: Callable[[], float],
                 resend_interval_s: float) -> None:
        self._db = db
        self._keys = keys
        self._publisher = publisher
        self._send = send
        self._clock = clock
        self._resend_interval_s = resend_interval_s
        self._resent: dict[str, float] = {}

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def state(self, gateway: str) -> dict[str, Any] | None:
        """The recorded state of ``gateway``'s latest rotation, or None."""
        text = self._db.meta(SITE_KEY_STATE.format(gateway=gateway))
        return None if text is None else dict(json.loads(text))

    def _save(self, gateway: str, state: Mapping[str, Any]) -> None:
        self._db.set_meta(SITE_KEY_STATE.format(gateway=gateway), json.dumps(dict(state)))

    # -- operations (checked, then performed by the one publisher) --------------------

    def check(self, op: SiteKeyOp) -> None:
        """Refuse an operation that cannot be performed, before anything is written."""
        known_gateway(self._db, op.gateway)
        seal_public_key(self._keys.folder, op.gateway)
        state = self.state(op.gateway)
        changeover = state is not None and state["previous"] == "honoured"
        if isinstance(op, StartSiteKey) and changeover:
            assert state is not None
            raise CentralUsageError(
                f"gateway {op.gateway!r}: the change-over to site key generation "
                f"{state['generation']} is not finished ('rotate-site-key {op.gateway} "
                "--finish')")
        if isinstance(op, FinishSiteKey):
            if not changeover:
                raise CentralUsageError(f"gateway {op.gateway!r}: no site key change-over "
                                        "to finish")
            pending = self._db.rekey_pending(op.gateway)
            if pending and not op.force:
                raise CentralUsageError(
                    f"gateway {op.gateway!r}: {pending} card(s) have not been tapped since "
                    "the change-over began and are known only under the previous key; "
                    "wait for them, or --force (they leave the list and must be enrolled "
                    "again)")

    def perform(self, op: SiteKeyOp) -> int:
        """Run a checked operation; returns the ``site`` seq it sent."""
        if isinstance(op, StartSiteKey):
            return self.start(op.gateway)
        return self.finish(op.gateway, force=op.force)

    def start(self, gateway: str) -> int:
        """Make the next key, record it, and send it with the previous one honoured."""
        record = known_gateway(self._db, gateway)
        previous = self.state(gateway)
        generation = 2 if previous is None else int(previous["generation"]) + 1
        folder = self._keys.folder / SITE_KEYS_DIR
        folder.mkdir(mode=0o700, exist_ok=True)
        path = folder / f"{gateway}.{generation}.key"
        if path.exists():  # a start cut short after the key was written: use it
            key_hex = path.read_text("ascii").strip()
        else:
            key_hex = os.urandom(32).hex()
            create_secret(path, key_hex + "\n")
        pending = self._db.begin_rekey(gateway, str(path.resolve()))
        seq = next_seq(0 if previous is None else int(previous["seq"]), self._now_ms())
        state = {"generation": generation, "previous": "honoured", "seq": seq,
                 "key_path": str(path.resolve()), "previous_path": record.site_key_path,
                 "started_ms": self._now_ms(), "finished_ms": None}
        self._save(gateway, state)
        self._send_state(gateway, state)
        log.warning("site_key_rotation_started", gateway=gateway, generation=generation,
                    entries_pending=pending, seq=seq)
        return seq

    def finish(self, gateway: str, *, force: bool) -> int:
        """Drop the previous key: send it dropped, then the list under the new key."""
        state = self.state(gateway)
        assert state is not None
        dropped = self._db.end_rekey(gateway, drop=force)
        state.update(previous="dropped", seq=next_seq(int(state["seq"]), self._now_ms()),
                     finished_ms=self._now_ms())
        self._save(gateway, state)
        self._send_state(gateway, state)
        version = self._publisher.snapshot(gateway)
        log.warning("site_key_rotation_finished", gateway=gateway,
                    generation=state["generation"], entries_dropped=dropped if force else 0,
                    seq=state["seq"], list_version=version)
        return int(state["seq"])

    def _send_state(self, gateway: str, state: Mapping[str, Any]) -> None:
        """Send the ``site_key`` message ``state`` describes (sealed and signed anew)."""
        key = bytes.fromhex(Path(state["key_path"]).read_text("ascii").strip())
        sealed = bundles.seal_rotated_site_key(
            seal_public_key(self._keys.folder, gateway), key, gateway_id=gateway,
            generation=int(state["generation"]))
        now = int(self._clock())
        topic = Topics(gateway).inbound("site")
        self._send(topic, self._keys.sign(topic, SiteKey(
            type="site_key", gateway=gateway, seq=int(state["seq"]), issued_at=now,
            expires_at=now + self._publisher.ttl_s, generation=int(state["generation"]),
            sealed=sealed, previous=state["previous"])))

    # -- what gateways report ---------------------------------------------------------

    def on_status(self, gateway: str, versions: Mapping[str, int]) -> bool:
        """Send the latest ``site_key`` message again when the gateway's status shows it
        does not hold it (at most once per resend interval); True when sent."""
        state = self.state(gateway)
        if state is None or versions.get("site", 0) >= int(state["seq"]):
            return False
        now = self._clock()
        if now < self._resent.get(gateway, -math.inf) + self._resend_interval_s:
            return False
        self._resent[gateway] = now
        self._send_state(gateway, state)
        log.info("site_key_resent", gateway=gateway, seq=state["seq"],
                 held=versions.get("site", 0))
        return True

    def on_rekey(self, gateway: str, message: Rekey) -> int:
        """Move the reported cards to their new hashes and send the moved entries as a
        delta; returns how many entries moved. Pairs of another generation than the
        change-over in progress are ignored."""
        state = self.state(gateway)
        if (state is None or state["previous"] != "honoured"
                or message.generation != int(state["generation"])):
            log.warning("rekey_ignored", gateway=gateway, generation=message.generation,
                        reason="no change-over to this generation in progress")
            return 0
        pairs = [(unb64(old), unb64(new)) for old, new in message.pairs]
        moved, revocations = self._db.rekey(gateway, pairs, self._now_ms())
        if moved:
            allocated = self._db.allocate_delta(gateway, [new for _o, new in moved],
                                                self._now_ms())
            if allocated is not None:
                version, records = allocated
                self._publisher.send_delta(gateway, version.seq, records,
                                           [old for old, _n in moved], base=version.prev)
        log.info("cards_rekeyed", gateway=gateway, reported=len(pairs), entries=len(moved),
                 revocations=revocations, pending=self._db.rekey_pending(gateway))
        return len(moved)

    def status(self, gateway: str) -> dict[str, Any]:
        """What ``--status`` prints, as data."""
        known_gateway(self._db, gateway)
        state = self.state(gateway)
        record = self._db.gateway(gateway)
        held = 0
        if record is not None and record.status:
            value = json.loads(record.status).get("versions", {}).get("site", 0)
            held = value if isinstance(value, int) else 0
        if state is None:
            return {"gateway": gateway, "generation": 1, "changeover": False,
                    "held": True, "pending": 0}
        return {"gateway": gateway, "generation": int(state["generation"]),
                "changeover": state["previous"] == "honoured",
                "held": held >= int(state["seq"]), "pending": self._db.rekey_pending(gateway),
                "started_ms": state["started_ms"], "finished_ms": state["finished_ms"]}


# -- the command -------------------------------------------------------------------------


def add_site_key_command(sub: Any, common: argparse.ArgumentParser,
                         central: Callable[[argparse.Namespace], Central]) -> None:
    """Register ``rotate-site-key`` on ``permitgate-central``'s subparsers."""
    p = sub.add_parser("rotate-site-key", parents=[common], help="rotate a building's site "
                       "key: both keys honoured while tenants' cards are re-keyed as they "
                       "tap, then the old key dropped")
    p.add_argument("gateway", help="the gateway whose site key to rotate")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--status", action="store_true", help="the change-over's progress")
    what.add_argument("--finish", action="store_true", help="drop the previous key (once "
                      "every card was re-keyed, or with --force)")
    p.add_argument("--force", action="store_true", help="with --finish: even with cards "
                   "not re-keyed yet (they leave the list and must be enrolled again)")
    p.set_defaults(func=lambda args, out: cmd_rotate_site_key(args, out, central))


def cmd_rotate_site_key(args: argparse.Namespace, out: TextIO,
                        central: Callable[[argparse.Namespace], Central]) -> int:
    """One step of a site-key rotation (see the module docstring)."""
    if args.force and not args.finish:
        raise CentralUsageError("--force: only with --finish")
    with central(args) as office:
        if args.status:
            st = office.site_key_status(args.gateway)
            phase = ("change-over" if st["changeover"]
                     else "single key" if st["generation"] > 1 else "never rotated")
            out.write(f"{args.gateway}: site key generation {st['generation']} ({phase}); "
                      f"{'held by the gateway' if st['held'] else 'NOT yet held by the gateway'}"
                      f"; {st['pending']} card(s) still under the previous key\n")
            return 0
        if args.finish:
            seq = office.finish_site_key(args.gateway, force=args.force)
            out.write(f"{args.gateway}: previous site key dropped (site seq {seq}); the list "
                      "was sent again under the new key\n")
            return 0
        seq = office.start_site_key(args.gateway)
        st = office.site_key_status(args.gateway)
        out.write(f"{args.gateway}: site key generation {st['generation']} sent (site seq "
                  f"{seq}); both keys are honoured until 'rotate-site-key {args.gateway} "
                  f"--finish'. {st['pending']} card(s) will be re-keyed as they tap; "
                  f"'--status' shows how many are left\n")
    return 0
