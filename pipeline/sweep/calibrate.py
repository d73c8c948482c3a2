"""Decision thresholds from out-of-fold predictions (more data than the validation split alone).

The classifier threshold is the smallest top-probability cut whose out-of-fold `classifier`
decisions reach the target precision. The fallback threshold is calibrated on the rows the
classifier passes on, with a k-NN vote over the OTHER folds' embeddings (cross-fitted: an image
is never its own neighbour), just as a served image never is.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pipeline.calibration import DEFAULT_KNN_THRESHOLD, knn_vote, min_calibration_rows, precision_threshold


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def cross_fitted_knn(X: np.ndarray, y: np.ndarray, folds: np.ndarray, rows: np.ndarray, k: int,
                     chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(vote label, agreement) for `rows`, each searching only rows of other folds (cosine)."""
    Xn = _unit(X)
    y = np.asarray(y, dtype=str)
    folds = np.asarray(folds)
    # a query's neighbours come from the other folds only: the class sizes its vote sees
    sizes = {}
    for f in np.unique(folds[rows]):
        names, counts = np.unique(y[folds != f], return_counts=True)
        sizes[f] = dict(zip(names.tolist(), counts.tolist()))
    labels = np.empty(len(rows), dtype=object)
    agreement = np.zeros(len(rows))
    for s in range(0, len(rows), chunk):
        q = np.asarray(rows[s:s + chunk])
        sims = Xn[q] @ Xn.T
        sims[folds[q][:, None] == folds[None, :]] = -np.inf  # same fold: not a neighbour
        kk = min(int(k), sims.shape[1])
        top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        sc = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-sc, axis=1, kind="stable")  # best first, as an index answers
        top, sc = np.take_along_axis(top, order, axis=1), np.take_along_axis(sc, order, axis=1)
        lab = np.where(np.isfinite(sc), y[top], "")
        for f in np.unique(folds[q]):
            at = np.flatnonzero(folds[q] == f)
            labels[s + at], agreement[s + at] = knn_vote(sc[at], lab[at], sizes[f])
    return labels, agreement


def calibrate_from_oof(proba: np.ndarray, y: Sequence[str], classes: Sequence[str], *,
                       X: np.ndarray | None = None, folds: np.ndarray | None = None,
                       knn_k: int = 10, target_precision: float = 0.9,
                       default_knn_threshold: float = DEFAULT_KNN_THRESHOLD) -> dict[str, Any]:
    """{threshold, knn_threshold, ...} for a predictor, from out-of-fold probabilities `proba`
    (rows aligned with y, X and folds — the held-out fold of each row)."""
    y = np.asarray([str(v) for v in y])
    classes = np.asarray([str(c) for c in classes])
    top = proba.argmax(axis=1)
    conf = proba[np.arange(len(proba)), top]
    threshold = precision_threshold(conf, classes[top] == y, target_precision=target_precision)
    passed = np.flatnonzero(conf < threshold)
    knn_threshold = default_knn_threshold
    if X is not None and folds is not None and len(passed) >= min_calibration_rows(target_precision) \
            and len(np.unique(folds)) > 1:
        vote, agreement = cross_fitted_knn(X, y, folds, passed, knn_k)
        knn_threshold = precision_threshold(agreement, vote == y[passed],
                                            target_precision=target_precision)
    return {"target_precision": float(target_precision), "threshold": float(threshold),
            "knn_threshold": float(knn_threshold), "calibration_rows": int(len(y)),
            "calibrated_on": "out-of-fold predictions",
            "oof_coverage": float(1 - len(passed) / max(len(y), 1))}


def decision_quality(predictions, y_true: Sequence[str]) -> dict[str, Any]:
    """What the thresholds deliver on held-out images: precision and share of each decision."""
    y = [str(v) for v in y_true]
    n = max(len(y), 1)
    out: dict[str, Any] = {"n": len(y)}
    for decision in ("classifier", "fallback", "abstain"):
        idx = [i for i, p in enumerate(predictions) if p.decision == decision]
        out[f"{decision}_rate"] = len(idx) / n
        if decision != "abstain":
            out[f"{decision}_precision"] = (sum(predictions[i].label == y[i] for i in idx) / len(idx)
                                            if idx else None)
    return out
