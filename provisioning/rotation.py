"""Rotating the office's signing key without a gap in service (docs/protocol.md, "keys").

1. ``permitgate-central rotate-key [--kid NEW]`` makes a new signing key (``keygen``),
   listed in ``trusted-keys.txt`` after the key that signs, so the old key goes on signing,
   and announces both as ``active`` to every gateway (a ``keys`` message signed by the old
   key, which they trust).
2. ``rotate-key --status`` shows which gateways have applied the latest announcement.
3. ``rotate-key --retire OLD [--grace SECONDS]``, once every gateway has (or with
   ``--force``): the old key's line moves from ``trusted-keys.txt`` to
   ``retired-keys.txt`` and its private key to ``signing/retired/``, so the new key signs
   from now on, and an announcement signed by it lists the old one ``retired`` (or
   ``retiring`` until now + ``--grace``). A gateway then refuses the old key's messages.

``retired-keys.txt`` lines are ``<kid> <base64 public key> <not_after Unix s>``; every
announcement lists its keys as retired (``retiring`` while ``not_after`` is ahead), so a
gateway that still has the old key in its own ``trusted-keys.txt`` refuses it too. The
``keys`` stream has one seq for the whole office (database meta ``keys_seq``), numbered
like every other stream (``provisioning.db.seqs.next_seq``).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from protocol import ids
from protocol.messages import AnnouncedKey
from provisioning.errors import CentralUsageError
from provisioning.keys import SIGNING_DIR, TRUSTED_KEYS_NAME, keygen, listed_kids

if TYPE_CHECKING:
    from provisioning.central import Central
    from provisioning.db import OfficeDatabase

RETIRED_KEYS_NAME = "retired-keys.txt"
RETIRED_DIR = "retired"
KEYS_SEQ_KEY = "keys_seq"
"""Database meta: the seq of the latest ``keys`` announcement (one for every gateway)."""


def _lines(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [parts for line in path.read_text("utf-8").splitlines()
            if (parts := line.split("#", 1)[0].split())]


def retired_keys(folder: Path) -> list[tuple[str, str, int]]:
    """``(kid, base64 public key, not_after)`` of every retired key, oldest first."""
    return [(p[0], p[1], int(p[2])) for p in _lines(folder / RETIRED_KEYS_NAME)
            if len(p) == 3]


def announced_set(folder: Path, now: int) -> list[AnnouncedKey]:
    """What an announcement lists at ``now``: every key of ``trusted-keys.txt`` active,
    every retired key ``retiring`` (before its ``not_after``) or ``retired``."""
    keys = [AnnouncedKey(kid=p[0], public_key=p[1], state="active")
            for p in _lines(folder / TRUSTED_KEYS_NAME) if len(p) == 2]
    for kid, public, not_after in retired_keys(folder):
        if now < not_after:
            keys.append(AnnouncedKey(kid=kid, public_key=public, state="retiring",
                                     not_after=not_after))
        else:
            keys.append(AnnouncedKey(kid=kid, public_key=public, state="retired"))
    return keys


def next_kid(folder: Path) -> str:
    """A key id not used in ``folder`` yet: the newest listed one's number plus one
    (``central-1`` → ``central-2``)."""
    used = set(listed_kids(folder / TRUSTED_KEYS_NAME)) | {k for k, _p, _n in
                                                          retired_keys(folder)}
    kids = listed_kids(folder / TRUSTED_KEYS_NAME)
    match = re.fullmatch(r"(.*?)(\d+)", kids[-1]) if kids else None
    stem, number = (match.group(1), int(match.group(2))) if match else ("central-", 1)
    while f"{stem}{number}" in used or number < 2:
        number += 1
    return f"{stem}{number}"


def check_retire(folder: Path, kid: str) -> None:
    """Refuse (``CentralUsageError``) to retire ``kid`` unless it is listed and another
    listed key, with its private key here, can sign after it."""
    if not ids.KEY_ID_RE.match(kid):
        raise CentralUsageError(f"--retire {kid!r}: not a key id")
    kids = listed_kids(folder / TRUSTED_KEYS_NAME)
    if kid not in kids:
        raise CentralUsageError(f"--retire {kid}: not listed in {TRUSTED_KEYS_NAME}")
    if not any((folder / SIGNING_DIR / f"{k}.pem").exists() for k in kids if k != kid):
        raise CentralUsageError(f"--retire {kid}: no other key could sign; make one first "
                                "with 'permitgate-central rotate-key'")


def retire(folder: Path, kid: str, not_after: int) -> None:
    """Take ``kid`` out of ``trusted-keys.txt`` into ``retired-keys.txt`` and its private
    key into ``signing/retired/``: the next listed key signs from now on."""
    check_retire(folder, kid)
    trusted = folder / TRUSTED_KEYS_NAME
    lines = trusted.read_text("utf-8").splitlines(keepends=True)
    public = next(p[1] for p in _lines(trusted) if p[0] == kid)
    with (folder / RETIRED_KEYS_NAME).open("a", encoding="utf-8") as out:
        out.write(f"{kid} {public} {not_after}\n")
    kept = [line for line in lines if line.split("#", 1)[0].split()[:1] != [kid]]
    partial = trusted.with_name(trusted.name + ".new")
    partial.write_text("".join(kept), "utf-8")
    partial.replace(trusted)
    private = folder / SIGNING_DIR / f"{kid}.pem"
    if private.exists():
        (folder / SIGNING_DIR / RETIRED_DIR).mkdir(mode=0o700, exist_ok=True)
        private.replace(folder / SIGNING_DIR / RETIRED_DIR / f"{kid}.pem")


def key_versions(db: OfficeDatabase) -> dict[str, int]:
    """The ``keys`` seq each gateway holds, as far as the office knows: its latest
    ``applied`` report on the stream or its status's ``versions.keys`` (0: none)."""
    held: dict[str, int] = {}
    for row in db.gateways():
        status = json.loads(row.status) if row.status else {}
        reported = status.get("versions", {}).get("keys", 0)
        applied = [r.seq or 0 for r in db.applied(row.id)
                   if r.stream == "keys" and r.status == "applied"]
        held[row.id] = max([reported if isinstance(reported, int) else 0, *applied])
    return held


