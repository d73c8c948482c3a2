"""The multi-label sweep on Ray and MLflow: every (backbone, multi-label head) pair — one-vs-rest
linear probe, k-NN label voting, sigmoid MLP — as one MLflow child run, then the selection.

The compute is `pipeline.sweep.multilabel` (plan, folds, one candidate end to end) and
`pipeline.select` (the same paired selection rule as single-label, on a multi-label metric with
the multi-label paired bootstrap); this module schedules the head tasks on Ray (one backbone's
features `ray.put` once, shared by its heads) and logs each candidate as its result arrives. The
layout on disk and in MLflow is `jobs.sweep`'s (candidate runs, `candidates/<slug>/head`,
leaderboard, selection, report), so `tlpipe compare` and the report read it unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jobs.leaderboard import CANDIDATE_KIND, SWEEP_KIND, leaderboard, log_selection
from jobs.sweep import DEFAULT_TOLERANCE, SWEEP_TAG, CandidateFailed, SweepResult
from pipeline.multilabel.labelsets import binarize
from pipeline.multilabel.predictor import MULTILABEL_TASK
from pipeline.settings import DEFAULT_EXPERIMENT
from pipeline.sweep.features import backbone_latency, plan_features, read_features, split_records
from pipeline.sweep.leaderboard import CANDIDATE_TAG, HEAD_DIR_TAG, candidates_from_rows
from pipeline.sweep.multilabel import (DEFAULT_MULTILABEL_METRIC, candidate_costs,
                                       fit_evaluate_multilabel, multilabel_fold_lookup,
                                       plan_multilabel_selection, test_split_metrics)
from pipeline.sweep.plan import FeatureSetRef, candidate_name, slug
from pipeline.sweep.report import write_report

logger = logging.getLogger(__name__)

#: model-version and run tag naming the task, so serving and promotion know what they hold
TASK_TAG = "tlpipe.task"


def _save_candidate(cdir: Path, name: str, ref: FeatureSetRef, head: str, result: Mapping[str, Any],
                    run_id: str, parent_id: str, classes: Sequence[str], metric: str) -> Path:
    """head/, candidate.json, selection.json + selection_proba.npy (out-of-fold, what selection
    and the predictor's thresholds used) and test_predictions.json (label-set keys: the promotion
    gate's input) — the single-label candidate layout (`pipeline.sweep.outcome.save_candidate`)."""
    for rel, data in result["head_files"].items():
        p = cdir / "head" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    sel = result["selection"]
    (cdir / "candidate.json").write_text(json.dumps({
        "name": name, "task": MULTILABEL_TASK, "kind": "probe", "head": head, "run_id": run_id,
        "parent_run_id": parent_id, "classes": list(classes), "spec": ref.spec.to_dict(),
        "fingerprint": ref.fingerprint, "engine": ref.engine, "selection_metric": metric}, indent=2))
    (cdir / "selection.json").write_text(json.dumps(
        {k: sel[k] for k in ("ids", "y", "score", "std", "fold_scores", "thresholds")}, indent=2))
    np.save(cdir / "selection_proba.npy", np.asarray(sel["proba"], dtype=np.float32))
    (cdir / "test_predictions.json").write_text(json.dumps(
        {"ids": result["ids_test"], "y_true": result["y_test"], "y_pred": result["test_pred"]}))
    return cdir


def _log_candidate(name: str, ref: FeatureSetRef, head: str, params: Mapping[str, Any],
                   result: dict[str, Any], lat: Mapping[str, Any], info: Mapping[str, Any], *,
                   parent_id: str, experiment_id: str, sweep_dir: Path, classes: Sequence[str],
                   metric: str, selection_on: str) -> str | None:
    """One child run; returns the local head dir (None when the candidate failed)."""
    from jobs.tracking import (KIND_TAG, log_dir, log_json, log_metrics, log_params, log_tags,
                               tracked_run)

    tags = {KIND_TAG: CANDIDATE_KIND, SWEEP_TAG: parent_id, CANDIDATE_TAG: name, TASK_TAG: MULTILABEL_TASK,
            "tlpipe.backbone": ref.backbone, "tlpipe.head": head, "tlpipe.candidate_kind": "probe"}
    try:
        with tracked_run(experiment_id, run_name=name, parent_run_id=parent_id, tags=tags,
                         handle_sigterm=False) as run:
            run_id = run.info.run_id
            log_params({"backbone": ref.backbone, "head": head, "head_label": head, "kind": "probe",
                        "family": ref.family, "fingerprint": ref.fingerprint, "engine": ref.engine,
                        "head_params": dict(params), "selection_metric": metric,
                        "selection_on": selection_on, "task": MULTILABEL_TASK,
                        **{f"n_{s}": info.get(f"n_{s}") for s in ("train", "val", "test")}},
                       run_id=run_id)
            if result.get("status") != "ok":
                raise CandidateFailed(result.get("error", "unknown error"), result.get("traceback", ""))
            backbone_params = lat.get("params_m", ref.params_m)
            report = result["report"]
            log_metrics({**candidate_costs(result, lat, backbone_params),
                         **test_split_metrics(report), "metric_value": report["map"]},
                        run_id=run_id)
            log_params({f"fitted.{k}": v for k, v in result["fitted"].items()}, run_id=run_id)
            log_json(report, "eval/multilabel_report.json", run_id=run_id)
            log_json(result["selection"]["report"], "selection_report.json", run_id=run_id)
            cdir = _save_candidate(sweep_dir / "candidates" / slug(name), name, ref, head, result,
                                   run_id, parent_id, classes, metric)
            log_dir(cdir / "head", "head", run_id=run_id)
            log_tags({HEAD_DIR_TAG: str(cdir / "head")}, run_id=run_id)
            return str(cdir / "head")
    except CandidateFailed:
        return None  # recorded: the child run ended FAILED with the remote traceback
    except Exception as exc:  # logging this candidate failed: its run ended FAILED; go on
        logger.warning("could not log candidate %s: %s: %s", name, type(exc).__name__, exc)
        return None


def run_multilabel_sweep(
    dataset: Any,
    feature_sets: Sequence[FeatureSetRef],
    heads: Sequence[str] = ("linear", "knn", "mlp"),
    *,
    root: str | os.PathLike,
    store: Any,
    experiment: str = DEFAULT_EXPERIMENT,
    head_params: Mapping[str, Mapping[str, Any]] | None = None,
    selection_metric: str = DEFAULT_MULTILABEL_METRIC,
    tolerance: float = DEFAULT_TOLERANCE,
    selection: str = "auto",
    cv_folds: int = 5,
    max_latency_ms: float | None = None,
    max_params_m: float | None = None,
    latency_key: str = "latency_ms_b1",
    n_bootstrap: int = 1000,
    seed: int = 0,
    cpus_per_task: float = 1,
    latency_repeats: int = 5,
    on_progress: Callable[[int, int], None] | None = None,
) -> SweepResult:
    """Score every (backbone, head) without the test split, log each to MLflow, select, report.

    `dataset`: a multi-label `pipeline.data.Dataset`; `feature_sets`: one FeatureSetRef per
    backbone, already in `store`; `heads`: names of `pipeline.multilabel.heads.MULTILABEL_HEADS`.
    """
    import ray

    from jobs.ray_runtime import ensure_ray
    from jobs.tracking import (KIND_TAG, log_bytes, log_dataset_card, log_json, log_params,
                               log_tags, setup_mlflow, tracked_run)
    from pipeline.select import LabelScores, NoEligibleCandidateError, select_winner

    head_params = {k: dict(v) for k, v in (head_params or {}).items()}
    classes = [str(c) for c in dataset.classes]
    card = dataset.card.to_dict() if hasattr(dataset.card, "to_dict") else dict(dataset.card)
    splits = split_records(dataset)
    trval = splits["train"] + splits["val"]
    Y_trval = binarize([r.labels for r in trval], classes)
    plan = plan_multilabel_selection(Y_trval, [r.split for r in trval], k=cv_folds, mode=selection)
    folds = multilabel_fold_lookup([r.sha256 for r in trval], Y_trval, [r.split for r in trval],
                                   plan, seed=seed)
    y_rows = {r.sha256: Y_trval[j] for j, r in enumerate(trval)}
    selection_on = plan.describe()
    root = Path(root).expanduser()
    experiment_id = setup_mlflow(root, experiment)
    run_name = time.strftime("sweep-%Y%m%d-%H%M%S")
    with tracked_run(experiment_id, run_name=run_name,
                     tags={KIND_TAG: SWEEP_KIND, TASK_TAG: MULTILABEL_TASK}) as parent:
        parent_id = parent.info.run_id
        sweep_dir = root / "sweeps" / parent_id
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log_params({"backbones": [r.backbone for r in feature_sets], "heads": list(heads),
                    "head_params": head_params, "selection_metric": selection_metric,
                    "selection_on": selection_on, "tolerance": tolerance, "task": MULTILABEL_TASK,
                    "max_latency_ms": max_latency_ms, "max_params_m": max_params_m,
                    "latency_key": latency_key, "n_bootstrap": n_bootstrap, "seed": seed},
                   run_id=parent_id)
        log_dataset_card(card, run_id=parent_id)
        log_json(plan.to_dict(), "selection_plan.json", run_id=parent_id)

        ensure_ray()
        task = ray.remote(fit_evaluate_multilabel).options(num_cpus=cpus_per_task, max_retries=1)
        skipped: list[dict[str, str]] = []
        lat_by_backbone: dict[str, dict[str, Any]] = {}
        pending: dict[Any, tuple] = {}
        for ref in feature_sets:
            kept, reason = plan_features(store, ref, splits)
            if reason:
                skipped.extend({"backbone": ref.backbone, "head": h, "reason": reason} for h in heads)
                continue
            lat, why = backbone_latency(ref, None, "cpu", latency_repeats, cache_dir=root / "latency")
            lat_by_backbone[ref.backbone] = {**lat, **({"error": why} if why else {})}
            data, info = read_features(store, ref, kept, splits, folds)
            obj = ray.put(data)  # one copy in the object store, shared by this backbone's heads
            test_meta = {"ids_test": list(data["ids_test"]), "y_test": [str(y) for y in data["y_test"]]}
            for h in heads:
                fut = task.remote(obj, h, head_params.get(h, {}), classes,
                                  selection_metric=selection_metric, latency_repeats=latency_repeats)
                pending[fut] = (candidate_name(ref.backbone, h), ref, h, info, test_meta)
        total = len(pending)
        if on_progress:
            on_progress(0, total)
        head_dirs: dict[str, str] = {}
        scores: dict[str, LabelScores] = {}
        try:
            while pending:
                (fut,), _ = ray.wait(list(pending), num_returns=1)
                name, ref, h, info, test_meta = pending.pop(fut)
                try:
                    result = ray.get(fut)
                except Exception as exc:  # the worker died (OOM kill, node lost, ...)
                    result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                              "traceback": traceback.format_exc()}
                result.update(test_meta)
                head_dir = _log_candidate(name, ref, h, head_params.get(h, {}), result,
                                          lat_by_backbone[ref.backbone], info, parent_id=parent_id,
                                          experiment_id=experiment_id, sweep_dir=sweep_dir,
                                          classes=classes, metric=selection_metric,
                                          selection_on=selection_on)
                if head_dir:
                    head_dirs[name] = head_dir
                    sel = result["selection"]
                    scores[name] = LabelScores(sel["ids"], sel["proba"], np.asarray(sel["thresholds"]))
                if on_progress:
                    on_progress(total - len(pending), total)
        except BaseException:
            for fut in pending:
                ray.cancel(fut)
            raise

        # ---- leaderboard, selection (held-out scores only; never the test split), report
        rows = leaderboard(parent_id)
        selected, selection_error = None, None
        try:
            selected = select_winner(candidates_from_rows(rows), y_true=y_rows, label_scores=scores,
                                     metric_name=selection_metric, tolerance=tolerance,
                                     max_latency_ms=max_latency_ms, max_params_m=max_params_m,
                                     latency_key=latency_key, n_bootstrap=n_bootstrap, seed=seed)
        except NoEligibleCandidateError as exc:
            selection_error = str(exc)
        sel_dict, winner_run_id = log_selection(parent_id, rows, selected, selection_error,
                                                skipped, lat_by_backbone)
        report_path = write_report(
            sweep_dir, rows, card, sel_dict, selection_error, skipped, {},
            selection_metric=selection_metric, selection_on=selection_on, latency_key=latency_key,
            title=run_name, parent_id=parent_id,
            extra_notes=["Multi-label: selection score = out-of-fold " + selection_metric +
                         "; test score = test-split mAP (reported, never used for choosing)."])
        log_bytes(report_path.read_bytes(), "report.html", run_id=parent_id)

    return SweepResult(
        parent_run_id=parent_id, experiment_id=experiment_id, rows=rows, selection=sel_dict,
        selection_error=selection_error, winner_run_id=winner_run_id, skipped=skipped,
        head_dirs=head_dirs, report_path=str(report_path), sweep_dir=str(sweep_dir),
        backbone_latency=lat_by_backbone, selection_plan=plan.to_dict())
