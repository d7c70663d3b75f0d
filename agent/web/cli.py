"""``permitgate-web``: serve the landlord page, and manage its accounts.

    permitgate-web run [-c CONFIG]
    permitgate-web users init [--role landlord|installer]   # a one-time code, 15 minutes
    permitgate-web users add NAME [--role ROLE] [--password-stdin]
    permitgate-web users list [--json]
    permitgate-web users passwd NAME [--password-stdin]
    permitgate-web users role NAME ROLE
    permitgate-web users delete NAME

There is no default password: the first account is made on the page's sign-up form with
a code that ``users init`` prints. Each account change is recorded in the agent's event
log (through web.db's outbox when the agent is not running). ``-c`` defaults to
``$PERMITGATE_CONFIG``. Exit status: 0 done, 1 failed, 2 unusable input.
``add_users_arguments`` and ``users_command`` let ``permitgate users`` offer the same.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import TextIO

from agent.web import auth
from agent.web.agentlink import AgentLink, AgentUnavailable
from agent.web.db import DatabaseError, WebDB
from agent.web.settings import ENV_VAR, Settings, SettingsError


class UsageError(Exception):
    """Unusable input: exit 2."""


def _settings(args: argparse.Namespace) -> Settings:
    from agent.config import ConfigError, load_config  # noqa: PLC0415 - pydantic: CLI only
    from agent.web.settings import from_config  # noqa: PLC0415

    raw = getattr(args, "config", None) or os.environ.get("PERMITGATE_CONFIG")
    path = Path(raw) if raw else None
    try:
        return from_config(load_config(path), path)
    except (ConfigError, SettingsError) as exc:
        raise UsageError(str(exc)) from exc


def _open(settings: Settings) -> WebDB:
    try:
        return WebDB(settings.db_path)
    except DatabaseError as exc:
        raise UsageError(str(exc)) from exc


def _match_owner(settings: Settings) -> None:
    """Run as root, hand web.db's files to the owner of the state folder (the page's
    service user), who must go on writing them."""
    if os.geteuid() != 0:
        return
    folder = Path(settings.state_dir)
    if not folder.is_dir():
        return
    owner = folder.stat()
    for name in ("web.db", "web.db-wal", "web.db-shm"):
        path = folder / name
        if path.exists():
            os.chown(path, owner.st_uid, owner.st_gid)


def _audit(settings: Settings, db: WebDB, kind: str, account: str, out: TextIO,
           **data: object) -> None:
    db.queue_audit({"op": "audit", "kind": kind, "account": account,
                    "data": {"via": "cli", **data}})
    link = AgentLink(Path(settings.agent_socket), timeout=2.0)
    try:
        for audit_id, message in db.pending_audits():
            reply = link.call_sync(message)
            if not reply.get("ok") and reply.get("error") in ("unknown_op", "busy", "internal"):
                raise AgentUnavailable(str(reply.get("message")))
            db.audit_sent(audit_id)
    except AgentUnavailable:
        print("note: the agent is not answering; this change goes into its event log "
              "when the page next reaches it", file=out)


def _password(args: argparse.Namespace, name: str) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {name}: ")
        if password != getpass.getpass("again: "):
            raise UsageError("the two passwords differ")
    try:
        return auth.check_password(password, name)
    except auth.InputError as exc:
        raise UsageError(str(exc)) from exc


def _name(raw: str) -> str:
    try:
        return auth.check_name(raw)
    except auth.InputError as exc:
        raise UsageError(f"{raw!r}: {exc}") from exc


def users_command(args: argparse.Namespace, out: TextIO) -> int:
    """Carry out ``users <action>``."""
    settings = _settings(args)
    db = _open(settings)
    try:
        return _users(args, settings, db, out)
    finally:
        db.close()
        _match_owner(settings)


def _users(args: argparse.Namespace, settings: Settings, db: WebDB, out: TextIO) -> int:
    action = args.action
    if action == "init":
        code = auth.new_setup_code()
        expires = db.add_setup_code(auth.normalise_code(code), args.role,
                                    auth.CODE_VALID_S * 1000)
        until = datetime.fromtimestamp(expires / 1000).astimezone().strftime("%H:%M")
        print(f"one-time code for a new {args.role} account: {code}", file=out)
        print(f"open the page, choose 'Create an account', and enter it before {until} "
              f"({auth.CODE_VALID_S // 60} minutes)", file=out)
        return 0
    if action == "list":
        users = db.users()
        if args.json:
            print(json.dumps([{"name": u.name, "role": u.role, "created_ms": u.created_ms,
                               "changed_ms": u.changed_ms} for u in users]), file=out)
        else:
            for u in users:
                print(f"{u.name:<32} {u.role}", file=out)
            if not users:
                print("no accounts (make the first with 'permitgate-web users init')",
                      file=out)
        return 0
    name = _name(args.name)
    if action == "add":
        pw_hash = auth.hash_password(_password(args, name))
        try:
            db.add_user(name, args.role, pw_hash)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        _audit(settings, db, "web_account_created", name, out, role=args.role)
        print(f"added {name} ({args.role})", file=out)
        return 0
    if db.user(name) is None:
        raise UsageError(f"no account called {name!r}")
    if action == "passwd":
        db.change_user(name, pw_hash=auth.hash_password(_password(args, name)))
        _audit(settings, db, "web_account_changed", name, out, change="password")
        print(f"password of {name} changed; its sessions ended", file=out)
    elif action == "role":
        db.change_user(name, role=args.new_role)
        _audit(settings, db, "web_account_changed", name, out, change="role",
               role=args.new_role)
        print(f"{name} is now {args.new_role}; its sessions ended", file=out)
    else:
        db.delete_user(name)
        _audit(settings, db, "web_account_deleted", name, out)
        print(f"deleted {name}; its sessions ended", file=out)
    return 0


def add_users_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``users`` sub-commands, on ``parser``."""
    parser.add_argument("-c", "--config", default=argparse.SUPPRESS,
                        help="configuration file ($PERMITGATE_CONFIG)")
    actions = parser.add_subparsers(dest="action", required=True)
    init = actions.add_parser("init", help="print a one-time code for a new account")
    init.add_argument("--role", choices=auth.ROLES, default="landlord")
    add = actions.add_parser("add", help="add an account with a password")
    add.add_argument("name")
    add.add_argument("--role", choices=auth.ROLES, default="landlord")
    add.add_argument("--password-stdin", action="store_true")
    lst = actions.add_parser("list", help="list the accounts")
    lst.add_argument("--json", action="store_true")
    passwd = actions.add_parser("passwd", help="set an account's password")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true")
    role = actions.add_parser("role", help="change an account's role")
    role.add_argument("name")
    role.add_argument("new_role", choices=auth.ROLES)
    delete = actions.add_parser("delete", help="delete an account")
    delete.add_argument("name")


