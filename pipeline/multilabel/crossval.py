"""Out-of-fold probabilities of a multi-label head, and thresholds tuned on them.

``cross_validate_multilabel`` is the multi-label ``pipeline.sweep.cv.cross_validate``: the same
(R, N) fold matrix (``fold_matrix`` builds one by iterative stratification), out-of-fold
probabilities averaged over repeats, the selection metric (mAP by default) on them, and the
per-label thresholds tuned on them.

``out_of_fold_proba`` fits a fresh head per iteratively stratified fold and scores the rows it
left out, so every row gets a score from a head that never saw it: the honest input for the
selection metric (mAP) and for per-label thresholds. ``fit_with_oof_thresholds`` then fits the
final head on every row and gives it the thresholds tuned out of fold. Only the rows passed in
are used — pass train (+ val), never test.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.multilabel.base import MultiLabelHead, indicator
from pipeline.multilabel.labelsets import label_key
from pipeline.multilabel.metrics import (apply_thresholds, check_multilabel_metric, evaluate_multilabel,
                                         tune_thresholds)
from pipeline.multilabel.stratify import iterative_folds, iterative_stratify


def out_of_fold_proba(make_head: Callable[[], MultiLabelHead], X: Any, Y: Any, *,
                      classes: Sequence[str] | None = None, n_folds: int = 5, seed: int = 0,
                      folds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes, Y indicator (N, L), out-of-fold probabilities (N, L)).

    ``folds``: a fold index per row (default: ``iterative_folds`` of Y)."""
    X = np.asarray(X, dtype=np.float32)
    cls, M = indicator(Y, len(X), classes)
    fold = iterative_folds(M, n_folds, seed) if folds is None else np.asarray(folds)
    P = np.zeros(M.shape, dtype=np.float64)
    for f in np.unique(fold):
        test = fold == f
        head = make_head().fit(X[~test], M[~test], classes=cls.tolist())
        P[test] = head.predict_proba(X[test])
    return cls, M, P


def fit_with_oof_thresholds(make_head: Callable[[], MultiLabelHead], X: Any, Y: Any, *,
                            classes: Sequence[str] | None = None, n_folds: int = 5,
                            seed: int = 0) -> tuple[MultiLabelHead, np.ndarray]:
    """(head fitted on every row with out-of-fold thresholds, the out-of-fold probabilities)."""
    cls, M, P = out_of_fold_proba(make_head, X, Y, classes=classes, n_folds=n_folds, seed=seed)
    head = make_head().fit(X, M, classes=cls.tolist())
    head.set_thresholds(tune_thresholds(M, P), source=f"out_of_fold:{n_folds}")
    return head, P


@dataclass
class MultiLabelCV:
    """Out-of-fold scores of one multi-label candidate (the multi-label ``CVResult``)."""

    rows: np.ndarray          # indices of the rows held out at least once
    proba: np.ndarray         # (len(rows), L) out-of-fold probabilities (averaged over repeats)
    score: float              # selection metric on them (mAP by default)
    fold_scores: list[float]  # per fold of the first repeat
    thresholds: np.ndarray    # (L,) F1-optimal per label on the out-of-fold scores
    fit_seconds: float
    report: dict[str, Any] = field(default_factory=dict)  # evaluate_multilabel on the same rows

    @property
    def std(self) -> float | None:
        return float(np.std(self.fold_scores, ddof=1)) if len(self.fold_scores) > 1 else None


def fold_matrix(Y: np.ndarray, k: int = 5, repeats: int = 1, seed: int = 0) -> np.ndarray:
    """(repeats, N) fold per row, each repeat an iterative stratification with its own seed —
    the multi-label counterpart of ``pipeline.sweep.folds`` (-1 would mean "always trained")."""
    return np.stack([iterative_stratify(Y, [1.0 / k] * k, seed=seed + r) for r in range(int(repeats))])


def cross_validate_multilabel(make_head: Callable[[], MultiLabelHead], X: Any, Y: Any,
                              folds: np.ndarray, classes: Sequence[str], *,
                              metric: str = "map") -> MultiLabelCV:
    """Fit ``make_head()`` once per fold (``folds``: (R, N) or (N,), fold index per row, -1 =
    always trained, as ``pipeline.sweep.folds`` gives), score the held-out rows, and tune the
    per-label thresholds on the averaged out-of-fold scores. Pass train + val rows only."""
    check_multilabel_metric(metric)
    t0 = time.perf_counter()
    X = np.asarray(X, dtype=np.float32)
    cls, M = indicator(Y, len(X), classes)
    folds = np.atleast_2d(np.asarray(folds))
    total = np.zeros(M.shape, dtype=np.float64)
    count = np.zeros(len(M), dtype=np.int64)
    fold_scores: list[float] = []
    for r in range(folds.shape[0]):
        for f in sorted(int(v) for v in np.unique(folds[r]) if v >= 0):
            test = folds[r] == f
            head = make_head().fit(X[~test], M[~test], classes=cls.tolist())
            p = head.predict_proba(X[test])
            total[test] += p
            count[test] += 1
            if r == 0:
                rep = evaluate_multilabel(M[test], p, head.thresholds_, cls.tolist())
                fold_scores.append(rep.metric(metric))
    rows = np.flatnonzero(count > 0)
    if not len(rows):
        raise ValueError("no row is held out by the folds; pass folds with at least one index >= 0")
    proba = total[rows] / count[rows, None]
    thresholds = tune_thresholds(M[rows], proba)
    rep = evaluate_multilabel(M[rows], proba, thresholds, cls.tolist())
    return MultiLabelCV(rows=rows, proba=proba.astype(np.float32), score=rep.metric(metric),
                        fold_scores=fold_scores, thresholds=thresholds,
                        fit_seconds=time.perf_counter() - t0, report=rep.to_dict())


def predicted_sets(proba: np.ndarray, thresholds: np.ndarray, classes: Sequence[str]) -> list[str]:
    """Label-set keys ("cat|dog") per row at the thresholds: what a paired comparison by label
    strings (``pipeline.select``'s accuracy on keys = subset accuracy) would read."""
    P = apply_thresholds(proba, thresholds)
    cls = [str(c) for c in classes]
    return [label_key(cls[j] for j in np.flatnonzero(row)) for row in P]


__all__ = ["MultiLabelCV", "cross_validate_multilabel", "fit_with_oof_thresholds", "fold_matrix",
           "out_of_fold_proba", "predicted_sets"]
