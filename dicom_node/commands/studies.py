"""``fpe-node studies``: what arrived, how it is grouped, where each study is in its life cycle.

Without ``--study`` it lists studies, latest arrival first: state, arrivals, series and
instance counts, how many of its results are dead-lettered and how many times building or
queueing its results failed (``report_failed``; ``fpe-node resend`` retries both). With ``--study UID`` it shows
that study's series (with completion times), its timeline (every state change and note, UTC),
its analysis jobs and the delivery of each result object. ``--json`` prints the same as JSON.

Patient names and IDs are never shown (the index does not hold names in clear); studies are
named by Study Instance UID, accession number and description.

Extra sections of the detail view come from :data:`DETAIL_SECTIONS`: functions
``(session, study_uid) -> (title, rows)``, so a later part of the node adds its own view of a
study by adding one function there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

from sqlalchemy.orm import Session

from dicom_node.settings import Settings

log = logging.getLogger(__name__)

Row = dict[str, Any]
DetailSection = Callable[[Session, str], tuple[str, list[Row]]]


def register(subparsers: Any) -> None:
    """Add the ``studies`` sub-command."""
    parser = subparsers.add_parser("studies", help="list received studies, their series, state and timeline")
    parser.add_argument("--study", metavar="UID", help="show one study: series, timeline, jobs, deliveries")
    parser.add_argument("--state", help="list only studies in this state (e.g. dead_lettered, report_failed, received)")
    parser.add_argument("--since", type=_instant, metavar="TIME",
                        help="list only studies whose latest instance arrived at or after TIME (ISO 8601; UTC if no zone)")
    parser.add_argument("--sender", metavar="PEER", help="list only studies sent by this peer (name) or calling AE title")
    parser.add_argument("--limit", type=int, default=50, help="list at most this many studies (default 50; 0: all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Print the list or one study; exit 1 when ``--study`` names a study not in the index."""
    from dicom_node.index.db import build_engine, build_session_factory, upgrade_to_head

    engine = build_engine(settings)
    try:
        upgrade_to_head(engine)
        with build_session_factory(engine)() as session:
            if args.study:
                detail = study_detail(session, args.study)
                if detail is None:
                    print(f"study {args.study} is not in the index")
                    return 1
                print(_dumps(detail) if args.json else format_detail(detail))
            else:
                rows = study_rows(session, state=args.state, limit=args.limit or None,
                                  since=getattr(args, "since", None), sender=getattr(args, "sender", None))
                print(_dumps(rows) if args.json else format_list(rows))
    finally:
        engine.dispose()
    return 0


# -- queries (the read model the REST API and the console use too) ----------------------------

_PATIENT_FIELDS = {"patient_name", "patient_id"}  # never shown on the command line


def _instant(text: str) -> dt.datetime:
    """An ISO 8601 time (``2026-12-01T08:00``); without a zone it is taken as UTC."""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


def study_rows(
    session: Session,
    *,
    state: str | None = None,
    limit: int | None = 50,
    study_uid: str | None = None,
    since: dt.datetime | None = None,
    sender: str | None = None,
) -> list[Row]:
    """One row per study (or only ``study_uid``), latest arrival first (:func:`dicom_node.web.queries.list_studies`)."""
    from dicom_node.web.queries import list_studies

    return [
        study.model_dump(exclude=_PATIENT_FIELDS)
        for study in list_studies(session, state=state, limit=limit, study_uid=study_uid, since=since, sender=sender)
    ]


