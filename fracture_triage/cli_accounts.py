"""``fracture-triage user``, ``token``, ``audit`` and ``calibrate``: accounts, API tokens, the
audit trail and the site threshold proposal of the web application, run on the node's
machine (whoever can run these can read the database anyway). Secrets are printed once and
stored as hashes only (``db.accounts``).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from fracture_triage.settings import Settings

#: The commands this module adds (their database is migrated first, like the roles').
COMMANDS = ("user", "token", "audit", "calibrate")


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    user = sub.add_parser("user", help="web application accounts: add, list, disable")
    user_sub = user.add_subparsers(dest="user_command", metavar="USER_COMMAND", required=True)
    add = user_sub.add_parser(
        "add", help="add an account; the password is read from standard input"
    )
    common(add)
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=["radiologist", "admin"])
    add.add_argument(
        "--generate-password",
        action="store_true",
        help="generate a password and print it once instead of reading one",
    )
    add.set_defaults(handler=cmd_user_add)
    listing = user_sub.add_parser("list", help="list the accounts")
    common(listing)
    listing.set_defaults(handler=cmd_user_list)
    disable = user_sub.add_parser("disable", help="disable an account and end its sessions")
    common(disable)
    disable.add_argument("name")
    disable.set_defaults(handler=cmd_user_disable)

    token = sub.add_parser("token", help="API tokens for machines: create, revoke, list")
    token_sub = token.add_subparsers(dest="token_command", metavar="TOKEN_COMMAND", required=True)
    create = token_sub.add_parser("create", help="create a token and print it once")
    common(create)
    create.add_argument("name")
    create.add_argument("--role", required=True, choices=["radiologist", "admin"])
    create.set_defaults(handler=cmd_token_create)
    revoke = token_sub.add_parser("revoke", help="revoke a token (refused from then on)")
    common(revoke)
    revoke.add_argument("name")
    revoke.set_defaults(handler=cmd_token_revoke)
    tlist = token_sub.add_parser("list", help="list the tokens (names, never the secrets)")
    common(tlist)
    tlist.set_defaults(handler=cmd_token_list)

    audit = sub.add_parser("audit", help="print the audit trail, newest first")
    common(audit)
    audit.add_argument("--limit", type=int, default=50)
    audit.add_argument("--action", help="only this action (login, login_failed, verdict, ...)")
    audit.add_argument("--study", metavar="STUDY_INSTANCE_UID")
    audit.add_argument("--json", action="store_true", help="one JSON object per line")
    audit.set_defaults(handler=cmd_audit)

    calibrate = sub.add_parser(
        "calibrate",
        help="propose a site threshold from the radiologists' verdicts (shown, not applied)",
    )
    common(calibrate)
    calibrate.add_argument("--target-sensitivity", type=float, default=0.95)
    calibrate.add_argument("--json", action="store_true")
    calibrate.set_defaults(handler=cmd_calibrate)


def _in_session(settings: Settings, work: Callable[[Any], int]) -> int:
    from db.accounts import AccountError
    from db.session import make_engine, make_session_factory

    engine = make_engine(settings.resolved_database_url)
    try:
        with make_session_factory(engine)() as session:
            try:
                code = work(session)
            except AccountError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            session.commit()
            return code
    finally:
        engine.dispose()


def _operator() -> str:
    """Who ran the command, for the audit trail."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid{os.getuid()}"


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise ValueError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def cmd_user_add(args: argparse.Namespace, settings: Settings) -> int:
    from db import accounts, audit

    if args.generate_password:
        password = accounts.generate_password()
    else:
        try:
            password = _read_password()
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if not password:
            print(
                "error: no password on standard input (or use --generate-password)",
                file=sys.stderr,
            )
            return 1

    def work(session: Any) -> int:
        user = accounts.add_user(session, args.name, accounts.parse_role(args.role), password)
        audit.record(session, _operator(), audit.ACCOUNT, detail=f"user add {user.name}")
        return 0

    code = _in_session(settings, work)
    if code == 0:
        print(f"user {args.name} added ({args.role})")
        if args.generate_password:
            print(f"password (shown once): {password}")
    return code


