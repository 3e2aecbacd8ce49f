"""``fpe-node peers``: manage the systems that may send to the node and receive its results.

Changes take effect at the next association, without restarting ``fpe-node serve``; each is
recorded in the audit table with the command and the OS user::

    fpe-node peers list [--json]
    fpe-node peers add PACS --ae-title PACS_STORE --ae-title PACS_QR --host 10.0.0.5 --port 104 \\
        --role source --role destination
    fpe-node peers add ARCHIVE --ae-title ARCHIVE --host archive.example.org --port 2762 --role destination --tls
    fpe-node peers remove PACS
    fpe-node peers echo PACS
    fpe-node peers import peers.yaml [--replace-all]
    fpe-node peers export [peers.yaml]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from dicom_node.index.db import build_engine, build_session_factory, upgrade_to_head
from dicom_node.peers import PeerError, PeerRegistry, actor_for, peers_from_yaml, peers_to_yaml, validate_peer
from dicom_node.settings import Settings

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add ``peers`` and its actions."""
    parser = subparsers.add_parser("peers", help="list, add, remove, echo, import or export peers")
    actions = parser.add_subparsers(dest="peers_action", metavar="ACTION")
    actions.required = True

    listing = actions.add_parser("list", help="show every peer")
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    add = actions.add_parser("add", help="register a peer (or update it with --replace)")
    add.add_argument("name", help="unique name of the system")
    add.add_argument("--ae-title", dest="ae_titles", action="append", required=True, help="an AE title it uses (repeatable)")
    add.add_argument("--host", default="*", help="host name or IP address; '*' (default) accepts any address")
    add.add_argument("--port", type=int, help="port of its SCP (needed for destinations and echo)")
    add.add_argument(
        "--role", dest="roles", action="append", choices=("source", "destination"), help="source (default) and/or destination"
    )
    add.add_argument(
        "--tls", action="store_true",
        help="DICOM over TLS: a source must use the TLS listener; a destination is sent to over TLS",
    )
    add.add_argument(
        "--no-tls-verify", dest="tls_verify", action="store_false",
        help="destination over TLS: do not verify its certificate (explicit opt-out, warned at every association)",
    )
    add.add_argument("--replace", action="store_true", help="update the peer if the name exists")

    remove = actions.add_parser("remove", help="remove a peer")
    remove.add_argument("name")

    echo = actions.add_parser("echo", help="C-ECHO a peer's SCP (host and port from the registry)")
    echo.add_argument("name")
    echo.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")

    importing = actions.add_parser("import", help="add or update peers from a YAML file")
    importing.add_argument("file", type=Path)
    importing.add_argument("--replace-all", action="store_true", help="also remove peers not in the file")

    export = actions.add_parser("export", help="write the peers as YAML (stdout by default)")
    export.add_argument("file", type=Path, nargs="?")

    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Dispatch to the action; 0 on success, 1 on a refused change or failed echo."""
    engine = build_engine(settings)
    try:
        upgrade_to_head(engine)
        registry = PeerRegistry(build_session_factory(engine))
        action = _ACTIONS[args.peers_action]
        return action(args, settings, registry)
    except PeerError as exc:
        print(f"fpe-node peers: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()


def _list(args: argparse.Namespace, settings: Settings, registry: PeerRegistry) -> int:
    peers = registry.list_peers()
    if args.json:
        print(json.dumps([peer.as_dict() for peer in peers], indent=2))
        return 0
    if not peers:
        print("no peers registered (every association is refused)")
        return 0
    print(f"{'NAME':<20} {'AE TITLES':<36} {'HOST':<24} {'PORT':>5}  {'ROLES':<18}  TLS")
    for peer in peers:
        port = "" if peer.port is None else str(peer.port)
        tls = ("yes" if peer.tls_verify else "yes, NOT verified") if peer.tls else "no"
        print(f"{peer.name:<20} {','.join(peer.ae_titles):<36} {peer.host:<24} {port:>5}  {','.join(peer.roles):<18}  {tls}")
    return 0


def _add(args: argparse.Namespace, settings: Settings, registry: PeerRegistry) -> int:
    peer = validate_peer(
        {
            "name": args.name,
            "ae_titles": args.ae_titles,
            "host": args.host,
            "port": args.port,
            "roles": args.roles or ["source"],
            "tls": args.tls,
            "tls_verify": args.tls_verify,
        }
    )
    registry.add(peer, actor=actor_for("fpe-node peers add"), replace=args.replace)
    print(f"peer {peer.name} {'updated' if args.replace else 'added'}")
    return 0


def _remove(args: argparse.Namespace, settings: Settings, registry: PeerRegistry) -> int:
    registry.remove(args.name, actor=actor_for("fpe-node peers remove"))
    print(f"peer {args.name} removed")
    return 0


def _echo(args: argparse.Namespace, settings: Settings, registry: PeerRegistry) -> int:
    from dicom_node.actions import ActionError, echo_peer
    from dicom_node.audit import LOCAL_SOURCE
    from dicom_node.web.context import WebContext

    try:
        result = echo_peer(WebContext(settings, registry.session_factory), args.name, actor=actor_for("fpe-node peers echo"),
                           source=LOCAL_SOURCE, timeout_s=args.timeout)
    except ActionError as exc:
        raise PeerError(exc.message) from None
    print(result.message, file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


def _import(args: argparse.Namespace, settings: Settings, registry: PeerRegistry) -> int:
    peers = peers_from_yaml(args.file)
    changed = registry.import_peers(peers, actor=actor_for("fpe-node peers import"), replace_all=args.replace_all)
    print(f"{len(peers)} peers read, {changed} added, changed or removed")
    return 0


def _export(args: argparse.Namespace, settings: Settings, registry: PeerRegistry) -> int:
    text = peers_to_yaml(registry.list_peers())
    if args.file is None:
        sys.stdout.write(text)
    else:
        args.file.write_text(text, encoding="utf-8")
        print(f"peers written to {args.file}")
    return 0


_ACTIONS = {
    "list": _list,
    "add": _add,
    "remove": _remove,
    "echo": _echo,
    "import": _import,
    "export": _export,
}
