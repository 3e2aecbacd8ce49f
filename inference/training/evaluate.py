"""Evaluating a checkpoint (one network or a fold ensemble) on a manifest's cases.

Reports, for the cases evaluated (the manifest's ``test`` rows when it has any, else all):

* ROC-AUC with a stratified percentile-bootstrap 95% interval;
* sensitivity and specificity at the checkpoint's stored threshold, each with its interval;
* the Brier score and a reliability (calibration) curve of the score;
* the cross-validation summary stored in the card, as mean (SD) across folds like the paper;
* how many decisions change when the network runs under CPU bf16 autocast instead of fp32 (a
  :class:`~inference.model.precision.Bf16Check`; with ``record_bf16`` it is written into the
  checkpoint's card, which lets a CPU with native bf16 serve the model in bf16 when no decision
  changed: :mod:`inference.model.precision`);
* a per-case CSV (logit, score, decision, and the bf16 ones), ``roc.png``, ``calibration.png``,
  ``report.json`` and a plain-text ``report.txt``.

Per-case values come from exactly what the node serves: the card's recipe through
:func:`inference.training.cache.preprocess_cohort` (the serving preprocessing) and one case per
forward through :func:`inference.model.runtime.run`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from inference.model.calibration import Calibration
from inference.model.checkpoint import load_checkpoint, record_bf16_check, weights_sha256
from inference.model.precision import Bf16Check
from inference.model.res25 import Res25
from inference.model.runtime import run
from inference.training import metrics
from inference.training.plots import Curve, unit_square_plot
from inference.training.train import json_safe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """What evaluation needs of a checkpoint, single network or ensemble alike."""

    model: nn.Module
    name: str
    version: str
    grid: tuple[int, int, int]
    recipe: dict[str, Any] | None
    threshold: float
    calibration: Calibration
    training: dict[str, Any]
    precision: str
    kind: str  # "network" or "ensemble"
    weights_sha256: str  # of the served weights (an ensemble: over all members, as it is served)


def load_served_model(path: Path) -> ServedModel:
    """Load a node checkpoint or a fold-ensemble file."""
    from inference.training.ensemble import is_ensemble, load_ensemble

    if is_ensemble(path):
        ensemble = load_ensemble(path)
        card = ensemble.card
        return ServedModel(ensemble.model, card.name, card.version, card.grid, card.recipe, card.threshold,
                           card.calibration, card.training, card.precision, "ensemble",
                           weights_sha256(ensemble.model.state_dict()))
    loaded = load_checkpoint(path)
    c = loaded.card
    return ServedModel(loaded.model, c.name, c.version, c.grid, c.recipe, c.threshold, c.calibration, c.training,
                       c.precision, "network", c.weights_sha256)


def case_logits(model: nn.Module, inputs: Sequence[np.ndarray], precision: str = "fp32") -> np.ndarray:
    """Logit of each case, one forward per case on CPU, as :func:`inference.model.runtime.run` serves it."""
    device = torch.device("cpu")
    model = model.eval()
    values = []
    for volume in inputs:
        batch = torch.from_numpy(np.array(volume, dtype=np.float32, copy=True)[None])
        values.append(float(run(cast(Res25, model), batch, device, precision).logits[0, 0]))
    return np.asarray(values, dtype=np.float64)


@dataclass(frozen=True)
class Evaluation:
    """Per-case values and the report written for them."""

    case_ids: list[str]
    labels: list[int]
    logits: list[float]
    scores: list[float]
    positive: list[bool]
    report: dict[str, Any]
    bf16_check: Bf16Check | None = None  # None when bf16 was not compared


def evaluate_inputs(
    served: ServedModel,
    inputs: Sequence[np.ndarray],
    labels: Sequence[int],
    case_ids: Sequence[str],
    out_dir: Path,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    compare_bf16: bool = True,
) -> Evaluation:
    """Score preprocessed cases and write the report files under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    logits = case_logits(served.model, inputs)
    scores = np.asarray([served.calibration.apply(float(z)) for z in logits])
    positive = scores >= served.threshold
    y = np.asarray(labels, dtype=np.int64)
    report: dict[str, Any] = {
        "model": {"name": served.name, "version": served.version, "kind": served.kind,
                  "threshold": served.threshold, "calibration": served.calibration.to_dict(),
                  "precision_validated": served.precision},
        "cases": {"n": int(y.size), "n_positive": int(y.sum())},
        "note": "research use only, not for diagnosis",
    }
    report.update(_discrimination(y, scores, served.threshold, n_resamples, seed))
    report["calibration"] = _calibration(y, scores)
    report["cross_validation"] = _stored_cv_summary(served.training)
    bf16_logits: np.ndarray | None = None
    check: Bf16Check | None = None
    if compare_bf16:
        bf16_logits = case_logits(served.model, inputs, "bf16")
        bf16_scores = [served.calibration.apply(float(z)) for z in bf16_logits]
        check = Bf16Check.from_scores(scores.tolist(), bf16_scores, served.threshold, served.weights_sha256)
        report["bf16_vs_fp32"] = check.to_dict()
    _write_case_csv(out_dir / "per_case.csv", case_ids, y, logits, scores, positive, bf16_logits, served)
    _write_plots(out_dir, y, scores, served, report)
    (out_dir / "report.json").write_text(json.dumps(json_safe(report), indent=2, allow_nan=False))
    (out_dir / "report.txt").write_text(format_report(report))
    return Evaluation(list(case_ids), [int(v) for v in y], logits.tolist(), scores.tolist(), positive.tolist(), report,
                      check)


