"""The sweep on Ray and MLflow: every (backbone, head) pair, a head on the concatenated
backbones and an ensemble of the best candidates, each one MLflow child run; then the selection.

All compute is `pipeline.sweep` (folds, cross-validation, refit, ensembles, leaderboard, report)
and `pipeline.select` (the paired selection rule). This module schedules the head tasks on Ray —
one backbone's features `ray.put` once and shared by its heads, a few backbones in flight — and
logs each candidate as results arrive (a failed task becomes a FAILED child with the remote
traceback; heads that cannot apply are skipped with the reason).

Latency of a candidate = its backbones' latency (measured once per backbone on this machine, or
given) + its head's; its noise is the sum of theirs. Parameters = backbones' + the head's stored
numbers (a k-NN head stores its support set, so its size counts).
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from jobs.leaderboard import CANDIDATE_KIND, SWEEP_KIND, leaderboard, log_selection
from jobs.task_queue import Job, TaskQueue
from pipeline.settings import DEFAULT_EXPERIMENT, features_root
from pipeline.sweep import ensemble as ens
from pipeline.sweep.candidate import fit_evaluate
from pipeline.sweep.features import backbone_latency as measure_or_lookup_latency
from pipeline.sweep.features import plan_features, read_features, split_records
from pipeline.sweep.folds import fold_lookup, plan_selection
from pipeline.sweep.leaderboard import CANDIDATE_TAG, HEAD_DIR_TAG, candidates_from_rows
from pipeline.sweep.outcome import (Outcome, combined_latency, paired_inputs, save_candidate,
                                    subset_info)
from pipeline.sweep.plan import (DEFAULT_HEADS, FeatureSetRef, HeadConfig, candidate_name,
                                 expected_candidates, loggable_params, short_backbones, skip_reason,
                                 slug, submit_rank, sweep_inputs, task_params)
from pipeline.sweep.report import hardest_png_bytes, write_report

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.005
SWEEP_TAG = "tlpipe.sweep_run_id"


@dataclass
class SweepResult:
    """What a sweep did, as plain data."""

    parent_run_id: str
    experiment_id: str
    rows: list[dict[str, Any]]           # leaderboard (see ROW_KEYS), best first, failed last
    selection: dict[str, Any] | None     # Selection.to_dict(), None when nothing was eligible
    selection_error: str | None
    winner_run_id: str | None
    skipped: list[dict[str, str]]        # {backbone, head, reason}
    head_dirs: dict[str, str]            # candidate name -> local dir of the saved head
    report_path: str
    sweep_dir: str
    backbone_latency: dict[str, dict[str, Any]] = field(default_factory=dict)
    selection_plan: dict[str, Any] = field(default_factory=dict)

    @property
    def winner(self) -> dict[str, Any] | None:
        return next((r for r in self.rows if r.get("winner")), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def feature_sets_from_stats(stats: Iterable[Any]) -> list[FeatureSetRef]:
    """FeatureSetRefs for what `jobs.extract.extract_features` returned, with the registry's specs."""
    from pipeline.backbones import get_spec

    return [FeatureSetRef.from_spec(get_spec(s.backbone), engine=s.engine,
                                    fingerprint=s.fingerprint) for s in stats]


