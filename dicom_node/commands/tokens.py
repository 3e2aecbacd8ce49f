"""``fpe-node tokens``: API tokens for scripts (``Authorization: Bearer fpe_...``).

A token belongs to a user and acts with its own role, never above the owner's. The secret is
printed once, when the token is made; the index keeps only its SHA-256 digest::

    fpe-node tokens add alice --name nightly-report [--role viewer] [--expires-days 90]
    fpe-node tokens list [--owner alice] [--json]
    fpe-node tokens remove ID
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dicom_node.audit import LOCAL_SOURCE
from dicom_node.peers import actor_for
from dicom_node.settings import Settings


def register(subparsers: Any) -> None:
    """Add ``tokens`` and its actions."""
    parser = subparsers.add_parser("tokens", help="add, list or revoke API tokens")
    actions = parser.add_subparsers(dest="tokens_action", metavar="ACTION")
    actions.required = True

    add = actions.add_parser("add", help="make a token (its secret is printed once)")
    add.add_argument("owner", help="the user the token acts for")
    add.add_argument("--name", required=True, help="what the token is for")
    add.add_argument("--role", choices=("viewer", "operator", "admin"), help="default: the owner's role")
    add.add_argument("--expires-days", type=float, help="lifetime in days (default: until revoked)")

    listing = actions.add_parser("list", help="show the tokens (never their secrets)")
    listing.add_argument("--owner")
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    remove = actions.add_parser("remove", help="revoke a token")
    remove.add_argument("id", type=int)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Dispatch to the action; 0 on success, 1 on a refused change."""
    from dicom_node.index.db import build_engine, build_session_factory, upgrade_to_head
    from dicom_node.web import auth
    from dicom_node.web.context import WebContext

    engine = build_engine(settings)
    try:
        upgrade_to_head(engine)
        context = WebContext(settings=settings, session_factory=build_session_factory(engine))
        actor = actor_for(f"fpe-node tokens {args.tokens_action}")
        if args.tokens_action == "add":
            info, secret = auth.add_token(context, args.owner, args.name, args.role, expires_days=args.expires_days,
                                          actor=actor, source=LOCAL_SOURCE)
            print(f"token {info.id} ({info.name}, {info.role.name}) of {info.owner}; keep it, it is not shown again:")
            print(secret)
        elif args.tokens_action == "list":
            tokens = auth.list_tokens(context, args.owner)
            if args.json:
                print(json.dumps([
                    {"id": t.id, "name": t.name, "owner": t.owner, "role": t.role.name, "created_at": t.created_at.isoformat(),
                     "last_used_at": t.last_used_at and t.last_used_at.isoformat(),
                     "expires_at": t.expires_at and t.expires_at.isoformat()}
                    for t in tokens
                ], indent=2))
            elif not tokens:
                print("no API tokens")
            else:
                print(f"{'ID':>4}  {'NAME':<24} {'OWNER':<20} {'ROLE':<9} EXPIRES (UTC)")
                for t in tokens:
                    expires = "-" if t.expires_at is None else f"{t.expires_at:%Y-%m-%d %H:%M}"
                    print(f"{t.id:>4}  {t.name:<24} {t.owner:<20} {t.role.name:<9} {expires}")
        else:
            auth.remove_token(context, args.id, actor=actor, source=LOCAL_SOURCE)
            print(f"token {args.id} revoked")
    except auth.UserError as exc:
        print(f"fpe-node tokens: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    return 0
