"""`tlpipe run DATA`: validate → extract → sweep → select → register, in one command.

Everything is computed by pipeline/ (intake, heads, evaluation, selection, the predictor) and
jobs.extract / jobs.sweep (Ray); this module wires them and registers the winner as a new version
of the registered model named after the dataset, with alias `challenger`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jobs.tracking import check_tracking_server, log_bytes, setup_mlflow, tracking_uri_for
from pipeline.archives import is_archive, unpack
from pipeline.data import load_dataset
from pipeline.data.sources import discover
from pipeline.settings import DEFAULT_EXPERIMENT, DEFAULT_STATE_ROOT, features_root, state_root
from pipeline.sweep.candidate import TASK_MODULES
from pipeline.sweep.plan import DEFAULT_HEADS, resolve_heads
from pipeline.sweep.report import add_section, calibration_section

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    dataset: Any
    extract_stats: list
    sweep: Any
    skipped_backbones: list[dict] = field(default_factory=list)
    model_name: str | None = None
    version: str | None = None
    promotion: Any = None
    predictor_dir: str | None = None
    calibration: dict | None = None  # the registered predictor's thresholds and what they deliver
    evaluation: dict | None = None  # multi-label: the test split's report and per-label thresholds


def model_name_for(dataset) -> str:
    """Registered-model name from the dataset's name (letters, digits, '-', '_', '.').

    The name also becomes a folder name (serving state, downloads), so it is one safe path
    component: no separators, never '.' or '..', no leading dot, at most 100 characters."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(dataset.card.name or "dataset"))
    name = re.sub(r"\.{2,}", ".", name).strip("-.")[:100].strip("-.")
    return name or "dataset"


def split_hash(records) -> str:
    """Identity of a split's content and labels: promotion compares only on the same test split."""
    h = hashlib.sha256()
    for sha, label in sorted((r.sha256, r.label) for r in records):
        h.update(f"{sha}:{label}\n".encode())
    return h.hexdigest()


def default_backbones() -> tuple[list[str], list[dict]]:
    """Every registered backbone whose weights are on this machine; the rest with the reason."""
    from pipeline.backbones import list_specs, weights_available

    usable, skipped = [], []
    for spec in list_specs():
        ok, why = weights_available(spec)
        (usable.append(spec.name) if ok else skipped.append({"backbone": spec.name, "reason": why}))
    return usable, skipped


def build_predictor(dataset, store, winner: dict, head_dir: str, *, target_precision: float = 0.9):
    """The winner's head (refit on train+val) + its backbone spec(s) + a support index of every
    labelled train+val embedding + thresholds calibrated on its out-of-fold predictions; what the
    thresholds deliver is measured once on the test split and recorded in `info`."""
    from feature_store.index import SupportIndex
    from pipeline.backbones.spec import BackboneSpec
    from pipeline.heads import load_head
    from pipeline.predictor import Predictor
    from pipeline.sweep.calibrate import calibrate_from_oof, decision_quality

    cdir = Path(head_dir).parent
    meta = json.loads((cdir / "candidate.json").read_text())
    specs = [BackboneSpec.from_dict(d) for d in (meta.get("specs") or [meta["spec"]])]
    fps = meta.get("fingerprints") or [meta["fingerprint"]]
    head = load_head(head_dir)

    def embed(ids):
        return np.concatenate([store.get(fp, ids) for fp in fps], axis=1)

    present = np.ones(len(dataset.records), dtype=bool)
    for fp in fps:
        present &= store.contains(fp, [r.sha256 for r in dataset.records])
    have = {r.sha256 for r, ok in zip(dataset.records, present) if ok}
    trval = [r for r in dataset.split("train") + dataset.split("val") if r.sha256 in have]
    test = [r for r in dataset.split("test") if r.sha256 in have]
    x_trval = embed([r.sha256 for r in trval])
    # exact search below 20k support vectors, HNSW above (see BENCHMARKS.md, serving fallback)
    support = SupportIndex(x_trval.shape[1], hnsw_threshold=20_000)
    support.add(x_trval, [r.label for r in trval])
    predictor = Predictor(specs if len(specs) > 1 else specs[0], head, support=support, info={
        "backbone": "+".join(s.name for s in specs), "backbones": [s.name for s in specs],
        "head": winner.get("head"), "candidate": winner.get("name"), "kind": meta.get("kind"),
        "fingerprint": fps[0], "fingerprints": fps, "engine": meta.get("engine"),
        "classes": list(map(str, head.classes_)),
    })
    predictor.fit_reference(x_trval, [r.label for r in trval])  # what serving judges drift against
    sel = json.loads((cdir / "selection.json").read_text())
    proba = np.load(cdir / "selection_proba.npy", allow_pickle=False)
    cal = calibrate_from_oof(proba, sel["y"], predictor.classes, X=embed(sel["ids"]),
                             folds=np.asarray(sel.get("folds") or np.zeros(len(sel["ids"]))),
                             knn_k=predictor.knn_k, target_precision=target_precision)
    predictor.threshold, predictor.knn_threshold = cal["threshold"], cal["knn_threshold"]
    if test:
        cal["test"] = decision_quality(predictor.predict_embeddings(embed([r.sha256 for r in test])),
                                       [r.label for r in test])
    predictor.info["calibration"] = cal
    return predictor


