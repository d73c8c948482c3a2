"""A finished candidate as the driver holds it (`Outcome`), its cost across backbones, and its
folder on disk: head/, candidate.json, out-of-fold predictions and test predictions — what
`jobs.run.build_predictor` and the promotion gate read back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.numeric import finite_float
from pipeline.sweep.cv import predicted_labels
from pipeline.sweep.plan import FeatureSetRef, loggable_params


@dataclass
class Outcome:
    """One finished (or failed) candidate as the driver holds it until selection."""

    name: str
    refs: list[FeatureSetRef]
    head: str                      # pipeline.heads key
    label: str                     # head label (e.g. "linear")
    params: Mapping[str, Any]
    kind: str                      # probe | concat | ensemble | finetune
    info: Mapping[str, Any]
    lat: Mapping[str, Any]
    result: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.result.get("status") == "ok"

    @property
    def backbone(self) -> str:
        return "+".join(r.backbone for r in self.refs)

    def run_params(self, selection_metric: str, selection_on: str) -> dict[str, Any]:
        """What the candidate's tracking run records as parameters."""
        shown = loggable_params(self.params)
        return {"backbone": self.backbone, "head": self.head, "head_label": self.label,
                "kind": self.kind, "family": "+".join(sorted({r.family for r in self.refs})),
                "fingerprint": ",".join(r.fingerprint for r in self.refs),
                "engine": ",".join(sorted({r.engine for r in self.refs})),
                "dtype": self.refs[0].dtype, "head_params": shown,
                "selection_metric": selection_metric, "selection_on": selection_on,
                **{f"head.{k}": v for k, v in shown.items()},
                **{f"n_{s}": self.info.get(f"n_{s}") for s in ("train", "val", "test")}}

    def metrics(self) -> dict[str, Any]:
        """Selection score, costs (backbones + head; latency and its noise) and timings."""
        result, sel = self.result, self.result["selection"]
        b_lat = {k: finite_float(v) for k, v in self.lat.items() if k.startswith("latency_")}
        backbone_params = finite_float(self.lat.get("params_m"))
        if backbone_params is None and all(r.params_m is not None for r in self.refs):
            backbone_params = float(sum(r.params_m for r in self.refs))
        head_params_m = result["head_numbers"] / 1e6
        out = {"selection_score": sel["score"], "selection_std": sel.get("std"),
               "n_selection": len(sel["ids"]), "fit_seconds": result["fit_seconds"],
               "predict_seconds": result["predict_seconds"],
               "head_size_mb": result["head_size_mb"], "head_params_m": head_params_m,
               "backbone_params_m": backbone_params,
               "params_m": None if backbone_params is None else backbone_params + head_params_m}
        for key, v in result["head_latency"].items():
            out[f"head_{key}"] = v
            b = b_lat.get(key)
            out[f"backbone_{key}"] = b
            out[key] = None if b is None else b + v
        return out


def paired_inputs(done: Sequence[Outcome], metric: str, classes: Sequence[str]
                  ) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """({image id: true label}, {candidate: {image id: predicted label}}) over every finished
    candidate's selection images — the selector's paired comparisons read these."""
    y_true: dict[str, str] = {}
    predictions: dict[str, dict[str, str]] = {}
    for d in done:
        if not d.ok:
            continue
        sel = d.result["selection"]
        y = np.asarray(sel["y"], dtype=str)
        pred = predicted_labels(metric, y, np.asarray(sel["proba"]), classes)
        y_true.update(zip(sel["ids"], y.tolist()))
        predictions[d.name] = dict(zip(sel["ids"], map(str, pred)))
    return y_true, predictions


def combined_latency(lats: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Latency, noise and params of several backbones run one after the other (sums; a missing
    number makes the sum unknown)."""
    out: dict[str, Any] = {}
    keys = {k for lat in lats for k in lat if k.startswith("latency_") or k == "params_m"}
    for k in keys:
        vals = [finite_float(lat.get(k)) for lat in lats]
        out[k] = None if any(v is None for v in vals) else float(sum(vals))
    errors = [lat["error"] for lat in lats if lat.get("error")]
    if errors:
        out["error"] = "; ".join(errors)
    return out


def subset_info(info: Mapping[str, Any], ids_test: Sequence[str], n_trval: int) -> dict[str, Any]:
    keep = set(ids_test)
    test = [r for r in info["test_records"] if r.sha256 in keep]
    return {"test_records": test, "n_train": n_trval, "n_val": 0, "n_test": len(test)}


def save_candidate(d: Outcome, cdir: Path, run_id: str, parent_id: str, classes: Sequence[str],
                    selection_metric: str) -> Path:
    """The candidate folder: head/, candidate.json, its out-of-fold predictions and its test
    predictions (what `build_predictor` and the promotion gate read back)."""
    result = d.result
    (cdir / "head").mkdir(parents=True, exist_ok=True)
    for rel, data in result["head_files"].items():
        (cdir / "head" / rel).parent.mkdir(parents=True, exist_ok=True)
        (cdir / "head" / rel).write_bytes(data)
    meta = {"name": d.name, "kind": d.kind, "backbone": "+".join(r.backbone for r in d.refs),
            "backbones": [r.backbone for r in d.refs],
            "fingerprints": [r.fingerprint for r in d.refs],
            "fingerprint": d.refs[0].fingerprint, "engine": d.refs[0].engine,
            "dtype": d.refs[0].dtype, "family": "+".join(sorted({r.family for r in d.refs})),
            "head": d.head, "head_label": d.label, "classes": list(classes), "run_id": run_id,
            "sweep_run_id": parent_id,
            "finetune_dir": getattr(result.get("finetune"), "artifacts_dir", None),
            "specs": [r.spec.to_dict() if hasattr(r.spec, "to_dict") else None for r in d.refs]}
    meta["spec"] = meta["specs"][0]
    (cdir / "candidate.json").write_text(json.dumps(meta, indent=2, default=str))
    sel = result["selection"]
    np.save(cdir / "selection_proba.npy", np.asarray(sel["proba"], dtype=np.float32))
    (cdir / "selection.json").write_text(json.dumps(
        {k: sel.get(k) for k in ("ids", "y", "folds", "score", "std", "fold_scores", "chosen")},
        default=float))
    test = d.info["test_records"]
    y_test = np.asarray([r.label for r in test], dtype=str)
    test_pred = predicted_labels(selection_metric, y_test, result["test_proba"], classes)
    (cdir / "test_predictions.json").write_text(json.dumps(
        {"metric": selection_metric, "ids": [r.sha256 for r in test],
         "y_true": y_test.tolist(), "y_pred": [str(v) for v in test_pred]}))
    return cdir
