"""`tlpipe run` on a multi-label dataset, after extraction: the multi-label sweep, the winner's
`MultiLabelPredictor` (head refit on train+val with out-of-fold per-label thresholds + a support
index of label sets), the test split scored once for the report, registration with
tag ``tlpipe.task=multilabel``. `jobs.run.run` branches here; it fills its `RunResult` from the
dict `run_multilabel` returns.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from jobs.multilabel_sweep import TASK_TAG, run_multilabel_sweep
from pipeline.multilabel.metrics import evaluate_multilabel
from pipeline.multilabel.predictor import MULTILABEL_TASK
from pipeline.sweep.multilabel import multilabel_heads, multilabel_metric


def build_multilabel_predictor(dataset, store, winner: Mapping[str, Any], head_dir: str):
    """The winner's head (refit on train+val, thresholds tuned out of fold) + its backbone spec +
    a support index of every labelled train+val embedding keyed by label set; the test split is
    scored once (mAP, micro/macro F1 at the thresholds, per-label AP, subset accuracy, decision
    rates) and recorded in ``info["evaluation"]`` — a report, never a choice."""
    from feature_store.index import SupportIndex
    from pipeline.backbones.spec import BackboneSpec
    from pipeline.multilabel.heads import load_multilabel_head
    from pipeline.multilabel.predictor import MultiLabelPredictor

    cdir = Path(head_dir).parent
    meta = json.loads((cdir / "candidate.json").read_text())
    spec, fp = BackboneSpec.from_dict(meta["spec"]), meta["fingerprint"]
    head = load_multilabel_head(head_dir)
    present = store.contains(fp, [r.sha256 for r in dataset.records])
    have = {r.sha256 for r, ok in zip(dataset.records, present) if ok}
    trval = [r for r in dataset.split("train") + dataset.split("val") if r.sha256 in have]
    test = [r for r in dataset.split("test") if r.sha256 in have]
    x_trval = store.get(fp, [r.sha256 for r in trval])
    support = SupportIndex(x_trval.shape[1], hnsw_threshold=20_000)  # as the single-label predictor
    support.add(x_trval, [r.label for r in trval])
    predictor = MultiLabelPredictor(spec, head, support=support, info={
        "task": MULTILABEL_TASK, "backbone": spec.name, "backbones": [spec.name],
        "head": winner.get("head"), "candidate": winner.get("name"), "kind": meta.get("kind"),
        "fingerprint": fp, "fingerprints": [fp], "engine": meta.get("engine"),
        "classes": list(map(str, head.classes_)),
    })
    predictor.fit_reference(x_trval, [r.label for r in trval])  # what serving judges drift against
    evaluation: dict[str, Any] = {"thresholds": predictor.thresholds, "threshold_source": "out_of_fold"}
    if test:
        x_test = store.get(fp, [r.sha256 for r in test])
        y_test = dataset.label_matrix("test")[[i for i, r in enumerate(dataset.split("test"))
                                               if r.sha256 in have]]
        rep = evaluate_multilabel(y_test, head.predict_proba(x_test), head.thresholds_, predictor.classes)
        decisions = [p.decision for p in predictor.predict_embeddings(x_test)]
        evaluation["test"] = {**rep.to_dict(), **{f"{d}_rate": decisions.count(d) / len(decisions)
                                                  for d in ("classifier", "fallback", "abstain")}}
    predictor.info["evaluation"] = evaluation
    return predictor


def run_multilabel(dataset, stats: Sequence[Any], store, *, root: Path, heads: Sequence[str],
                   head_params: Mapping[str, Mapping[str, Any]] | None, selection_metric: str,
                   tolerance: float, selection: str, max_latency_ms: float | None,
                   max_params_m: float | None, model_name: str, test_split_hash: str,
                   register: bool, seed: int, default_heads: Sequence[str] = (),
                   on_sweep_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Sweep, build, save and register; returns RunResult's fields (sweep, model_name, version,
    predictor_dir, calibration)."""
    from jobs.registry import TEST_PREDICTIONS, register_predictor
    from jobs.sweep import feature_sets_from_stats
    from jobs.tracking import log_bytes

    metric = multilabel_metric(selection_metric)
    names, unsupported = multilabel_heads(heads)
    if not names and tuple(heads) == tuple(default_heads):
        names, unsupported = multilabel_heads(["linear", "knn", "mlp"])[0], []
    if not names:
        raise ValueError(f"none of the heads {', '.join(map(str, heads))} has a multi-label version; "
                         "use --heads linear,knn,mlp on a multi-label dataset")
    sweep = run_multilabel_sweep(dataset, feature_sets_from_stats(stats), names, root=root,
                                 store=store, head_params=head_params, selection_metric=metric,
                                 tolerance=tolerance, selection=selection,
                                 max_latency_ms=max_latency_ms, max_params_m=max_params_m,
                                 seed=seed, on_progress=on_sweep_progress)
    sweep.skipped.extend({"backbone": "*", "head": h, "reason": "no multi-label version of this head"}
                         for h in unsupported)
    out: dict[str, Any] = {"sweep": sweep}
    winner = sweep.winner
    if not register or winner is None:
        return out
    head_dir = sweep.head_dirs[winner["name"]]
    predictor = build_multilabel_predictor(dataset, store, winner, head_dir)
    pdir = Path(sweep.sweep_dir) / "predictor"
    predictor.save(pdir)
    shutil.copy2(Path(head_dir).parent / "test_predictions.json", pdir / TEST_PREDICTIONS)
    log_bytes(Path(sweep.report_path).read_bytes(), "report.html", run_id=sweep.parent_run_id)
    test = predictor.info["evaluation"].get("test", {})
    name = model_name
    tags = {
        TASK_TAG: MULTILABEL_TASK, "selection_metric": metric,
        "selection_on": sweep.selection_plan.get("describe"),
        "selection_score": winner.get("selection_score"), "selection_std": winner.get("selection_std"),
        "metric_value": winner.get("test_score"), "test_map": test.get("map"),
        "test_micro_f1": test.get("micro_f1"), "test_macro_f1": test.get("macro_f1"),
        "test_subset_accuracy": test.get("subset_accuracy"),
        "test_split_hash": test_split_hash, "dataset_hash": dataset.card.dataset_hash,
        "backbone": winner.get("backbone"), "head": winner.get("head"), "kind": winner.get("kind"),
        "sweep_run_id": sweep.parent_run_id, "why": (sweep.selection or {}).get("why", ""),
    }
    version = register_predictor(pdir, name, run_id=sweep.parent_run_id,
                                 tags={k: v for k, v in tags.items() if v is not None})
    out.update(model_name=name, version=version, predictor_dir=str(pdir),
               calibration=None, evaluation=predictor.info["evaluation"])
    return out


__all__ = ["build_multilabel_predictor", "run_multilabel"]