def study_detail(session: Session, study_uid: str) -> Row | None:
    """Everything ``--study`` shows (:func:`dicom_node.web.queries.study_detail`), or ``None`` when
    the study is unknown."""
    from dicom_node.web.queries import study_detail as query_detail

    found = query_detail(session, study_uid)
    if found is None:
        return None
    detail: Row = found.model_dump(
        exclude=_PATIENT_FIELDS | {"jobs", "deliveries", "quarantined", "analyses", "dead_letter_list"}
    )
    detail["sections"] = {
        "analysis jobs": [job.model_dump() for job in found.jobs],
        "deliveries": [delivery.model_dump() for delivery in found.deliveries],
        "quarantined instances": [item.model_dump() for item in found.quarantined],
    }
    for section in DETAIL_SECTIONS:
        title, rows = section(session, study_uid)
        detail["sections"][title] = rows
    return detail


DETAIL_SECTIONS: tuple[DetailSection, ...] = ()
"""Extra sections of ``fpe-node studies --study`` after series, timeline, analysis jobs,
deliveries and quarantined instances, in order."""


# -- output ----------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Dataclasses to dicts, datetimes to ISO 8601 UTC strings (for JSON and tables)."""
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dt.datetime):  # naive: acquired_at, the scanner's local time
        return value.isoformat(timespec="seconds")
    return value


def _dumps(value: Any) -> str:
    return json.dumps(_plain(value), indent=2, ensure_ascii=False)


def _time(value: dt.datetime | None) -> str:
    """UTC ``YYYY-MM-DD HH:MM:SS`` (index timestamps; SQLite returns them naive, in UTC)."""
    if value is None:
        return "-"
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_list(rows: list[Row]) -> str:
    """The study list as a table (times in UTC)."""
    if not rows:
        return "no studies"
    body = [
        (
            r["study_uid"], r["state"], r["modalities"], r["series"], r["instances"], _time(r["first_received_at"]),
            _time(r["last_received_at"]), r["calling_ae"], r["dead_letters"] or "", r["report_failures"] or "",
        )
        for r in rows
    ]
    headers = ("STUDY UID", "STATE", "MODALITIES", "SERIES", "INSTANCES", "FIRST ARRIVAL (UTC)", "LAST ARRIVAL (UTC)",
               "FROM", "DEAD", "FAILED")
    return _table(headers, body)


def format_detail(detail: Row) -> str:
    """One study: header, series, timeline, extra sections."""
    acquired = detail["acquired_at"].strftime("%Y-%m-%d %H:%M:%S") if detail["acquired_at"] else "-"
    lines = [
        f"Study {detail['study_uid']}",
        f"  state        {detail['state']}" + (f" ({detail['state_reason']})" if detail["state_reason"] else ""),
        f"  description  {detail['description'] or '-'}   accession {detail['accession'] or '-'}",
        f"  acquired     {acquired} (scanner time)   modalities {detail['modalities'] or '-'}",
        f"  arrivals     {_time(detail['first_received_at'])} .. {_time(detail['last_received_at'])} UTC"
        f" from {detail['calling_ae'] or '-'}: {detail['series']} series, {detail['instances']} instances",
        "",
        "Series",
        _table(
            ("NUMBER", "MODALITY", "DESCRIPTION", "INSTANCES", "LAST ARRIVAL", "COMPLETE", "SERIES UID"),
            [
                (s["number"], s["modality"], s["description"], s["instances"], _time(s["last_received_at"]),
                 _time(s["complete_at"]), s["series_uid"])
                for s in detail["series_list"]
            ],
        ) if detail["series_list"] else "  (none: purged or not yet received)",
        "",
        "Timeline (UTC)",
    ]
    lines += [f"  {_time(e['at'])}  {e['state']:<16} {e['detail'] or ''}".rstrip() for e in detail["timeline"]]
    for title, rows in detail["sections"].items():
        lines += ["", title[0].upper() + title[1:]]
        lines.append(_section_table(rows) if rows else "  (none)")
    return "\n".join(lines)


def _section_table(rows: list[Row]) -> str:
    plain = [_plain(row) for row in rows]
    headers = [key for key in plain[0] if any(row.get(key) not in (None, "") for row in plain)]
    return _table([h.upper() for h in headers], [[row.get(h) for h in headers] for row in plain])