# -- the command -----------------------------------------------------------------------


def add_rotate_command(sub: Any, common: argparse.ArgumentParser,
                       central: Callable[[argparse.Namespace], Central]) -> None:
    """Register ``rotate-key`` on ``permitgate-central``'s subparsers."""
    p = sub.add_parser("rotate-key", parents=[common], help="rotate the office's signing "
                       "key: a new key announced to every gateway, then the old retired")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--retire", metavar="OLD", help="stop signing with OLD and announce "
                      "it retired (once every gateway applied the new key)")
    what.add_argument("--status", action="store_true", help="which gateways hold the "
                      "latest announcement")
    what.add_argument("--announce", action="store_true", help="announce the keys again")
    p.add_argument("--kid", help="the new key's id (default: the newest key id's number + 1)")
    p.add_argument("--grace", type=int, default=0, metavar="SECONDS", help="with --retire: "
                   "gateways still accept OLD for this long (default 0: refused at once)")
    p.add_argument("--force", action="store_true", help="with --retire: even if a gateway "
                   "has not applied the latest announcement")
    p.set_defaults(func=lambda args, out: cmd_rotate_key(args, out, central))


def cmd_rotate_key(args: argparse.Namespace, out: TextIO,
                   central: Callable[[argparse.Namespace], Central]) -> int:
    """One step of a signing key rotation (see the module docstring)."""
    if args.grace < 0:
        raise CentralUsageError("--grace: 0 or more seconds")
    with central(args) as office:
        if args.status:
            seq, held = office.key_rotation_state()
            out.write(f"keys announcement: seq {seq or 'none sent'}\n")
            for gw, version in sorted(held.items()):
                out.write(f"  {gw}: {'current' if version >= seq else 'behind'} "
                          f"(holds {version or 'none'})\n")
            return 0
        if args.retire is not None:
            seq, held = office.key_rotation_state()
            behind = sorted(gw for gw, v in held.items() if v < seq or not seq)
            if behind and not args.force:
                raise CentralUsageError(
                    f"--retire {args.retire}: not every gateway has applied keys seq "
                    f"{seq or '(none sent)'}: {', '.join(behind)}; they would refuse every "
                    "message signed by the new key (wait, 'rotate-key --announce', or "
                    "--force and install trusted-keys.txt on them by hand)")
            sent = office.retire_key(args.retire, args.grace)
            out.write(f"retired {args.retire}: the office now signs with "
                      f"{office.signing_kid()}; announced as keys seq {sent}\n")
            return 0
        if not args.announce:
            made = keygen(office.folder, args.kid or next_kid(office.folder))
            out.write(f"wrote signing key {made.kid} to {made.private_key} (mode 0600); the "
                      f"office signs with {office.signing_kid()} until it is retired\n")
        sent = office.announce_keys()
        out.write(f"announced the keys to every gateway as keys seq {sent}; when "
                  "'rotate-key --status' shows every gateway current, run 'rotate-key "
                  "--retire OLD'\n")
    return 0