def _discrimination(y: np.ndarray, scores: np.ndarray, threshold: float, n_resamples: int, seed: int) -> dict[str, Any]:
    both = 0 < y.sum() < y.size
    at = metrics.sensitivity_specificity(y, scores, threshold)
    result: dict[str, Any] = {"confusion": {"tp": at.tp, "fn": at.fn, "tn": at.tn, "fp": at.fp}}
    if both:
        result["roc_auc"] = _interval(metrics.bootstrap_ci(y, scores, metrics.auc_statistic, n_resamples=n_resamples, seed=seed))
    statistics = {
        "sensitivity": metrics.sensitivity_statistic(threshold),
        "specificity": metrics.specificity_statistic(threshold),
    }
    for name, statistic in statistics.items():
        if (name == "sensitivity" and y.sum()) or (name == "specificity" and y.size - y.sum()):
            result[name] = _interval(metrics.bootstrap_ci(y, scores, statistic, n_resamples=n_resamples, seed=seed))
    return result


def _interval(interval: metrics.Interval) -> dict[str, Any]:
    return {"estimate": interval.estimate, "ci95": [interval.low, interval.high], "text": interval.format()}


def _calibration(y: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    curve = metrics.reliability_curve(y, scores, n_bins=10)
    return {
        "brier": metrics.brier_score(y, scores),
        "reliability": {"prob_pred": curve.prob_pred.tolist(), "prob_true": curve.prob_true.tolist(),
                        "counts": curve.counts.tolist()},
    }


def _stored_cv_summary(training: dict[str, Any]) -> dict[str, Any] | None:
    """The card's cross-validation summary (ensembles), or this fold's test metrics (one fold)."""
    cv = training.get("cross_validation")
    if isinstance(cv, dict):
        return {"mean_sd": cv.get("cv_mean_sd"), "pooled_out_of_fold": cv.get("pooled_out_of_fold")}
    if "test_metrics" in training:
        return {"fold": training.get("fold"), "fold_test_metrics": training["test_metrics"]}
    return None


def _write_case_csv(
    path: Path, case_ids: Sequence[str], y: np.ndarray, logits: np.ndarray, scores: np.ndarray,
    positive: np.ndarray, bf16_logits: np.ndarray | None, served: ServedModel,
) -> None:
    header = "id,label,logit,score,positive"
    if bf16_logits is not None:
        header += ",logit_bf16,score_bf16,positive_bf16"
    lines = [header]
    for i, case_id in enumerate(case_ids):
        line = f"{case_id},{y[i]},{logits[i]:.7g},{scores[i]:.7g},{int(positive[i])}"
        if bf16_logits is not None:
            score16 = served.calibration.apply(float(bf16_logits[i]))
            line += f",{bf16_logits[i]:.7g},{score16:.7g},{int(score16 >= served.threshold)}"
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")


def _write_plots(out_dir: Path, y: np.ndarray, scores: np.ndarray, served: ServedModel, report: dict[str, Any]) -> None:
    if 0 < y.sum() < y.size:
        curve = metrics.roc_curve(y, scores)
        at = metrics.sensitivity_specificity(y, scores, served.threshold)
        auc = report["roc_auc"]["text"]
        unit_square_plot(
            out_dir / "roc.png", f"ROC {served.name} {served.version}", "1 - specificity", "sensitivity",
            [Curve(curve.fpr.tolist(), curve.tpr.tolist(), f"AUC {auc}"),
             Curve([1 - at.specificity], [at.sensitivity], f"threshold {served.threshold:.3f}", markers=True)],
            footer="research use only, not for diagnosis",
        )
    reliability = report["calibration"]["reliability"]
    unit_square_plot(
        out_dir / "calibration.png", f"Reliability {served.name} {served.version}", "mean predicted score",
        "observed FPE rate",
        [Curve(reliability["prob_pred"], reliability["prob_true"],
               f"Brier {report['calibration']['brier']:.4f}", markers=True)],
        footer="research use only, not for diagnosis",
    )


def format_report(report: dict[str, Any]) -> str:
    """Plain-text summary of a report dict."""
    model = report["model"]
    lines = [
        f"model {model['name']} {model['version']} ({model['kind']}), threshold {model['threshold']:.4f}, "
        f"calibration {model['calibration']['method']}",
        f"cases {report['cases']['n']} ({report['cases']['n_positive']} FPE)",
    ]
    for key in ("roc_auc", "sensitivity", "specificity"):
        if key in report:
            lines.append(f"{key:12s} {report[key]['text']}")
    lines.append(f"Brier score  {report['calibration']['brier']:.4f}")
    cv = report.get("cross_validation") or {}
    for key, value in (cv.get("mean_sd") or {}).items():
        lines.append(f"CV {key:9s} {value['text']} (mean (SD) across {value['n_folds']} folds)")
    if "bf16_vs_fp32" in report:
        lines.append(f"bf16 vs fp32: {report['bf16_vs_fp32']['decisions_changed']} decision(s) change")
    lines.append(report["note"])
    return "\n".join(lines) + "\n"



def evaluate_manifest(
    checkpoint: Path,
    manifest_path: Path,
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    case_window_h: float = 24.0,
    n_resamples: int = 2000,
    seed: int = 0,
    compare_bf16: bool = True,
    record_bf16: bool = False,
) -> Evaluation:
    """Evaluate ``checkpoint`` on the manifest's ``test`` rows (all rows when it has none).

    ``record_bf16``: write the bf16-versus-fp32 comparison into the checkpoint's card
    (:func:`inference.model.checkpoint.record_bf16_check`; the weights are unchanged).

    Cases go through the checkpoint's own recipe (the default recipe on the card's grid when it
    carries none) and must be of the pipeline the checkpoint was trained for; the manifest is
    validated first with that recipe's required roles.
    """
    from inference.recipe import DEFAULT_RECIPE, Recipe
    from inference.training.cache import preprocess_cohort
    from inference.training.manifest import load_manifest, recipe_required_roles, selection_checker

    served = load_served_model(checkpoint)
    recipe = Recipe.from_dict(served.recipe) if served.recipe else DEFAULT_RECIPE.with_grid(served.grid)
    required = recipe_required_roles(recipe)
    cases = load_manifest(manifest_path, check_case=selection_checker(case_window_h, required), required_roles=required)
    chosen = [case for case in cases if case.split == "test"] or cases
    pipeline = (served.training.get("data") or {}).get("pipeline")
    if pipeline is not None:
        other = [case.case_id for case in chosen if case.modality != pipeline]
        if other:
            raise ValueError(f"the checkpoint serves the {pipeline} pipeline; cases of another modality: {', '.join(other)}")
    if record_bf16 and not compare_bf16:
        raise ValueError("recording the bf16 check needs the bf16 comparison")
    cached = preprocess_cohort(chosen, recipe, cache_dir or out_dir / "cache")
    evaluation = evaluate_inputs(
        served,
        [entry.load() for entry in cached],
        [case.label for case in chosen],
        [case.case_id for case in chosen],
        out_dir,
        n_resamples=n_resamples,
        seed=seed,
        compare_bf16=compare_bf16,
    )
    if record_bf16 and evaluation.bf16_check is not None:
        record_bf16_check(checkpoint, evaluation.bf16_check)
    return evaluation
