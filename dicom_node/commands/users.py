"""``fpe-node users``: the people who may use the console and REST API.

Passwords are read from a prompt (typed twice) or, for scripts, from the first line of standard
input with ``--password-stdin``; never from an argument (it would show in ``ps`` and the shell
history). Every change is audited with the command, the OS user and ``local`` as the source::

    fpe-node users add admin --role admin
    printf '%s\\n' "$PASSWORD" | fpe-node users add alice --role operator --password-stdin
    fpe-node users list [--json]
    fpe-node users passwd alice [--password-stdin]
    fpe-node users change alice [--role viewer] [--disable | --enable] [--unlock]
    fpe-node users remove alice
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from dicom_node.audit import LOCAL_SOURCE
from dicom_node.peers import actor_for
from dicom_node.settings import Settings

ROLES = ("viewer", "operator", "admin")


def register(subparsers: Any) -> None:
    """Add ``users`` and its actions."""
    parser = subparsers.add_parser("users", help="add, list, change or remove console and API users")
    actions = parser.add_subparsers(dest="users_action", metavar="ACTION")
    actions.required = True

    add = actions.add_parser("add", help="create a user (the first admin: fpe-node users add admin --role admin)")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, required=True, help="viewer (read only), operator (study actions), admin")
    add.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")

    listing = actions.add_parser("list", help="show every user")
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    passwd = actions.add_parser("passwd", help="set a user's password (ends its sessions)")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")

    change = actions.add_parser("change", help="change a user's role, disable or enable it, lift a lock-out")
    change.add_argument("name")
    change.add_argument("--role", choices=ROLES)
    enabled = change.add_mutually_exclusive_group()
    enabled.add_argument("--disable", dest="disabled", action="store_const", const=True, help="refuse its logins and tokens")
    enabled.add_argument("--enable", dest="disabled", action="store_const", const=False)
    change.add_argument("--unlock", action="store_true", help="lift a lock-out after failed logins")

    remove = actions.add_parser("remove", help="remove a user with its sessions and API tokens")
    remove.add_argument("name")
    parser.set_defaults(func=run)


def read_password(from_stdin: bool) -> str:
    """The new password: the first line of stdin, or typed twice at a prompt."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Password again: ") != first:
        raise ValueError("the passwords differ")
    return first


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Dispatch to the action; 0 on success, 1 on a refused change."""
    from dicom_node.index.db import build_engine, build_session_factory, upgrade_to_head
    from dicom_node.web import auth
    from dicom_node.web.context import WebContext

    engine = build_engine(settings)
    try:
        upgrade_to_head(engine)
        context = WebContext(settings=settings, session_factory=build_session_factory(engine))
        actor = actor_for(f"fpe-node users {args.users_action}")
        if args.users_action == "list":
            _list(context, args.json)
        elif args.users_action == "add":
            auth.add_user(context, args.name, args.role, read_password(args.password_stdin), actor=actor, source=LOCAL_SOURCE)
            print(f"user {args.name} added ({args.role})")
        elif args.users_action == "passwd":
            auth.change_user(context, args.name, password=read_password(args.password_stdin), actor=actor, source=LOCAL_SOURCE)
            print(f"password of {args.name} changed")
        elif args.users_action == "change":
            auth.change_user(context, args.name, role=args.role, disabled=args.disabled, unlock=args.unlock, actor=actor,
                             source=LOCAL_SOURCE)
            print(f"user {args.name} changed")
        else:
            auth.remove_user(context, args.name, actor=actor, source=LOCAL_SOURCE)
            print(f"user {args.name} removed")
    except (auth.UserError, ValueError) as exc:
        print(f"fpe-node users: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    return 0


def _list(context: Any, as_json: bool) -> None:
    from dicom_node.web import auth

    users = auth.list_users(context)
    if as_json:
        print(json.dumps([
            {"name": u.name, "role": u.role.name, "created_at": u.created_at.isoformat(), "disabled": u.disabled,
             "locked_until": None if u.locked_until is None else u.locked_until.isoformat()}
            for u in users
        ], indent=2))
        return
    if not users:
        print("no users (create the first admin: fpe-node users add admin --role admin)")
        return
    print(f"{'NAME':<24} {'ROLE':<9} {'CREATED (UTC)':<20} STATE")
    for user in users:
        state = "disabled" if user.disabled else ("locked" if user.locked_until else "active")
        print(f"{user.name:<24} {user.role.name:<9} {user.created_at:%Y-%m-%d %H:%M:%S}  {state}")
