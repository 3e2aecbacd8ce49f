"""Operator actions from the node's shell, through :mod:`dicom_node.actions` (the REST API's code too)::

    fpe-node complete STUDY            # a study still receiving: complete it and queue its analysis now
    fpe-node rerun STUDY               # analyse a processed study again
    fpe-node dead-letters list [--json]
    fpe-node dead-letters retry ID     # send a dead-lettered result object again
    fpe-node dead-letters drop ID      # give it up
    fpe-node suspend analysis|delivery # node-wide, obeyed by the running node
    fpe-node resume analysis|delivery

(``fpe-node resend STUDY`` re-queues a study's results.) Every action is audited with the
command, the OS user and ``local`` as its source; a refused action exits 1 with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dicom_node.settings import Settings


def register(subparsers: Any) -> None:
    """Add ``complete``, ``rerun``, ``dead-letters``, ``suspend`` and ``resume``."""
    complete = subparsers.add_parser("complete", help="force a study still receiving complete and queue it")
    complete.add_argument("study", metavar="STUDY", help="Study Instance UID")
    complete.set_defaults(func=run, operate="complete")

    rerun = subparsers.add_parser("rerun", help="queue a processed study for analysis again")
    rerun.add_argument("study", metavar="STUDY", help="Study Instance UID")
    rerun.set_defaults(func=run, operate="rerun")

    dead = subparsers.add_parser("dead-letters", help="list, retry or drop dead-lettered result objects")
    dead_actions = dead.add_subparsers(dest="dead_action", metavar="ACTION")
    dead_actions.required = True
    listing = dead_actions.add_parser("list", help="every dead letter with its id")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    for name, text in (("retry", "send it again with a fresh deadline"), ("drop", "give it up")):
        action = dead_actions.add_parser(name, help=text)
        action.add_argument("id", type=int, help="outbox item id (dead-letters list)")
    dead.set_defaults(func=run, operate="dead-letters")

    for name, text in (("suspend", "stop analysis or delivery node-wide"), ("resume", "start it again")):
        parser = subparsers.add_parser(name, help=text)
        parser.add_argument("what", choices=("analysis", "delivery"))
        parser.set_defaults(func=run, operate=name)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run the action; 0 on success, 1 when it was refused."""
    from dicom_node import actions
    from dicom_node.audit import LOCAL_SOURCE
    from dicom_node.index.db import build_engine, build_session_factory, upgrade_to_head
    from dicom_node.peers import actor_for
    from dicom_node.web.context import WebContext

    engine = build_engine(settings)
    try:
        upgrade_to_head(engine)
        context = WebContext(settings, build_session_factory(engine))
        command = args.operate if args.operate != "dead-letters" else f"dead-letters {args.dead_action}"
        who = {"actor": actor_for(f"fpe-node {command}"), "source": LOCAL_SOURCE}
        if args.operate == "complete":
            result = actions.force_complete(context, args.study, **who)
        elif args.operate == "rerun":
            result = actions.rerun_analysis(context, args.study, **who)
        elif args.operate == "suspend":
            result = actions.suspend(context, args.what, **who)
        elif args.operate == "resume":
            result = actions.resume(context, args.what, **who)
        elif args.dead_action == "list":
            return _list_dead_letters(context, args.json)
        elif args.dead_action == "retry":
            result = actions.retry_dead_letter(context, args.id, **who)
        else:
            result = actions.drop_dead_letter(context, args.id, **who)
    except actions.ActionError as exc:
        print(f"fpe-node {args.operate}: {exc.message}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    print(result.message)
    return 0


def _list_dead_letters(context: Any, as_json: bool) -> int:
    from dicom_node.web.queries import dead_letters

    with context.session_factory() as session:
        letters = dead_letters(session)
    if as_json:
        print(json.dumps([letter.model_dump(mode="json") for letter in letters], indent=2))
    elif not letters:
        print("no dead letters")
    else:
        print(f"{'ID':>6}  {'KIND':<4} {'DESTINATION':<20} {'ATTEMPTS':>8}  {'STUDY UID':<40} LAST ERROR")
        for letter in letters:
            print(f"{letter.id:>6}  {letter.kind:<4} {letter.destination:<20} {letter.attempts:>8}  "
                  f"{letter.study_uid:<40} {letter.last_error or '-'}")
    return 0