def run_command(args: argparse.Namespace) -> int:
    """Validate the configuration, then become the server process (same pid)."""
    settings = _settings(args)
    env = {**os.environ, ENV_VAR: settings.to_json()}
    os.execve(sys.executable, [sys.executable, "-m", "agent.web.serve"], env)  # noqa: S606 - this very interpreter
    return 1  # not reached


def parser() -> argparse.ArgumentParser:
    """The command line."""
    top = argparse.ArgumentParser(prog="permitgate-web", description=__doc__.split("\n")[0])
    top.add_argument("-c", "--config", help="configuration file ($PERMITGATE_CONFIG)")
    commands = top.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="serve the page until SIGTERM")
    run.add_argument("-c", "--config", default=argparse.SUPPRESS,
                     help="configuration file ($PERMITGATE_CONFIG)")
    add_users_arguments(commands.add_parser("users", help="manage the page's accounts"))
    return top


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of ``permitgate-web``."""
    args = parser().parse_args(argv)
    stream = out or sys.stdout
    try:
        if args.command == "run":
            return run_command(args)
        return users_command(args, stream)
    except UsageError as exc:
        print(f"permitgate-web: {exc}", file=sys.stderr)
        return 2
    except (DatabaseError, OSError) as exc:
        print(f"permitgate-web: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
