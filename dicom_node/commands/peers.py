"""``fpe-node peers``: manage the systems that may send to the node and receive its results.

Changes take effect at the next association, without restarting ``fpe-node serve``; each is
recorded in the audit table with the command and the OS user::

    fpe-node peers list [--json]
    fpe-node peers add PACS --ae-title PACS_STORE --ae-title PACS_QR --host 10.0.0.5 --port 104 \\
        --role source --role destination
    fpe-node peers add PACS-WEB --kind dicomweb --url https://pacs.example.org/dicom-web --role destination \\
        --auth basic --username fpe-node --password-file /etc/fpe-node/pacs-web.secret
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
from dicom_node.peers import (
    PeerError,
    PeerRegistry,
    actor_for,
    describe_dicomweb,
    peers_from_yaml,
    peers_to_yaml,
    validate_peer,
)
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
    add.add_argument("--ae-title", dest="ae_titles", action="append", default=[],
                     help="an AE title it uses (repeatable; a source or DIMSE destination needs one)")
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
        help="destination over TLS (DICOM or https): do not verify its certificate (explicit opt-out, warned at every "
             "association or delivery)",
    )
    add.add_argument("--replace", action="store_true", help="update the peer if the name exists")
    _add_dicomweb_options(add)

    remove = actions.add_parser("remove", help="remove a peer")
    remove.add_argument("name")

    echo = actions.add_parser("echo", help="C-ECHO a peer's SCP, or query a DICOMweb destination (QIDO-RS)")
    echo.add_argument("name")
    echo.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")

    importing = actions.add_parser("import", help="add or update peers from a YAML file")
    importing.add_argument("file", type=Path)
    importing.add_argument("--replace-all", action="store_true", help="also remove peers not in the file")

    export = actions.add_parser("export", help="write the peers as YAML (stdout by default)")
    export.add_argument("file", type=Path, nargs="?")

    parser.set_defaults(func=run)


def _add_dicomweb_options(add: Any) -> None:
    web = add.add_argument_group("DICOMweb destination (--kind dicomweb: results go by STOW-RS, PS3.18 10.5)")
    web.add_argument("--kind", choices=("dimse", "dicomweb"), default="dimse", help="how results reach it (default dimse)")
    web.add_argument("--url", help="DICOMweb base URL; STOW-RS posts to URL/studies")
    web.add_argument("--auth", choices=("none", "basic", "bearer", "client-certificate"), default="none",
                     help="HTTP authentication (default none)")
    web.add_argument("--username", help="user name of basic authentication")
    secret = web.add_mutually_exclusive_group()
    secret.add_argument("--password-env", metavar="VAR", help="environment variable of fpe-node serve holding the password")
    secret.add_argument("--password-file", metavar="FILE", help="file holding the password (first line; chmod 600)")
    secret.add_argument("--token-env", metavar="VAR", help="environment variable holding the bearer token")
    secret.add_argument("--token-file", metavar="FILE", help="file holding the bearer token (first line; chmod 600)")
    web.add_argument("--client-cert", metavar="PEM", help="client certificate (client-certificate authentication)")
    web.add_argument("--client-key", metavar="PEM", help="its private key (default: in the certificate file)")
    web.add_argument("--ca-bundle", metavar="PEM",
                     help="CA bundle verifying the server (default: delivery.tls.ca_bundle, network.tls.ca_bundle, the system's)")


def _dicomweb_fields(args: argparse.Namespace) -> dict[str, Any]:
    """``kind`` and ``dicomweb`` of a peer from the ``peers add`` options (a password option only
    with basic authentication, a token option only with bearer); ``--no-tls-verify`` is the
    DICOMweb service's ``verify_tls`` for a dicomweb peer, the DICOM TLS ``tls_verify`` otherwise."""
    if args.kind != "dicomweb":
        given = [name for name in ("url", "username", "password_env", "password_file", "token_env", "token_file",
                                   "client_cert", "client_key", "ca_bundle") if getattr(args, name) is not None]
        if given or args.auth != "none":
            raise PeerError("DICOMweb options (--url, --auth, ...) need --kind dicomweb")
        return {"tls_verify": args.tls_verify}
    if args.url is None:
        raise PeerError("--kind dicomweb needs --url")
    if (args.password_env or args.password_file) and args.auth != "basic":
        raise PeerError("--password-env/--password-file go with --auth basic")
    if (args.token_env or args.token_file) and args.auth != "bearer":
        raise PeerError("--token-env/--token-file go with --auth bearer")
    service = {
        "url": args.url, "auth": args.auth, "username": args.username,
        "secret_env": args.password_env or args.token_env, "secret_file": args.password_file or args.token_file,
        "client_cert": args.client_cert, "client_key": args.client_key, "ca_bundle": args.ca_bundle,
        "verify_tls": args.tls_verify,
    }
    return {"kind": "dicomweb", "dicomweb": {key: value for key, value in service.items() if value is not None}}


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
        web = "" if peer.dicomweb is None else f"  {describe_dicomweb(peer.dicomweb)}"
        print(f"{peer.name:<20} {','.join(peer.ae_titles):<36} {peer.host:<24} {port:>5}  {','.join(peer.roles):<18}  {tls}"
              f"{web}")
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
            **_dicomweb_fields(args),
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