def listing(data: str, *, multi_label: bool | None = None, label_separator: str = "|"):
    """What `data` (a folder, manifest, HF folder or archive, unpacked first) lists: quick, and
    raises at once for a missing path or an unknown layout (`load_dataset` then checks every file)."""
    return discover(str(unpack(data)) if is_archive(data) else data, multi_label=multi_label,
                    separator=label_separator)


def _setup_tracking_once_loaded(loading, root: Path) -> str | None:
    """`setup_mlflow` (the state root's store) once `loading` (None: nothing to wait for) has
    loaded the dataset; MLflow's import meanwhile. None when the dataset failed."""
    import mlflow  # noqa: F401  (seconds of import, overlapping Ray's start)

    if loading is not None and loading.exception() is not None:
        return None
    return setup_mlflow(root, DEFAULT_EXPERIMENT)


def run(
    data: str,
    *,
    root: str | Path = DEFAULT_STATE_ROOT,
    backbones: Sequence[str] | None = None,
    heads: Sequence[str] = DEFAULT_HEADS,
    head_params: Mapping[str, Mapping[str, Any]] | None = None,
    max_latency_ms: float | None = None,
    max_params_m: float | None = None,
    selection_metric: str = "balanced_accuracy",
    tolerance: float = 0.005,
    selection: str = "auto",
    ensembles: bool = True,
    target_precision: float = 0.9,
    model_name: str | None = None,
    register: bool = True,
    seed: int = 0,
    on_progress: Callable[[str, int, int], None] | None = None,
    on_sweep_progress: Callable[[int, int], None] | None = None,
    dataset=None,
    precisions: Sequence[str] = (),
    sizes: Sequence[int] = (),
    multi_label: bool | None = None,
    label_separator: str = "|",
    on_dataset: Callable[[Any], None] | None = None,
) -> RunResult:
    import ray

    from feature_store import FeatureStore
    from jobs.extract import extract_features
    from jobs.ray_runtime import ensure_ray, warm_workers
    from jobs.registry import prepare_registration
    from jobs.sweep import feature_sets_from_stats, run_sweep

    root = state_root(root)  # a local dir (file:// accepted); URLs are refused with the fix
    skipped: list[dict] = []
    if not backbones:
        backbones, skipped = default_backbones()
        if not backbones:
            from pipeline.backbones import WeightsUnavailableError

            raise WeightsUnavailableError("*", "no backbone has weights on this machine: " +
                                          "; ".join(f"{s['backbone']}: {s['reason']}" for s in skipped))
    from pipeline.backbones import get_spec

    specs = [get_spec(b) for b in backbones]  # an unknown name fails before Ray starts, with the list
    resolve_heads(heads, head_params)  # so does an unknown head (or none)
    if precisions or sizes:  # each (backbone, size, precision) is a backbone of its own
        from pipeline.backbones.variants import expand

        backbones = [v.name for v in expand(specs, sizes, precisions)]
    check_tracking_server(tracking_uri_for(root))  # a server that is down: one line, before Ray or extraction
    with ThreadPoolExecutor(2, thread_name_prefix="tlpipe-start") as pool:
        # the intake's file checks (decoding every image) and MLflow's import (CPU) overlap Ray's
        # start (mostly waiting for its processes); Ray stays on the main thread, where it must
        # be initialised. A listing that fails stops here, before Ray starts; a dataset whose
        # files leave nothing usable stops once Ray is up, with nothing written under the root.
        loading = None if dataset is not None else pool.submit(
            load_dataset, listing(data, multi_label=multi_label, label_separator=label_separator),
            seed=seed)
        tracking = pool.submit(_setup_tracking_once_loaded, loading, root)
        started_ray = not ray.is_initialized()  # then it is stopped again once it is not needed
        ensure_ray()
        warm_workers(TASK_MODULES)  # the sweep's workers import torch & co. meanwhile
        if loading is not None:
            dataset = loading.result()
            if on_dataset:
                on_dataset(dataset)
        tracking.result()
    store = FeatureStore(features_root(root))  # $TLPIPE_FEATURES (a shared fsspec URL) or <root>/features
    stats = extract_features([(r.sha256, r.path) for r in dataset.records], backbones, store=store,
                             on_progress=on_progress, calibration_seed=seed,
                             calibration=[(r.sha256, r.path) for r in dataset.split("train")])
    for s in stats:
        if s.failed:
            logger.warning("%s: %d images failed to decode and are left out", s.backbone, len(s.failed))
    if getattr(dataset, "multi_label", False):  # label sets: jobs.multilabel_run sweeps and registers
        from jobs.multilabel_run import run_multilabel

        return RunResult(dataset, stats, skipped_backbones=skipped, **run_multilabel(
            dataset, stats, store, root=root, heads=heads, head_params=head_params,
            selection_metric=selection_metric, tolerance=tolerance, selection=selection,
            max_latency_ms=max_latency_ms, max_params_m=max_params_m, register=register,
            model_name=model_name or model_name_for(dataset), seed=seed, default_heads=DEFAULT_HEADS,
            test_split_hash=split_hash(dataset.split("test")), on_sweep_progress=on_sweep_progress))
    with ThreadPoolExecutor(1, thread_name_prefix="tlpipe-register") as pool:
        if register:  # a failure here shows again, where it matters, at the registration
            pool.submit(prepare_registration)
        sweep = run_sweep(dataset, feature_sets_from_stats(stats), heads, root=root, store=store,
                          head_params=head_params, selection_metric=selection_metric,
                          tolerance=tolerance, selection=selection, ensembles=ensembles,
                          max_latency_ms=max_latency_ms, max_params_m=max_params_m, seed=seed,
                          on_progress=on_sweep_progress)
    result = RunResult(dataset, stats, sweep, skipped)
    with ThreadPoolExecutor(1, thread_name_prefix="tlpipe-package") as pool:
        packaging = pool.submit(_package_winner, result, store, root=root, register=register,
                                model_name=model_name, target_precision=target_precision,
                                selection_metric=selection_metric)
        if started_ray:  # nothing after the sweep needs Ray: it stops while the winner is packaged
            ray.shutdown()
        packaging.result()
    return result


