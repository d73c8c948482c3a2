"""One multi-label candidate, end to end and without Ray or MLflow, and the selection plan of a
multi-label sweep (the multi-label counterparts of `pipeline.sweep.candidate` and
`pipeline.sweep.folds`).

The plan mirrors the single-label one: k-fold CV on train+val (folds by iterative
stratification, `pipeline.multilabel.crossval.fold_matrix`, repeated below `TINY_ROWS`), or the
validation split above `CV_MAX_ROWS` images. Folds are made once per dataset and looked up by
image id, so every backbone and head is scored on the same held-out images (paired comparisons
need that). A candidate = out-of-fold probabilities -> selection metric (mAP by default) and
per-label thresholds; refit on train+val with those thresholds; the test split scored once for
the report.

`data` (one feature set) holds ``X, y, ids`` (train+val rows, ``y`` label-set keys "a|b"),
``folds`` (R, N) and ``X_test, y_test, ids_test`` — what `pipeline.sweep.features.read_features`
returns.
"""

from __future__ import annotations

import math
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.latency import LATENCY_BATCH_SIZES, measure_latency
from pipeline.multilabel.base import indicator
from pipeline.multilabel.crossval import cross_validate_multilabel, fold_matrix, predicted_sets
from pipeline.multilabel.heads import MULTILABEL_HEADS, make_multilabel_head
from pipeline.multilabel.metrics import MULTILABEL_METRICS, evaluate_multilabel
from pipeline.sweep.candidate import fitted_scalars, stored_numbers
from pipeline.sweep.folds import CV_MAX_ROWS, DEFAULT_K, SelectionPlan, plan_from_counts

#: the selection metric of a multi-label sweep unless another of MULTILABEL_METRICS is asked for
DEFAULT_MULTILABEL_METRIC = "map"


def multilabel_metric(selection_metric: str | None, *, default_single: str = "balanced_accuracy") -> str:
    """The multi-label selection metric for what the run was asked: a multi-label metric as is,
    the single-label default (nothing asked) -> mAP, anything else an error."""
    if selection_metric in MULTILABEL_METRICS:
        return str(selection_metric)
    if selection_metric in (None, "", default_single):
        return DEFAULT_MULTILABEL_METRIC
    raise ValueError(f"selection metric {selection_metric!r} is single-label; a multi-label dataset "
                     f"is scored with one of {', '.join(MULTILABEL_METRICS)} (default map)")


def multilabel_heads(heads: Sequence[str]) -> tuple[list[str], list[str]]:
    """(multi-label head names to sweep, asked heads without a multi-label version)."""
    names = [str(h) for h in heads]
    keep = [h for h in names if h in MULTILABEL_HEADS]
    return keep, [h for h in names if h not in MULTILABEL_HEADS]


def plan_multilabel_selection(Y: np.ndarray, splits: Sequence[str], *, k: int = DEFAULT_K,
                              cv_max_rows: int = CV_MAX_ROWS, mode: str = "auto") -> SelectionPlan:
    """CV or the validation split for train+val rows with indicator ``Y`` and these split names
    (the rule of `pipeline.sweep.folds.plan_selection`, label counts instead of class counts)."""
    Y = np.asarray(Y)
    return plan_from_counts(len(Y), splits, Y.sum(axis=0), k=k, cv_max_rows=cv_max_rows, mode=mode)


def multilabel_fold_lookup(ids: Sequence[str], Y: np.ndarray, splits: Sequence[str],
                           plan: SelectionPlan, *, seed: int = 0) -> dict[str, np.ndarray]:
    """{id: (R,) folds} of the dataset's train+val rows (-1 = always trained on)."""
    if plan.mode == "val":
        folds = np.where(np.asarray(splits, dtype=str) == "val", 0, -1).astype(np.int64)[None, :]
    else:
        folds = fold_matrix(np.asarray(Y), plan.k, plan.repeats, seed).astype(np.int64)
    return {str(i): folds[:, j] for j, i in enumerate(ids)}


