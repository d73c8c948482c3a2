"""One candidate, end to end and without Ray or MLflow: out-of-fold selection score, refit on all
labelled rows, one scoring of the test split for the report, head latency and saved files.

`data` (one feature set, i.e. one backbone or a concatenation) holds:
``X, y, ids`` (train+val rows), ``folds`` (R, N) (see `pipeline.sweep.folds`), and
``X_test, y_test, ids_test``; optionally ``preparation``, the linear probe's label-free
`pipeline.sweep.cv.shared_preparation` of ``X`` when it was already made.
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
from pipeline.sweep.cv import align_proba, cross_validate, refit

#: what a head task imports on first use (torch for the solvers, FAISS for k-NN, PIL for the
#: figures): workers can import them before the first task arrives (`jobs.ray_runtime.warm_workers`)
TASK_MODULES = ("torch", "faiss", "pipeline.sweep.candidate", "pipeline.heads", "pipeline.charts",
                "pipeline.evaluate")


def fitted_scalars(head: Any) -> dict[str, Any]:
    """The head's fitted scalar attributes (``name_`` convention), for MLflow params."""
    out = {}
    for k, v in vars(head).items():
        if k.endswith("_") and not k.startswith("_") and k not in ("classes_", "n_features_in_"):
            if isinstance(v, (bool, int, float, str, np.integer, np.floating)):
                out[k] = v.item() if isinstance(v, np.generic) else v
    return out


def stored_numbers(head_dir: Path) -> int:
    """How many numbers a saved head stores (safetensors arrays + FAISS vectors)."""
    from safetensors.numpy import load_file

    total = 0
    for p in Path(head_dir).rglob("*.safetensors"):
        total += sum(int(a.size) for a in load_file(str(p)).values())
    for p in Path(head_dir).rglob("*.faiss"):  # index files store float32 vectors
        total += p.stat().st_size // 4
    return total


def selection_result(cv, ids: Sequence[str], y: np.ndarray) -> dict[str, Any]:
    """The plain-data selection part of a candidate result (out-of-fold rows only)."""
    return {"ids": [str(ids[i]) for i in cv.rows], "y": [str(y[i]) for i in cv.rows],
            "proba": cv.proba, "score": float(cv.score), "std": cv.std,
            "fold_scores": [float(s) for s in cv.fold_scores], "chosen": dict(cv.chosen)}


def fit_evaluate(data: Mapping[str, Any], head_name: str, params: Mapping[str, Any],
                 classes: Sequence[str], *, selection_metric: str, n_bootstrap: int, seed: int,
                 hardest_k: int, latency_batch_sizes: Sequence[int] = LATENCY_BATCH_SIZES,
                 latency_repeats: int = 5, share_preparation: bool = False) -> dict[str, Any]:
    """Cross-validate, refit on train+val, score the test split once. Never raises: a failure
    comes back as ``{"status": "failed", "error", "traceback"}``. `share_preparation`: a linear
    probe's result also carries its ``preparation`` of ``X`` (see `data`), for a concatenation
    of this feature set with others to start from."""
    try:
        X, y = data["X"], np.asarray(data["y"], dtype=str)
        cv = cross_validate(head_name, params, X, y, data["folds"], classes, metric=selection_metric,
                            preparation=data.get("preparation"))
        t0 = time.perf_counter()
        head = refit(head_name, cv.refit_params, X, y, **cv.fit_kwargs)
        fit_s = cv.fit_seconds + time.perf_counter() - t0
        result = evaluate_head(head, data, classes, fit_seconds=fit_s,
                               selection_metric=selection_metric, n_bootstrap=n_bootstrap,
                               seed=seed, hardest_k=hardest_k,
                               latency_batch_sizes=latency_batch_sizes,
                               latency_repeats=latency_repeats)
        result["selection"] = selection_result(cv, data["ids"], y)
        result["fitted"] = {**result["fitted"], **{f"cv_{k}": v for k, v in cv.chosen.items()}}
        if share_preparation and "rotated" in cv.fit_kwargs:
            result["preparation"] = {k: cv.fit_kwargs[k] for k in ("scaler", "basis", "rotated")}
        return result
    except Exception as exc:
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()}


def evaluate_head(head: Any, data: Mapping[str, Any], classes: Sequence[str], *,
                  fit_seconds: float, selection_metric: str, n_bootstrap: int, seed: int,
                  hardest_k: int, latency_batch_sizes: Sequence[int] = LATENCY_BATCH_SIZES,
                  latency_repeats: int = 5) -> dict[str, Any]:
    """A fitted head on the test split (reporting only): evaluation, hardest examples, latency,
    saved files and figures. Shared by probes, ensembles and fine-tunes."""
    from pipeline.charts import evaluation_pngs
    from pipeline.evaluate import evaluate, hardest_examples

    X_test = data["X_test"]
    t0 = time.perf_counter()
    proba = align_proba(np.asarray(head.predict_proba(X_test)), head.classes_, classes)
    predict_s = time.perf_counter() - t0
    report = evaluate(data["y_test"], proba, classes, selection_metric=selection_metric,
                      n_bootstrap=n_bootstrap, seed=seed)
    hardest = hardest_examples(data["y_test"], proba, classes, ids=list(range(len(X_test))),
                               k=hardest_k)

    def make_batch(bs: int) -> np.ndarray:
        reps = math.ceil(bs / len(X_test))
        return np.ascontiguousarray(np.tile(X_test, (reps, 1))[:bs])

    lat = measure_latency(head.predict_proba, make_batch, batch_sizes=latency_batch_sizes,
                          warmup=1, repeats=latency_repeats)
    with tempfile.TemporaryDirectory(prefix="tlpipe-head-") as tmp:
        head.save(tmp)
        numbers = stored_numbers(Path(tmp))
        files = {str(p.relative_to(tmp)): p.read_bytes()
                 for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
    figures = evaluation_pngs(report)
    return {
        "status": "ok", "report": report.to_dict(), "hardest": hardest,
        "test_proba": proba.astype(np.float32),
        "head_files": files, "head_numbers": int(numbers),
        "head_size_mb": sum(len(b) for b in files.values()) / 1e6,
        "fit_seconds": fit_seconds, "predict_seconds": predict_s,
        "head_latency": {k: v for k, v in lat.items() if k.startswith("latency_")},
        "fitted": fitted_scalars(head), "figures": figures,
    }