def cmd_user_list(args: argparse.Namespace, settings: Settings) -> int:
    from db import accounts

    def work(session: Any) -> int:
        for user in accounts.list_users(session):
            state = "disabled" if user.disabled_at else "active"
            print(f"{user.name}\t{user.role.value}\t{state}\tcreated {user.created_at:%Y-%m-%d}")
        return 0

    return _in_session(settings, work)


def cmd_user_disable(args: argparse.Namespace, settings: Settings) -> int:
    from db import accounts, audit

    def work(session: Any) -> int:
        accounts.disable_user(session, args.name)
        audit.record(session, _operator(), audit.ACCOUNT, detail=f"user disable {args.name}")
        print(f"user {args.name} disabled; its sessions ended")
        return 0

    return _in_session(settings, work)


def cmd_token_create(args: argparse.Namespace, settings: Settings) -> int:
    from db import accounts, audit

    secrets: list[str] = []

    def work(session: Any) -> int:
        _, secret = accounts.create_token(session, args.name, accounts.parse_role(args.role))
        audit.record(session, _operator(), audit.ACCOUNT, detail=f"token create {args.name}")
        secrets.append(secret)
        return 0

    code = _in_session(settings, work)
    if code == 0:
        print(f"token {args.name} created ({args.role}); shown once, only its hash is kept:")
        print(secrets[0])
    return code


def cmd_token_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from db import accounts, audit

    def work(session: Any) -> int:
        accounts.revoke_token(session, args.name)
        audit.record(session, _operator(), audit.ACCOUNT, detail=f"token revoke {args.name}")
        print(f"token {args.name} revoked")
        return 0

    return _in_session(settings, work)


def cmd_token_list(args: argparse.Namespace, settings: Settings) -> int:
    from db import accounts

    def work(session: Any) -> int:
        for token in accounts.list_tokens(session):
            state = "revoked" if token.revoked_at else "active"
            print(f"{token.name}\t{token.role.value}\t{state}\tcreated {token.created_at:%Y-%m-%d}")
        return 0

    return _in_session(settings, work)


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    from db import audit
    from db.repository import as_utc

    def work(session: Any) -> int:
        found = audit.events(
            session, limit=args.limit, action=args.action, study_instance_uid=args.study
        )
        for e in found:
            row = {
                "at": as_utc(e.at).isoformat(timespec="seconds"),
                "actor": e.actor,
                "action": e.action,
                "study_instance_uid": e.study_instance_uid,
                "detail": e.detail,
                "client_address": e.client_address,
            }
            if args.json:
                print(json.dumps(row))
            else:
                cells = [row["at"], e.actor, e.action, e.study_instance_uid or "-"]
                cells += [e.client_address or "-", e.detail or ""]
                print("  ".join(str(c) for c in cells))
        return 0

    return _in_session(settings, work)


def cmd_calibrate(args: argparse.Namespace, settings: Settings) -> int:
    """The highest study threshold keeping the target sensitivity on the reviewed studies,
    beside the model's own figures. Nothing is changed: the threshold is the model card's."""
    from db import performance

    if not 0 < args.target_sensitivity <= 1:
        print("error: --target-sensitivity must be in (0, 1]", file=sys.stderr)
        return 2

    def work(session: Any) -> int:
        found = performance.cases(session)
        current = performance.confusion(found)
        proposal = performance.propose_threshold(found, args.target_sensitivity)
        if args.json:
            print(json.dumps({"current": current, "proposal": proposal}))
            return 0 if proposal else 1
        print(f"{current['cases']} reviewed studies with a model decision")
        print(f"model as configured: {_rates(current)}")
        if proposal is None:
            print("no verdict of fracture yet: no threshold can be proposed")
            return 1
        print(
            f"proposed threshold {proposal['threshold']:.4f} for sensitivity >= "
            f"{args.target_sensitivity:g}: {_rates(proposal)}"
        )
        print("not applied: the node keeps the model card's threshold")
        return 0

    return _in_session(settings, work)


def _rates(c: dict[str, Any]) -> str:
    def one(name: str) -> str:
        r = c[name]
        if r["value"] is None:
            return f"{name} -"
        return f"{name} {r['value']:.3f} ({r['low']:.3f}-{r['high']:.3f})"

    parts = [one("sensitivity"), one("specificity"), one("ppv")]
    return ", ".join(parts) + f" [TP {c['tp']} FP {c['fp']} TN {c['tn']} FN {c['fn']}]"