def fit_evaluate_multilabel(data: Mapping[str, Any], head_name: str, params: Mapping[str, Any],
                            classes: Sequence[str], *, selection_metric: str = DEFAULT_MULTILABEL_METRIC,
                            latency_batch_sizes: Sequence[int] = LATENCY_BATCH_SIZES,
                            latency_repeats: int = 5) -> dict[str, Any]:
    """Cross-validate, refit on train+val with the out-of-fold thresholds, score the test split
    once (report only). Never raises: a failure is ``{"status": "failed", "error", "traceback"}``."""
    try:
        classes = [str(c) for c in classes]
        X = np.asarray(data["X"], dtype=np.float32)
        _, Y = indicator(list(data["y"]), len(X), classes)

        def make():
            return make_multilabel_head(head_name, **dict(params))

        cv = cross_validate_multilabel(make, X, Y, data["folds"], classes, metric=selection_metric)
        t0 = time.perf_counter()
        head = make().fit(X, Y, classes=classes)
        head.set_thresholds(cv.thresholds, source="out_of_fold")
        fit_s = cv.fit_seconds + time.perf_counter() - t0
        X_test = np.asarray(data["X_test"], dtype=np.float32)
        _, Y_test = indicator(list(data["y_test"]), len(X_test), classes, name="y_test")
        t0 = time.perf_counter()
        test_proba = head.predict_proba(X_test)
        predict_s = time.perf_counter() - t0
        report = evaluate_multilabel(Y_test, test_proba, head.thresholds_, classes)

        def make_batch(bs: int) -> np.ndarray:
            return np.ascontiguousarray(np.tile(X_test, (math.ceil(bs / len(X_test)), 1))[:bs])

        lat = measure_latency(head.predict_proba, make_batch, batch_sizes=latency_batch_sizes,
                              warmup=1, repeats=latency_repeats)
        with tempfile.TemporaryDirectory(prefix="tlpipe-mlhead-") as tmp:
            head.save(tmp)
            numbers = stored_numbers(Path(tmp))
            files = {str(p.relative_to(tmp)): p.read_bytes()
                     for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
        ids = [str(data["ids"][i]) for i in cv.rows]
        return {
            "status": "ok",
            "selection": {"ids": ids, "y": [str(data["y"][i]) for i in cv.rows],
                          "proba": cv.proba, "score": float(cv.score), "std": cv.std,
                          "fold_scores": [float(s) for s in cv.fold_scores],
                          "thresholds": [float(t) for t in cv.thresholds], "report": cv.report},
            "report": report.to_dict(), "test_proba": test_proba.astype(np.float32),
            "test_pred": predicted_sets(test_proba, head.thresholds_, classes),
            "head_files": files, "head_numbers": int(numbers),
            "head_size_mb": sum(len(b) for b in files.values()) / 1e6,
            "fit_seconds": fit_s, "predict_seconds": predict_s,
            "head_latency": {k: v for k, v in lat.items() if k.startswith("latency_")},
            "fitted": fitted_scalars(head),
        }
    except Exception as exc:
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()}


def candidate_costs(result: Mapping[str, Any], backbone_lat: Mapping[str, Any],
                    backbone_params_m: float | None) -> dict[str, Any]:
    """Selection score, costs (backbone + head latency and noise, parameters) and timings of a
    finished candidate: the metrics its tracking run records (`pipeline.sweep.outcome`'s)."""
    sel = result["selection"]
    head_params_m = result["head_numbers"] / 1e6
    out = {"selection_score": sel["score"], "selection_std": sel.get("std"),
           "n_selection": len(sel["ids"]), "fit_seconds": result["fit_seconds"],
           "predict_seconds": result["predict_seconds"], "head_size_mb": result["head_size_mb"],
           "head_params_m": head_params_m, "backbone_params_m": backbone_params_m,
           "params_m": None if backbone_params_m is None else backbone_params_m + head_params_m}
    for key, v in result["head_latency"].items():
        b = backbone_lat.get(key)
        b = None if b is None or not math.isfinite(float(b)) else float(b)
        out[f"head_{key}"], out[f"backbone_{key}"] = v, b
        out[key] = None if b is None else b + v
    return out


def test_split_metrics(report: Mapping[str, Any]) -> dict[str, Any]:
    """The test split's headline numbers (reported, never used for choosing)."""
    return {"test_map": report["map"], "test_micro_f1": report["micro_f1"],
            "test_macro_f1": report["macro_f1"], "test_subset_accuracy": report["subset_accuracy"],
            "test_hamming_loss": report["hamming_loss"], "n_test": report["n_images"]}


__all__ = ["DEFAULT_MULTILABEL_METRIC", "candidate_costs",
           "fit_evaluate_multilabel", "multilabel_fold_lookup", "multilabel_heads",
           "multilabel_metric", "plan_multilabel_selection", "test_split_metrics"]
