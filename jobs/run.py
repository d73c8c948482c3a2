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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_HEADS = ("linear", "knn", "centroid", "mlp")
#: heads that fine-tune the backbone instead (jobs.finetune): `heads=(..., "lora")` or "full"
FINETUNE_HEADS = ("lora", "full")


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
    """The winner's head + its backbone spec + a support index + thresholds calibrated on val."""
    from feature_store.index import SupportIndex
    from pipeline.backbones.spec import BackboneSpec
    from pipeline.heads import load_head
    from pipeline.predictor import Predictor

    meta = json.loads((Path(head_dir).parent / "candidate.json").read_text())
    spec = BackboneSpec.from_dict(meta["spec"])
    fp = meta["fingerprint"]
    head = load_head(head_dir)
    present = {k for k, ok in zip((r.sha256 for r in dataset.records),
                                  store.contains(fp, [r.sha256 for r in dataset.records])) if ok}
    train = [r for r in dataset.split("train") if r.sha256 in present]
    val = [r for r in dataset.split("val") if r.sha256 in present]
    # exact search below 20k support vectors, HNSW above (≈0.7 ms vs ≈100 ms a query at 100k)
    support = SupportIndex(int(spec.embed_dim) or store.get(fp, [train[0].sha256]).shape[1],
                           hnsw_threshold=20_000)
    support.add(store.get(fp, [r.sha256 for r in train]), [r.label for r in train])
    predictor = Predictor(spec, head, support=support, info={
        "backbone": spec.name, "head": winner.get("head"), "candidate": winner.get("name"),
        "fingerprint": fp, "engine": meta.get("engine"), "classes": list(map(str, head.classes_)),
    })
    if val:
        x_val = store.get(fp, [r.sha256 for r in val])
        predictor.calibrate(x_val, [r.label for r in val], target_precision=target_precision)
        # after calibration the validation examples join the support set served as fallback
        predictor.support = support.with_added(x_val, [r.label for r in val])
    return predictor


def run(
    data: str,
    *,
    root: str | Path = ".tlpipe",
    backbones: Sequence[str] | None = None,
    heads: Sequence[str] = DEFAULT_HEADS,
    head_params: Mapping[str, Mapping[str, Any]] | None = None,
    max_latency_ms: float | None = None,
    max_params_m: float | None = None,
    selection_metric: str = "balanced_accuracy",
    target_precision: float = 0.9,
    model_name: str | None = None,
    register: bool = True,
    seed: int = 0,
    on_progress: Callable[[str, int, int], None] | None = None,
    dataset=None,
) -> RunResult:
    from feature_store import FeatureStore
    from jobs.extract import extract_features
    from jobs.registry import register_predictor
    from jobs.sweep import feature_sets_from_stats, run_sweep
    from jobs.sweep import DEFAULT_EXPERIMENT
    from jobs.tracking import setup_mlflow

    root = Path(root)
    if dataset is None:
        from pipeline.archives import is_archive, unpack
        from pipeline.data import load_dataset

        dataset = load_dataset(str(unpack(data)) if is_archive(data) else data, seed=seed)
    skipped: list[dict] = []
    if not backbones:
        backbones, skipped = default_backbones()
        if not backbones:
            from pipeline.backbones import WeightsUnavailableError

            raise WeightsUnavailableError("*", "no backbone has weights on this machine: " +
                                          "; ".join(f"{s['backbone']}: {s['reason']}" for s in skipped))
    store = FeatureStore(root / "features")
    stats = extract_features([(r.sha256, r.path) for r in dataset.records], backbones, store=store,
                             on_progress=on_progress)
    for s in stats:
        if s.failed:
            logger.warning("%s: %d images failed to decode and are left out", s.backbone, len(s.failed))
    sweep = run_sweep(dataset, feature_sets_from_stats(stats), heads, root=root, store=store,
                      head_params=head_params, selection_metric=selection_metric, max_latency_ms=max_latency_ms,
                      max_params_m=max_params_m, seed=seed)
    result = RunResult(dataset, stats, sweep, skipped)
    setup_mlflow(root, DEFAULT_EXPERIMENT)
    if skipped:
        import mlflow

        with mlflow.start_run(run_id=sweep.parent_run_id):
            mlflow.log_dict({"skipped_backbones": skipped}, "skipped_backbones.json")
    winner = sweep.winner
    if not register or winner is None:
        return result
    head_dir = sweep.head_dirs[winner["name"]]
    predictor = build_predictor(dataset, store, winner, head_dir, target_precision=target_precision)
    pdir = Path(sweep.sweep_dir) / "predictor"
    predictor.save(pdir)
    name = model_name or model_name_for(dataset)
    tags = {
        "selection_metric": selection_metric, "metric_value": winner.get("metric"),
        "ci_low": winner.get("ci_low"), "ci_high": winner.get("ci_high"),
        "test_split_hash": split_hash(dataset.split("test")),
        "dataset_hash": dataset.card.dataset_hash, "backbone": winner.get("backbone"),
        "head": winner.get("head"), "sweep_run_id": sweep.parent_run_id,
        "threshold": predictor.threshold, "knn_threshold": predictor.knn_threshold,
        "why": (sweep.selection or {}).get("why", ""),
    }
    result.version = register_predictor(pdir, name, run_id=sweep.parent_run_id, tags=tags)
    result.model_name, result.predictor_dir = name, str(pdir)
    return result