def head_task(data: Mapping[str, Any], head_name: str, params: Mapping[str, Any],
              classes: Sequence[str], **kw: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """`fit_evaluate` as a Ray task of two returns: the result, and a linear probe's preparation
    of the features (else None), kept in the object store for the concatenation to start from."""
    result = fit_evaluate(data, head_name, params, classes, **kw)
    return result, result.pop("preparation", None)


# ----------------------------------------------------------------------------- logging

class CandidateFailed(RuntimeError):
    """A head task failed; carries the remote traceback (recorded as the run's error.txt)."""

    def __init__(self, message: str, remote_traceback: str):
        super().__init__(message)  # "ValueError: ..." as the task reported it
        self.remote_traceback = remote_traceback
        self.error_type = message.split(":", 1)[0] if ":" in message else "Error"


def fetch_or_none(ref: Any) -> Any:
    """The object behind `ref`; None when there is none or it was lost (then made again)."""
    import ray
    try:
        return None if ref is None else ray.get(ref)
    except Exception as exc:  # e.g. the node that held it is gone
        logger.warning("a linear probe's preparation of the features is lost (%s)", exc)
        return None


def _log_candidate(d: Outcome, *, parent_id: str, experiment_id: str, sweep_dir: Path,
                   classes: Sequence[str], card: Mapping[str, Any], selection_metric: str,
                   selection_on: str) -> str | None:
    """One child run for one candidate; returns the local head dir (None when it failed)."""
    from jobs.tracking import (
        KIND_TAG,
        dataset_params,
        log_dir,
        log_eval_report,
        log_json,
        log_metrics,
        log_params,
        log_tags,
        tracked_run,
    )
    from pipeline.evaluate import EvalReport

    tags = {KIND_TAG: CANDIDATE_KIND, SWEEP_TAG: parent_id, CANDIDATE_TAG: d.name,
            "tlpipe.backbone": d.backbone, "tlpipe.head": d.label, "tlpipe.candidate_kind": d.kind}
    result = d.result
    try:
        with tracked_run(experiment_id, run_name=d.name, parent_run_id=parent_id, tags=tags,
                         handle_sigterm=False) as run:
            run_id = run.info.run_id
            params = {**d.run_params(selection_metric, selection_on), **dataset_params(card)}
            log_params(params, run_id=run_id)
            log_json(card, "dataset/dataset_card.json", run_id=run_id)
            if not d.ok:
                raise CandidateFailed(result.get("error", "unknown error"), result.get("traceback", ""))
            log_params({f"fitted.{k}": v for k, v in result["fitted"].items()}, run_id=run_id)
            report = EvalReport.from_dict(result["report"])
            test_records = d.info["test_records"]
            hardest = result["hardest"]
            for h in hardest:  # task ids are test-row indices -> image key + path
                rec = test_records[h["id"]]
                h["id"], h["path"] = rec.sha256, rec.path
            hardest_png = hardest_png_bytes(hardest)
            result["_driver_figures"] = {"hardest_examples.png": hardest_png}
            log_eval_report(report, run_id=run_id, hardest=hardest,
                            figures={**result["figures"], "hardest_examples.png": hardest_png})
            metrics = d.metrics()
            if d.lat.get("error"):
                log_tags({"tlpipe.latency_note": d.lat["error"]}, run_id=run_id)
            log_metrics(metrics, run_id=run_id)
            if result.get("finetune") is not None:  # curves, params, adapter / merged model
                from jobs.finetune import log_finetune

                log_finetune(result["finetune"], run_id=run_id)
            head_dir = save_candidate(d, sweep_dir / "candidates" / slug(d.name), run_id,
                                       parent_id, classes, selection_metric)
            log_dir(head_dir / "head", "head", run_id=run_id)
            for doc in ("candidate.json", "selection.json"):
                log_json(json.loads((head_dir / doc).read_text()), doc, run_id=run_id)
            log_tags({HEAD_DIR_TAG: str(head_dir / "head")}, run_id=run_id)
            return str(head_dir / "head")
    except CandidateFailed:
        return None  # recorded: the child run ended FAILED with the remote traceback
    except Exception as exc:  # logging this candidate failed: its run ended FAILED; go on
        logger.warning("could not log candidate %s: %s: %s", d.name, type(exc).__name__, exc)
        return None


# ----------------------------------------------------------------------------- the sweep

def _select(rows, done: Sequence[Outcome], classes, *, metric, tolerance, max_latency_ms,
            max_params_m, latency_key, seed):
    from pipeline.select import NoEligibleCandidateError, select_winner
    from pipeline.variant_pairs import variant_pairs

    y_true, predictions = paired_inputs(done, metric, classes)
    pairs = variant_pairs(rows, y_true, predictions, metric=metric, latency_key=latency_key, seed=seed)
    try:
        return select_winner(candidates_from_rows(rows), y_true=y_true, predictions=predictions,
                             metric_name=metric, tolerance=tolerance,
                             max_latency_ms=max_latency_ms, max_params_m=max_params_m,
                             latency_key=latency_key, seed=seed), None, pairs
    except NoEligibleCandidateError as exc:
        return None, str(exc), pairs


def run_sweep(
    dataset: Any,
    feature_sets: Sequence[FeatureSetRef | Any],
    heads: Iterable[str | HeadConfig] | Mapping[str, Mapping[str, Any]] = DEFAULT_HEADS,
    *,
    root: str | os.PathLike,
    store: Any = None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    head_params: Mapping[str, Mapping[str, Any]] | None = None,
    selection_metric: str = "balanced_accuracy",
    tolerance: float = DEFAULT_TOLERANCE,
    selection: str = "auto",
    cv_folds: int = 5,
    ensembles: bool = True,
    max_latency_ms: float | None = None,
    max_params_m: float | None = None,
    latency_key: str = "latency_ms_b1",
    backbone_latency: Mapping[str, Mapping[str, Any]] | Callable[[FeatureSetRef], Mapping[str, Any]] | None = None,
    text_embedders: Mapping[str, Callable[[list[str]], np.ndarray]] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    hardest_k: int = 16,
    cpus_per_task: float = 1,
    max_backbones_in_flight: int = 3,
    latency_repeats: int = 5,
    latency_device: str = "cpu",
    on_progress: Callable[[int, int], None] | None = None,
) -> SweepResult:
    """Score every candidate without the test split, log everything to MLflow, select.

    `dataset`: a `pipeline.data.Dataset`. `feature_sets`: FeatureSetRef (or BackboneSpec) per
    backbone, already in `store` (default ``<root>/features``). `heads`: names, HeadConfigs or
    {name: params}; `head_params` adds params per head label. `selection`: "auto" (k-fold CV
    on train+val, the validation split above `pipeline.sweep.folds.CV_MAX_ROWS` images), "cv" or
    "val". `tolerance`: how much selection metric a cheaper candidate may lose (paired test).
    `ensembles`: add a head on the concatenated backbones and a Caruana ensemble.
    `backbone_latency`: None measures each backbone here; a mapping {backbone: {latency_ms_b1,
    latency_ms_b32, [params_m]}} or a callable(ref) supplies them.
    `on_progress(done, total)`: called as each candidate is logged; `total` is an upper bound
    until the last call, where it equals `done`.
    """
    import ray

    from feature_store import FeatureStore
    from jobs.finetune import sweep_finetunes
    from jobs.ray_runtime import ensure_ray, node_cpus, task_slots
    from jobs.tracking import (KIND_TAG, log_bytes, log_dataset_card, log_json, log_params,
                               log_tags, setup_mlflow, tracked_run)
    from pipeline.variant_pairs import pair_notes

    head_cfgs, ft_cfgs, refs = sweep_inputs(feature_sets, heads, head_params,
                                            selection_metric=selection_metric, tolerance=tolerance)
    names = [r.backbone for r in refs]
    root = Path(root).expanduser()
    store = store if store is not None else FeatureStore(features_root(root))
    if isinstance(store, (str, os.PathLike)):
        store = FeatureStore(store)
    text_embedders = dict(text_embedders or {})
    classes = [str(c) for c in dataset.classes]
    card = dataset.card.to_dict() if hasattr(dataset.card, "to_dict") else dict(dataset.card)
    splits = split_records(dataset)
    trval = splits["train"] + splits["val"]
    plan = plan_selection([r.label for r in trval], [r.split for r in trval], k=cv_folds,
                          mode=selection)
    folds = fold_lookup([r.sha256 for r in trval], [r.label for r in trval],
                        [r.split for r in trval], plan, seed=seed)
    selection_on, cv_mode = plan.describe(), plan.mode == "cv"

    experiment_id = setup_mlflow(root, experiment)
    run_name = run_name or time.strftime("sweep-%Y%m%d-%H%M%S")
    with tracked_run(experiment_id, run_name=run_name, tags={KIND_TAG: SWEEP_KIND}) as parent:
        parent_id = parent.info.run_id
        sweep_dir = root / "sweeps" / parent_id
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log_params({"backbones": names, "heads": [h.label for h in head_cfgs + ft_cfgs],
                    "head_params": {h.label: loggable_params(h.params) for h in head_cfgs + ft_cfgs},
                    "selection_metric": selection_metric, "selection_on": selection_on,
                    "tolerance": tolerance, "ensembles": ensembles,
                    "max_latency_ms": max_latency_ms, "max_params_m": max_params_m,
                    "latency_key": latency_key, "n_bootstrap": n_bootstrap, "seed": seed},
                   run_id=parent_id)
        log_tags({"tlpipe.budget": f"latency<={max_latency_ms} ms, params<={max_params_m} M"},
                 run_id=parent_id)
        log_dataset_card(card, run_id=parent_id)
        log_json(plan.to_dict(), "selection_plan.json", run_id=parent_id)

        ensure_ray()
        task = ray.remote(head_task).options(num_cpus=cpus_per_task, max_retries=1, num_returns=2)
        skipped: list[dict[str, str]] = []
        head_dirs: dict[str, str] = {}
        figures_by_name: dict[str, dict[str, bytes]] = {}
        lat_by_backbone: dict[str, dict[str, Any]] = {}
        done: list[Outcome] = []
        plans: list[tuple[FeatureSetRef, dict[str, list[Any]]]] = []
        for ref in refs:
            kept, reason = plan_features(store, ref, splits)
            if reason:
                skipped.extend({"backbone": ref.backbone, "head": h.label, "reason": reason}
                               for h in head_cfgs)
            else:
                plans.append((ref, kept))
        kept_by = {ref.backbone: kept for ref, kept in plans}
        expected = expected_candidates([r for r, _ in plans], head_cfgs, ft_cfgs, text_embedders,
                                       ensembles=ensembles)
        if on_progress:
            on_progress(0, expected)
        # backbone latency first, one backbone at a time, before any head task competes for CPU
        for ref, _ in plans:
            lat, why = measure_or_lookup_latency(ref, backbone_latency, latency_device,
                                                 latency_repeats, cache_dir=root / "latency")
            lat_by_backbone[ref.backbone] = {**lat, **({"error": why} if why else {})}

        def features(ref: FeatureSetRef) -> tuple[dict[str, Any], dict[str, Any]]:
            return read_features(store, ref, kept_by[ref.backbone], splits, folds)

        def finish(d: Outcome) -> None:
            if d.ok:
                d.result["selection"]["folds"] = [int(folds[i][0]) for i in d.result["selection"]["ids"]]
            head_dir = _log_candidate(d, parent_id=parent_id, experiment_id=experiment_id,
                                      sweep_dir=sweep_dir, classes=classes, card=card,
                                      selection_metric=selection_metric, selection_on=selection_on)
            if head_dir:
                head_dirs[d.name] = head_dir
                figures_by_name[d.name] = {**d.result.get("figures", {}),
                                           **d.result.get("_driver_figures", {})}
            done.append(d)
            if on_progress:
                on_progress(len(done), max(expected, len(done)))

        tasks = TaskQueue(task_slots(cpus_per_task), max_backbones_in_flight)

        received: list[Outcome] = []  # results in, perhaps not yet logged

        def receive(outcome: Outcome, ref: Any) -> None:
            try:
                outcome.result = ray.get(ref)
            except Exception as exc:  # the worker died (OOM kill, node lost, ...)
                outcome.result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()}
            received.append(outcome)

        # ---- a linear probe on the concatenated backbones, as soon as every backbone's linear
        # probe has chosen its weight decay (its grid is centred there), beside the other heads,
        # from their preparations of the features (under k-fold CV: its row limit keeps them small)
        lin = next((h for h in head_cfgs if h.head == "LinearProbe"), None)
        concat_state = {"started": not (ensembles and lin and len(plans) >= 2)}
        preparations: dict[str, Any] = {}  # backbone -> its linear probe's preparation (a ref)

        def submit_for(rs: list[FeatureSetRef], data_info: Callable[[], tuple], kind: str,
                       cfgs: Sequence[HeadConfig], name_of: Callable[[HeadConfig], str],
                       threads: Callable[[], int] | None = None):
            def go() -> list[Job]:
                data, info = data_info()
                obj = ray.put(data)  # one copy in the object store, shared by these heads
                lat = combined_latency([lat_by_backbone[r.backbone] for r in rs])
                out = []
                for hc in cfgs:
                    why = skip_reason(hc, rs[0], text_embedders) if len(rs) == 1 else None
                    if why:
                        skipped.append({"backbone": rs[0].backbone, "head": hc.label, "reason": why})
                        continue

                    def send(hc=hc):
                        params = task_params(hc, rs[0], text_embedders,
                                             threads() if threads else int(max(1, cpus_per_task)))
                        share = kind == "probe" and hc is lin and cv_mode and not concat_state["started"]
                        fut, prep = task.remote(
                            obj, hc.head, params, classes, selection_metric=selection_metric,
                            n_bootstrap=n_bootstrap, seed=seed, hardest_k=hardest_k,
                            latency_repeats=latency_repeats, share_preparation=share)
                        if share:
                            preparations[rs[0].backbone] = prep
                        return fut, Outcome(name_of(hc), rs, hc.head, hc.label, params, kind, info,
                                            lat, {})
                    out.append(Job(submit_rank(hc.head), send, (kind, hc.label)))
                return out
            return go

        def concat_job() -> list:
            if concat_state["started"] or tasks.waiting(lambda tag: tag == ("probe", lin.label)):
                return []
            concat_state["started"] = True
            ok = {d.refs[0].backbone for d in received
                  if d.ok and d.kind == "probe" and d.label == lin.label}
            frozen = [ref for ref, _ in plans if ref.backbone in ok]
            prep_refs = [preparations.get(r.backbone) for r in frozen]
            preparations.clear()
            if len(frozen) < 2:
                return []
            linear = [ens.concat_head_config(lin, received)]

            def concat() -> tuple:
                parts = [features(r) for r in frozen]
                for (part, _), ref in zip(parts, prep_refs):
                    part["preparation"] = fetch_or_none(ref)
                prep_refs.clear()  # the object store may drop them once the data is put
                data, _ = ens.concat_data([p for p, _ in parts])
                return data, subset_info(parts[0][1], data["ids_test"], len(data["ids"]))
            tag = "concat(" + ",".join(short_backbones([r.backbone for r in frozen])) + ")"
            # the whole node's threads when nothing else runs, one beside other heads (Ray is
            # asked for one CPU either way: no actor can block it)
            return [submit_for(frozen, concat, "concat", linear, lambda hc: f"{tag}+{hc.label}",
                               lambda: 1 if tasks.busy else node_cpus())]

        tasks.run([submit_for(
            [ref], lambda ref=ref: features(ref), "probe",
            head_cfgs, lambda hc, ref=ref: candidate_name(ref.backbone, hc.label))
            for ref, _ in plans], receive, finish, later=concat_job)

        if ensembles:
            made = ens.ensemble_candidate(done, [r for r, _ in plans], head_dirs,
                                       lambda r: features(r)[0], lat_by_backbone, classes, folds,
                                       metric=selection_metric, n_bootstrap=n_bootstrap, seed=seed,
                                       hardest_k=hardest_k, latency_repeats=latency_repeats)
            if isinstance(made, Outcome):
                finish(made)
            else:
                skipped.append({"backbone": "(ensemble)", "head": "ensemble", "reason": made})

        # ---- fine-tunes (jobs.finetune), one at a time after the probes, on the validation split
        if ft_cfgs:
            probe_dirs = {ref.backbone: head_dirs.get(candidate_name(ref.backbone, h.label))
                          for ref, _ in plans for h in head_cfgs if h.head == "LinearProbe"}
            for name, ft_ref, hc, info, lat, result in sweep_finetunes(
                    dataset, [ref for ref, _ in plans], ft_cfgs, probe_dirs, root=root,
                    store=store, sweep_dir=sweep_dir, classes=classes, skipped=skipped,
                    selection_metric=selection_metric, n_bootstrap=n_bootstrap, seed=seed,
                    hardest_k=hardest_k, latency_repeats=latency_repeats,
                    latency_device=latency_device):
                finish(Outcome(name, [ft_ref], hc.head, hc.label, hc.params, "finetune", info, lat,
                            result))

        if on_progress:  # what was skipped or could not be made no longer counts
            on_progress(len(done), len(done))

        # ---- leaderboard, selection, report on the parent
        rows = leaderboard(parent_id)
        selected, selection_error, pairs = _select(
            rows, done, classes, metric=selection_metric, tolerance=tolerance,
            max_latency_ms=max_latency_ms, max_params_m=max_params_m, latency_key=latency_key,
            seed=seed)
        sel_dict, winner_run_id = log_selection(parent_id, rows, selected, selection_error,
                                                skipped, lat_by_backbone)
        log_json(pairs, "variant_pairs.json", run_id=parent_id)  # precision / size variants' cost
        report_path = write_report(
            sweep_dir, rows, card, sel_dict, selection_error, skipped, figures_by_name,
            selection_metric=selection_metric, selection_on=selection_on, latency_key=latency_key,
            title=run_name, parent_id=parent_id, extra_notes=pair_notes(pairs))
        log_bytes(report_path.read_bytes(), "report.html", run_id=parent_id)
        pareto = sweep_dir / "pareto.png"
        if pareto.exists():
            log_bytes(pareto.read_bytes(), "pareto.png", run_id=parent_id)

    return SweepResult(
        parent_run_id=parent_id, experiment_id=experiment_id, rows=rows, selection=sel_dict,
        selection_error=selection_error, winner_run_id=winner_run_id, skipped=skipped,
        head_dirs=head_dirs, report_path=str(report_path), sweep_dir=str(sweep_dir),
        backbone_latency=lat_by_backbone, selection_plan=plan.to_dict())
