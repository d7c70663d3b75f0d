"""``permitgate provision``: the installer's side of bringing a gateway up
(``agent.provision``), with the fingerprint shown as text and as a QR code."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from agent import provision as prov
from agent import qrcode
from agent import renew as renewal
from agent.provision_config import EXAMPLE
from protocol import bundles

DEFAULT_DIR = Path("/etc/permitgate")
_SITE_OPTIONS = ("gateway_id", "site_id", "broker_host", "timezone", "store", "bundle",
                 "example")


def add_provision_command(sub: Any) -> None:
    """Register ``provision`` on ``permitgate``'s subparsers."""
    p = sub.add_parser("provision", help="make this gateway's keys, configuration and "
                       "request for the office; --accept installs the office's response")
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="the configuration folder "
                   f"(default {DEFAULT_DIR}); keys go to its credentials/ folder")
    p.add_argument("--gateway-id", help="this gateway's id, as the office knows it")
    p.add_argument("--site-id", help="the building's id, as the office knows it")
    p.add_argument("--broker-host", help="the office's MQTT broker (a name in its "
                   "certificate)")
    p.add_argument("--broker-port", type=int, default=8883, help="default 8883")
    p.add_argument("--timezone", help="the site's time zone (default: the example's)")
    p.add_argument("--store", help="[store] path (default: the example's)")
    p.add_argument("--example", type=Path, help=f"the configuration to start from "
                   f"(default {EXAMPLE})")
    p.add_argument("--bundle", type=Path, help="where to write the request (default "
                   f"DIR/{prov.REQUEST_NAME})")
    p.add_argument("--force", action="store_true", help="replace existing keys and "
                   "configuration")
    p.add_argument("--accept", type=Path, metavar="RESPONSE", help="install the office's "
                   "response to this gateway's request, or its answer to a renewal")
    p.add_argument("--renew", action="store_true", help="make a new TLS key and a renewal "
                   "request signed with this gateway's signing key (the current certificate "
                   "stays in use until --accept installs the new one)")
    p.add_argument("--office-fingerprint", metavar="FP", help="with --accept: refuse a "
                   "response whose office fingerprint is not FP")
    p.add_argument("--no-qr", action="store_true", help="print the fingerprint without its "
                   "QR code")
    p.set_defaults(func=cmd_provision)


def cmd_provision(args: argparse.Namespace, out: TextIO) -> int:
    """Provision this gateway, or with ``--accept`` install the office's response."""
    if args.accept is not None or args.renew:
        option = "--accept" if args.accept is not None else "--renew"
        given = [f"--{o.replace('_', '-')}" for o in _SITE_OPTIONS
                 if getattr(args, o) is not None and (o != "bundle" or not args.renew)]
        if args.accept is not None and args.renew:
            given.append("--renew")
        if given or args.force:
            raise prov.ProvisionError(f"{option} takes none of "
                                      f"{', '.join(given or ['--force'])} (the keys and "
                                      "configuration are made already)")
        if args.renew:
            return _renew(args, out)
        return _accept(args, out)
    if args.office_fingerprint is not None:
        raise prov.ProvisionError("--office-fingerprint goes with --accept")
    missing = [f"--{o.replace('_', '-')}" for o in ("gateway_id", "site_id", "broker_host")
               if getattr(args, o) is None]
    if missing:
        raise prov.ProvisionError(f"provision: give {', '.join(missing)}")
    site = prov.Site(args.gateway_id, args.site_id, args.broker_host, args.broker_port,
                     args.timezone, args.store)
    done = prov.provision(args.dir, site, example=args.example or EXAMPLE,
                          bundle=args.bundle, force=args.force)
    request = done.request
    creds = prov.credentials(args.dir)
    out.write(f"provisioned gateway {request.gateway_id} of site {request.site_id}\n"
              f"  keys         {', '.join(p.name for p in done.keys)} in {creds} (mode 0600; "
              "they never leave this gateway)\n"
              f"  config       {done.config} (broker {site.broker_host}:{site.broker_port}; "
              "edit its doors and readers)\n"
              f"  request      {done.bundle}: take it to the office\n\n"
              f"fingerprint  {request.fingerprint}\n"
              "Read it to the office, or let it scan this code; the office registers the "
              "request only if they match.\n")
    if not args.no_qr:
        matrix = qrcode.encode(bundles.qr_text(request.gateway_id, request.fingerprint))
        out.write(qrcode.render(matrix, ansi=out is sys.stdout and sys.stdout.isatty()))
    out.write(f"\nThen: permitgate provision --dir {args.dir} --accept RESPONSE (the file "
              "the office gives back)\n")
    return 0