def _package_winner(result: RunResult, store, *, root: Path, register: bool,
                    model_name: str | None, target_precision: float, selection_metric: str) -> None:
    """The winner's predictor (refit head, support set, calibrated thresholds), its report
    section and its registration as a new model version; sets `result`'s registry fields."""
    from jobs.registry import TEST_PREDICTIONS, register_predictor

    dataset, sweep, skipped = result.dataset, result.sweep, result.skipped_backbones
    setup_mlflow(root, DEFAULT_EXPERIMENT)
    if skipped:
        import mlflow

        with mlflow.start_run(run_id=sweep.parent_run_id):
            mlflow.log_dict({"skipped_backbones": skipped}, "skipped_backbones.json")
    winner = sweep.winner
    if not register or winner is None:
        return
    head_dir = sweep.head_dirs[winner["name"]]
    predictor = build_predictor(dataset, store, winner, head_dir, target_precision=target_precision)
    pdir = Path(sweep.sweep_dir) / "predictor"
    predictor.save(pdir)
    add_section(sweep.report_path, calibration_section(predictor.info["calibration"]))
    log_bytes(Path(sweep.report_path).read_bytes(), "report.html", run_id=sweep.parent_run_id)
    shutil.copy2(Path(head_dir).parent / "test_predictions.json", pdir / TEST_PREDICTIONS)
    name = model_name or model_name_for(dataset)
    test_q = predictor.info["calibration"].get("test", {})
    tags = {
        "selection_metric": selection_metric, "selection_on": sweep.selection_plan.get("describe"),
        "selection_score": winner.get("selection_score"), "selection_std": winner.get("selection_std"),
        "metric_value": winner.get("test_score"), "ci_low": winner.get("test_ci_low"),
        "ci_high": winner.get("test_ci_high"),
        "test_split_hash": split_hash(dataset.split("test")),
        "dataset_hash": dataset.card.dataset_hash, "backbone": winner.get("backbone"),
        "head": winner.get("head"), "kind": winner.get("kind"), "sweep_run_id": sweep.parent_run_id,
        "threshold": predictor.threshold, "knn_threshold": predictor.knn_threshold,
        "target_precision": target_precision,
        "test_classifier_precision": test_q.get("classifier_precision"),
        "test_classifier_rate": test_q.get("classifier_rate"),
        "why": (sweep.selection or {}).get("why", ""),
    }
    result.version = register_predictor(pdir, name, run_id=sweep.parent_run_id,
                                        tags={k: v for k, v in tags.items() if v is not None})
    result.model_name, result.predictor_dir = name, str(pdir)
    result.calibration = dict(predictor.info["calibration"])
