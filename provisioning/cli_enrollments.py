"""``permitgate-central enrollments``, ``confirm``, ``reject`` and ``policy``: the
enrollments landlords make at gateways (registered by provisioning/central_cli.py, which
passes in how it opens a ``Central``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from provisioning.central import ENROLLMENT_POLICIES, Central

OpenCentral = Callable[[argparse.Namespace], Central]
EXIT_OK = 0


def add_enrollment_commands(sub: Any, common: argparse.ArgumentParser,
                            central: OpenCentral) -> None:
    """Register ``enrollments``, ``confirm``, ``reject`` and ``policy`` on
    ``permitgate-central``'s subparsers."""
    p = sub.add_parser("enrollments", parents=[common],
                       help="enrollments made at gateways")
    p.add_argument("gateway", metavar="GW", nargs="?", help="one gateway (default all)")
    p.add_argument("--status", choices=("received", "held", "confirmed", "rejected", "ended"))
    p.add_argument("--reveal", action="store_true",
                   help="show permit numbers (for the registry comparison)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=lambda args, out: cmd_enrollments(args, out, central))

    p = sub.add_parser("confirm", parents=[common], help="confirm an enrollment")
    p.add_argument("gateway", metavar="GW")
    p.add_argument("enrollment", metavar="ENROLLMENT_ID")
    p.set_defaults(func=lambda args, out: cmd_confirm(args, out, central))

    p = sub.add_parser("reject", parents=[common], help="reject an enrollment")
    p.add_argument("gateway", metavar="GW")
    p.add_argument("enrollment", metavar="ENROLLMENT_ID")
    p.add_argument("--reason", default="officer",
                   help="a word the gateway records (default officer)")
    p.set_defaults(func=lambda args, out: cmd_reject(args, out, central))

    p = sub.add_parser("policy", parents=[common], help="show or set the office's policy")
    p.add_argument("setting", choices=("enrollments",))
    p.add_argument("value", nargs="?", choices=ENROLLMENT_POLICIES,
                   help="auto: confirm what checks out; hold: wait for an officer")
    p.set_defaults(func=lambda args, out: cmd_policy(args, out, central))


def cmd_enrollments(args: argparse.Namespace, out: TextIO, central: OpenCentral) -> int:
    """Enrollments made at gateways (``--status held``: those waiting for an officer)."""
    with central(args) as office:
        found = office.enrollments(args.gateway, args.status, reveal=args.reveal)
    for e in found:
        if args.json:
            out.write(json.dumps(e, sort_keys=True) + "\n")
            continue
        reason = f" ({e['reason']})" if e["reason"] else ""
        lease = ("?" if e["lease_end"] is None else
                 datetime.fromtimestamp(e["lease_end"], UTC).date().isoformat())
        permit = f"  permit {e['permit']}" if e["permit"] else ""
        elsewhere = f"  also listed at {','.join(e['elsewhere'])}" if e["elsewhere"] else ""
        out.write(f"{e['gateway']}  {e['enrollment']}  unit {e['unit']}  card {e['cred']}  "
                  f"{e['status']}{reason}  lease end {lease}{permit}{elsewhere}\n")
    if not found and not args.json:
        out.write("no enrollments\n")
    return EXIT_OK


def cmd_confirm(args: argparse.Namespace, out: TextIO, central: OpenCentral) -> int:
    """Confirm an enrollment: the card into the gateway's list, then the decision."""
    with central(args) as office:
        sent = office.confirm_enrollment(args.gateway, args.enrollment)
    listed = f"list version {sent['list']}, " if "list" in sent else ""
    out.write(f"confirmed enrollment {args.enrollment} at {args.gateway} ({listed}"
              f"decision enr seq {sent['enr']})\n")
    return EXIT_OK


def cmd_reject(args: argparse.Namespace, out: TextIO, central: OpenCentral) -> int:
    """Reject an enrollment (a confirmed one's card leaves the list), then the decision."""
    with central(args) as office:
        sent = office.reject_enrollment(args.gateway, args.enrollment, args.reason)
    listed = f"list version {sent['list']}, " if "list" in sent else ""
    out.write(f"rejected enrollment {args.enrollment} at {args.gateway} ({args.reason}; "
              f"{listed}decision enr seq {sent['enr']})\n")
    return EXIT_OK


def cmd_policy(args: argparse.Namespace, out: TextIO, central: OpenCentral) -> int:
    """Show or set the office's policy for enrollments made at gateways."""
    with central(args) as office:
        before = office.enrollment_policy()
        if args.value is not None:
            office.set_enrollment_policy(args.value)
    if args.value is None or args.value == before:
        out.write(f"enrollments: {before}\n")
    else:
        out.write(f"enrollments: {args.value} (was {before}); held enrollments stay held\n")
    return EXIT_OK