def _renew(args: argparse.Namespace, out: TextIO) -> int:
    if args.office_fingerprint is not None:
        raise prov.ProvisionError("--office-fingerprint goes with --accept")
    done = renewal.renew(args.dir, bundle=args.bundle)
    out.write(f"renewal for gateway {done.request.gateway_id}: a new TLS key in {done.key} "
              f"(mode 0600)\n"
              f"  current      certificate valid until {done.current_not_after:%Y-%m-%d} UTC, "
              "in use until the new one is installed\n"
              f"  request      {done.bundle}: signed with this gateway's signing key; take "
              "it to the office (permitgate-central register-gateway --renew)\n"
              f"renewal      {done.request.fingerprint}\n\n"
              f"Then: permitgate provision --dir {args.dir} --accept RESPONSE, and restart "
              "the agent (systemctl restart permitgate): it loads its certificate when it "
              "starts.\n")
    return 0


def _accept_renewal(args: argparse.Namespace, data: bytes, out: TextIO) -> int:
    if args.office_fingerprint is not None:
        raise prov.ProvisionError("--office-fingerprint: a renewal's answer is checked "
                                  "against the CA installed already; give it without")
    done = renewal.accept_renewal(args.dir, args.accept, data)
    out.write(f"installed the renewed certificate of gateway {done.gateway_id}: "
              f"{done.certificate} (serial {done.serial:x}, valid until "
              f"{done.not_after:%Y-%m-%d} UTC) and its key {done.key}\n\n"
              "The agent loads them when it starts: systemctl restart permitgate (the "
              "running agent keeps the old certificate until then).\n")
    return 0


def _accept(args: argparse.Namespace, out: TextIO) -> int:
    try:
        data = args.accept.read_bytes()
    except OSError as exc:
        raise prov.ProvisionError(f"{args.accept}: cannot read it: {exc.strerror}") from None
    if bundles.bundle_format(data) == bundles.RENEWED_FORMAT:
        return _accept_renewal(args, data, out)
    done = prov.accept(args.dir, args.accept, office_fingerprint=args.office_fingerprint)
    creds = prov.credentials(args.dir)
    names = [p.name for p in done.installed]
    out.write(f"installed for gateway {done.gateway_id}: {', '.join(names)} in {creds} "
              f"(mode 0600)\n"
              f"  certificate  valid until {done.not_after:%Y-%m-%d} UTC\n"
              f"  config       {done.config}: [sync] and [keys] name them\n"
              f"office fingerprint  {done.office_fingerprint}"
              f"{' (as given)' if args.office_fingerprint else ': compare it with the office'}"
              "\n\nUnder systemd the agent reads them as credentials; add to the unit "
              "(sudo systemctl edit permitgate):\n[Service]\n")
    creds = creds.resolve()
    # The shipped unit loads site.key already; the gateway's own private keys stay here.
    for name in [prov.TLS_KEY, prov.SIGNING_KEY, prov.SEAL_KEY, *names]:
        if name != prov.SITE_KEY:
            out.write(f"LoadCredential={name}:{creds / name}\n")
    out.write("IPAddressAllow=<the broker's address>\n\nThen: permitgate check-config, and "
              "systemctl restart permitgate.\n")
    return 0
