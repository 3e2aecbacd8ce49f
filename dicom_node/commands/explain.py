"""``fpe-node explain PATH...``: a dry run of eligibility and series selection on folders of DICOM.

For each patient found (grouped by Patient ID and issuer, shown only as a short hash), each study
is judged for eligibility, and each series is listed with the role selection picked for it or
the reason it got none; then each pipeline (CT, MR) is shown ready, with the series it would use,
or with what it lacks, and the pipeline that would run. Then the chosen series go through the
checks the run makes (:func:`inference.case.case_from_headers`: volumes built, head coverage,
missing or duplicated slices, b-values on every diffusion image), so the verdict printed is the
run's: "would run" or "not analysed" with the run's reason. Nothing is stored or sent.

The rules come from the settings (``inference.eligibility_rules``, ``inference.selection_rules``,
``inference.case_window_h``, ``inference.prefer_pipeline``) through the node's one selector
builder (:func:`dicom_node.selector.build_selector`). What each pipeline requires follows
the recipe that would be served: the configured checkpoint's or, without one, the default
recipe (whose CT pipeline needs a CTA). ``--rules-only`` uses the rules file's
``required`` lists instead. The study-age rule applies only with ``--now`` (files examined
offline are usually old).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicom_node.selector import build_selector
from dicom_node.settings import Settings
from inference.case import case_from_headers
from inference.dicom_headers import SeriesHeader, read_series_headers
from inference.eligibility import EligibilityDecision, check_study, load_eligibility_rules
from inference.result import NotAnalysed
from inference.selection import Explanation, Selector

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``explain`` sub-command."""
    parser = subparsers.add_parser(
        "explain", help="dry run: which role each series would play, which pipeline is ready or what it lacks"
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="DICOM files or folders (walked)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--now",
        metavar="ISO",
        help="judge study age as if the studies arrived at this time (e.g. 2026-01-01T10:00); default: no age rule",
    )
    parser.add_argument(
        "--rules-only",
        action="store_true",
        help="required roles from the selection rules file, not from the recipe that would be served",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Print the explanation; exit 1 when no DICOM image was found, 2 for a bad argument or rule file."""
    missing = [str(p) for p in args.paths if not Path(p).exists()]
    if missing:
        print(f"fpe-node explain: no such file or folder: {', '.join(missing)}")
        return 2
    try:
        now = dt.datetime.fromisoformat(args.now) if args.now else None
        selector = build_selector(settings, rules_only=args.rules_only)
        eligibility_rules = load_eligibility_rules(settings.inference.eligibility_rules)
    except ValueError as exc:
        print(f"fpe-node explain: {exc}")
        return 2
    datasets: dict[Path, Dataset] = {}  # each file parsed once; the run's checks decode from these
    headers = read_series_headers(args.paths, datasets)
    if not headers:
        print("fpe-node explain: no DICOM files found")
        return 1
    report = []
    for explanation in selector.explain_all(headers):
        studies = _studies_of(explanation, headers)
        decisions = {uid: check_study(series, eligibility_rules, now=now) for uid, series in studies.items()}
        verdict = run_verdict(selector, [h for series in studies.values() for h in series], decisions, datasets)
        report.append((explanation, studies, decisions, verdict))
    if args.json:
        print(json.dumps([_as_json(e, s, d, v) for e, s, d, v in report], indent=2, default=str))
    else:
        print("\n\n".join(_as_text(e, s, d, v) for e, s, d, v in report))
    return 0


def run_verdict(
    selector: Selector,
    headers: Sequence[SeriesHeader],
    decisions: dict[str, EligibilityDecision],
    datasets: dict[Path, Dataset] | None = None,
) -> dict[str, Any]:
    """What the run would end with: ``outcome`` (``would_run``, ``not_analysed``, ``not_eligible``),
    ``pipeline`` and ``reason``.

    The run's own steps are called (:func:`inference.case.case_from_headers`: selection, then
    the volumes with every check they make), not copied; only the model is not run.
    """
    if decisions and not any(d.eligible for d in decisions.values()):
        reason = next(d.reason for d in decisions.values())
        return {"outcome": "not_eligible", "pipeline": None, "reason": reason}
    case = case_from_headers(headers, selector, datasets=datasets)
    if isinstance(case, NotAnalysed):
        return {"outcome": "not_analysed", "pipeline": case.pipeline, "reason": case.reason}
    return {"outcome": "would_run", "pipeline": case.pipeline, "reason": None}


def _studies_of(explanation: Explanation, headers: Sequence[SeriesHeader]) -> dict[str, list[SeriesHeader]]:
    """The explained patient's series by study, in the explanation's order (oldest study first)."""
    wanted = {(d.study_uid, d.series_uid) for d in explanation.series}
    studies: dict[str, list[SeriesHeader]] = {d.study_uid: [] for d in explanation.series}
    for header in headers:
        if (header.study_uid, header.series_uid) in wanted:
            studies[header.study_uid].append(header)
    return studies


def _as_json(
    explanation: Explanation,
    studies: dict[str, list[SeriesHeader]],
    decisions: dict[str, EligibilityDecision],
    verdict: dict[str, Any],
) -> dict[str, Any]:
    data = explanation.to_dict()
    data["verdict"] = verdict
    data["studies"] = [
        {
            "study_uid": uid,
            "description": series[0].study_description,
            "study_datetime": series[0].study_datetime,
            "eligible": decisions[uid].eligible,
            "eligibility_reason": decisions[uid].reason,
        }
        for uid, series in studies.items()
    ]
    return data


def _as_text(
    explanation: Explanation,
    studies: dict[str, list[SeriesHeader]],
    decisions: dict[str, EligibilityDecision],
    verdict: dict[str, Any],
) -> str:
    lines = [f"Patient {explanation.patient} (hash of Patient ID and issuer)"]
    lines += [f"  note: {note}" for note in explanation.notes]
    for study_uid, series in studies.items():
        decision = decisions[study_uid]
        when = series[0].study_datetime.strftime("%Y-%m-%d %H:%M") if series[0].study_datetime else "undated"
        eligible = "eligible" if decision.eligible else f"NOT ELIGIBLE: {decision.reason}"
        lines.append(f"  Study {study_uid}  {series[0].study_description!r}  {when}  {eligible}")
        for item in (d for d in explanation.series if d.study_uid == study_uid):
            number = f"#{item.series_number}" if item.series_number is not None else "#?"
            role = item.role or "-"
            lines.append(
                f"    {number:>5} {item.modality:<3} {item.description[:36]!r:<38} {item.n_instances:>4} files  "
                f"{role:<6} {item.reason}"
            )
    lines.append("  Pipelines:")
    for name, plan in explanation.pipelines.items():
        if plan.ready:
            used = ", ".join(f"{role}: {choice.description!r}" for role, choice in plan.roles.items())
            lines.append(f"    {name}: ready ({used})")
        else:
            lines.append(f"    {name}: not ready, lacks {'; '.join(plan.lacking)}")
        if plan.absent_optional:
            lines.append(f"        optional roles absent: {', '.join(plan.absent_optional)}")
        lines += [f"        warning: {warning}" for warning in plan.warnings]
    chosen = explanation.chosen
    if verdict["outcome"] == "would_run":
        lines.append(f"  Would run: {verdict['pipeline']} pipeline")
    elif chosen:
        lines.append(f"  Would run: nothing ({chosen} selected, then refused by the run's checks)")
    else:
        lines.append("  Would run: nothing (no pipeline ready)")
    if verdict["outcome"] != "would_run":
        lines.append(f"  Verdict: {verdict['outcome'].replace('_', ' ')}: {verdict['reason']}")
    return "\n".join(lines)
