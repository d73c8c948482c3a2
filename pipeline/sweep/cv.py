"""Out-of-fold scoring of one head on one feature matrix, and its refit on all labelled rows.

`cross_validate` fits the head once per fold on the rows not held out and predicts the held-out
rows, so every train+val image gets a prediction from a model that never saw it (averaged over
repeats on tiny sets). The LinearProbe is tuned inside the same folds: one batched fit of all
its weight decays per fold, scored on the held-out fold, and the weight decay with the best
out-of-fold selection metric is kept (what GridSearchCV does with `C`); its refit keeps the
chosen C, i.e. the weight decay rescaled to the larger row count. Other heads tune themselves on
their own inner hold-out of each fold's training rows, so their out-of-fold scores are nested.
The LinearProbe's folds share one standardisation and preconditioner computed on every row:
label-free statistics (means, variances, the features' second moments), like a feature
extractor's, never the held-out labels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.evaluate import SELECTION_METRICS
from pipeline.heads import HEADS

#: weight decays either side of the first fold's best that the other folds fit (a grid step is
#: about a third of a decade): values further out were clearly behind on the first fold
CV_WINDOW = 2


@dataclass
class CVResult:
    """Out-of-fold probabilities (rows = the held-out rows, columns = `classes`) and scores."""

    rows: np.ndarray                 # indices into the input rows that were held out
    proba: np.ndarray                # (len(rows), C) float32
    score: float                     # selection metric on the out-of-fold predictions
    fold_scores: list[float]         # per fold (first repeat), for the spread
    refit_params: dict[str, Any]     # head params for the final fit on all rows
    fit_seconds: float
    chosen: dict[str, Any] = field(default_factory=dict)  # e.g. {"weight_decay": ..., "C": ...}
    fit_kwargs: dict[str, Any] = field(default_factory=dict)  # for `refit` (speed only)

    @property
    def std(self) -> float | None:
        return float(np.std(self.fold_scores, ddof=1)) if len(self.fold_scores) > 1 else None


def align_proba(proba: np.ndarray, head_classes: Sequence[Any], classes: Sequence[str]) -> np.ndarray:
    """Reorder a head's columns to `classes` (classes the head never saw get probability 0)."""
    index = {str(c): i for i, c in enumerate(classes)}
    out = np.zeros((proba.shape[0], len(classes)), dtype=np.float64)
    for j, c in enumerate(head_classes):
        out[:, index[str(c)]] = proba[:, j]
    return out


def metric_from_proba(metric: str, y: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> float:
    """One selection metric of (N, C) probabilities against string labels (no bootstrap)."""
    return metric_from_codes(metric, label_codes(y, classes), proba)


def metric_from_codes(metric: str, yi: np.ndarray, proba: np.ndarray) -> float:
    """`metric_from_proba` with the labels already as column indices of `proba` (loops that
    score many candidates on the same rows encode the labels once)."""
    if metric not in SELECTION_METRICS:
        raise ValueError(f"unknown selection metric {metric!r}; choose one of {SELECTION_METRICS}")
    pred = proba.argmax(axis=1)
    if metric == "accuracy":
        return float(np.mean(pred == yi))
    if metric == "top5":
        k = min(5, proba.shape[1])
        topk = np.argsort(-proba, axis=1, kind="stable")[:, :k]
        return float(np.mean((topk == yi[:, None]).any(axis=1)))
    c = proba.shape[1]
    cm = np.bincount(yi * c + pred, minlength=c * c).reshape(c, c)
    support, n_pred, tp = cm.sum(1), cm.sum(0), np.diag(cm)
    present = support > 0
    if metric == "balanced_accuracy":
        return float(np.mean(tp[present] / support[present]))
    denom = support + n_pred
    f1 = np.divide(2.0 * tp, denom, out=np.zeros(c), where=denom > 0)
    return float(np.mean(f1[denom > 0]))


def predicted_labels(metric: str, y: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Per-row labels for paired comparisons: the argmax class; for top-5, the true label when it
    is among the top 5 (a hit) and a marker otherwise, so accuracy on them is top-5 accuracy."""
    classes = np.asarray([str(c) for c in classes])
    if metric != "top5":
        return classes[proba.argmax(axis=1)]
    k = min(5, proba.shape[1])
    topk = classes[np.argsort(-proba, axis=1, kind="stable")[:, :k]]
    y = np.asarray(y, dtype=str)
    return np.where((topk == y[:, None]).any(axis=1), y, "\u2205miss")


def _fit(head_name: str, params: Mapping[str, Any], X, y, **kw):
    return HEADS[head_name](**dict(params)).fit(X, y, **kw)


def cross_validate(head_name: str, params: Mapping[str, Any], X: np.ndarray, y: np.ndarray,
                   folds: np.ndarray, classes: Sequence[str], *, metric: str,
                   preparation: Mapping[str, Any] | None = None) -> CVResult:
    """Out-of-fold predictions of `head_name(**params)` on the rows that `folds` holds out.
    `preparation`: the linear probe's `shared_preparation` of these rows when already made
    (e.g. `joined_preparation` of a concatenation's parts); other heads ignore it."""
    folds = np.atleast_2d(np.asarray(folds))
    y = np.asarray(y, dtype=str)
    t0 = time.perf_counter()
    held = np.flatnonzero((folds >= 0).any(axis=0))
    if head_name == "LinearProbe":  # one shared preconditioner, a tuned or a fixed weight decay
        res = _cv_linear(params, X, y, folds, classes, metric, held, preparation)
    else:
        res = _cv_plain(head_name, params, X, y, folds, classes, metric, held)
    res.fit_seconds = time.perf_counter() - t0
    return res


def _tunes_weight_decay(params: Mapping[str, Any]) -> bool:
    wd = params.get("weight_decays")
    return wd is None or len(np.atleast_1d(wd)) > 1


def _fold_ids(folds: np.ndarray, r: int) -> list[int]:
    return sorted(int(f) for f in np.unique(folds[r]) if f >= 0)


def _cv_plain(head_name, params, X, y, folds, classes, metric, held) -> CVResult:
    C = len(classes)
    total = np.zeros((X.shape[0], C), dtype=np.float64)
    count = np.zeros(X.shape[0], dtype=np.int64)
    fold_scores: list[float] = []
    for r in range(folds.shape[0]):
        for f in _fold_ids(folds, r):
            test = folds[r] == f
            head = _fit(head_name, params, X[~test], y[~test])
            p = align_proba(np.asarray(head.predict_proba(X[test])), head.classes_, classes)
            total[test] += p
            count[test] += 1
            if r == 0:
                fold_scores.append(metric_from_proba(metric, y[test], p, classes))
    proba = (total[held] / count[held, None]).astype(np.float32)
    return CVResult(rows=held, proba=proba, score=metric_from_proba(metric, y[held], proba, classes),
                    fold_scores=fold_scores, refit_params=dict(params), fit_seconds=0.0)


def shared_preparation(X: np.ndarray) -> dict[str, Any]:
    """What the linear probe's folds and refit share, all label-free statistics of every row:
    the standardisation, the preconditioner (one eigendecomposition instead of one per fit) and
    the rows rotated into its basis, which each fit slices instead of recomputing (see
    `LinearProbe.fit`)."""
    from pipeline.heads.batched_lbfgs import rotate_rows, second_moment_basis
    from pipeline.heads.extmath import Standardizer

    scaler = Standardizer.fit(X)
    Xs = scaler.transform(X)
    basis = second_moment_basis(Xs)
    return {"scaler": scaler, "basis": basis, "rotated": rotate_rows(Xs, basis)}


def joined_preparation(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The `shared_preparation` of feature matrices set side by side, from each one's own (same
    rows, same order): the standardisations and rotated rows side by side, the bases as one
    block-diagonal basis. The standardisation has the concatenation's per-column means and
    standard deviations (each part floors its near-constant columns by its own scale); the basis
    is `second_moment_basis`'s wherever its blocks are the parts' (equal widths up to its block
    width), otherwise another preconditioner of the same minimiser."""
    from pipeline.heads.extmath import Standardizer

    if not parts:
        raise ValueError("joined_preparation needs at least one part")
    rows = {len(p["rotated"]) for p in parts}
    if len(rows) != 1:
        raise ValueError(f"the parts' preparations cover different row counts {sorted(rows)}")
    widths = [len(p["basis"][0]) for p in parts]
    D = sum(widths)
    e = np.concatenate([np.asarray(p["basis"][0], dtype=np.float32) for p in parts])
    V = np.zeros((D, D), dtype=np.float32)
    a = 0
    for p, w in zip(parts, widths):
        V[a:a + w, a:a + w] = p["basis"][1]
        a += w
    scaler = Standardizer(np.concatenate([p["scaler"].mean for p in parts]),
                          np.concatenate([p["scaler"].std for p in parts]))
    rotated = np.ascontiguousarray(np.concatenate([p["rotated"] for p in parts], axis=1),
                                   dtype=np.float32)
    return {"scaler": scaler, "basis": (e, V), "rotated": rotated}


def _cv_linear(params, X, y, folds, classes, metric, held, preparation=None) -> CVResult:
    C = len(classes)
    if preparation is not None and np.shape(preparation["rotated"]) != np.shape(X):
        raise ValueError(f"preparation rows {np.shape(preparation['rotated'])} do not match X {np.shape(X)}")
    shared = preparation if preparation is not None else shared_preparation(X)
    totals = None       # (S, N, C) summed member probabilities
    count = np.zeros(X.shape[0], dtype=np.int64)
    per_fold: list[tuple[np.ndarray, int]] = []  # (test mask, n_fit) of the first repeat
    lams = None
    n_fit_sum, n_folds = 0, 0
    last = None  # (classes, members) of the last fold, to start the refit from
    fit_params = dict(params)
    for r in range(folds.shape[0]):
        for f in _fold_ids(folds, r):
            test = folds[r] == f
            # every fold starts cold: a start from another fold's solution would carry what
            # that fold learnt from these held-out rows into their out-of-fold scores
            probe = _fit("LinearProbe", fit_params, X[~test], y[~test], X_val=X[test], y_val=y[test],
                         basis=shared["basis"], scaler=shared["scaler"], rotated=shared["rotated"][~test])
            last = (np.unique(y[~test]), probe.members)
            lams, member = probe.member_proba(X[test])
            if totals is None:
                totals = np.zeros((len(lams), X.shape[0], C), dtype=np.float64)
            for s in range(len(lams)):
                totals[s][test] += align_proba(member[s], probe.classes_, classes)
            count[test] += 1
            n_fit_sum += int((~test).sum())
            n_folds += 1
            if r == 0:
                per_fold.append(test)
            if n_folds == 1 and len(lams) > 2 * CV_WINDOW + 1:
                keep = _window(totals[:, test], y[test], classes, metric)
                totals, lams = totals[keep], lams[keep]
                fit_params["weight_decays"] = [float(v) for v in lams]
    probas = totals[:, held] / count[held, None]
    best = _ranking(probas, y[held], classes, metric)[0]
    score = metric_from_proba(metric, y[held], probas[best], classes)
    proba = probas[best].astype(np.float32)
    full = totals[best] / np.maximum(count, 1)[:, None]
    fold_scores = [metric_from_proba(metric, y[m], full[m], classes) for m in per_fold]
    # the same C on all rows: the mean-loss weight decay scales with 1 / rows
    n_fit_mean = n_fit_sum / max(n_folds, 1)
    lam_refit = float(lams[best]) * n_fit_mean / X.shape[0]
    refit = {**dict(params), "weight_decays": [lam_refit]}
    chosen = {"weight_decay_cv": float(lams[best]), "weight_decay": lam_refit,
              "C": (1.0 / (lam_refit * X.shape[0])) if lam_refit > 0 else None,
              "cv_score": float(score)}
    if not _tunes_weight_decay(params):  # a weight decay the user fixed is refit as given
        refit, chosen = dict(params), {}
    start = None  # the refit (scored on the test split only) starts from the last fold's solution
    if np.array_equal(last[0], np.unique(y)):
        start = (last[1][0][best][None], last[1][1][best][None])
    return CVResult(rows=held, proba=proba, score=float(score), fold_scores=fold_scores,
                    refit_params=refit, fit_seconds=0.0, chosen=chosen,
                    fit_kwargs={**shared, "init": start})


def _ranking(probas: np.ndarray, y: np.ndarray, classes: Sequence[str], metric: str) -> list[int]:
    """Members (S, N, C) best first: selection metric, ties broken by lower log-loss."""
    idx = np.arange(len(y)), label_codes(y, classes)
    scores = [metric_from_proba(metric, y, p, classes) for p in probas]
    losses = [float(-np.mean(np.log(np.clip(p[idx], 1e-12, None)))) for p in probas]
    return sorted(range(len(probas)), key=lambda s: (-scores[s], losses[s]))


def _window(probas: np.ndarray, y: np.ndarray, classes: Sequence[str], metric: str) -> np.ndarray:
    """The weight decays within `CV_WINDOW` grid steps of the first fold's best."""
    best = _ranking(probas, y, classes, metric)[0]
    return np.arange(max(0, best - CV_WINDOW), min(len(probas), best + CV_WINDOW + 1))


def label_codes(y: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """String labels as column indices of `classes`."""
    index = {str(c): i for i, c in enumerate(classes)}
    return np.asarray([index[str(v)] for v in y])


def refit(head_name: str, params: Mapping[str, Any], X: np.ndarray, y: np.ndarray,
          **fit_kwargs: Any):
    """The final head: fitted on every labelled row with the chosen hyper-parameters
    (`fit_kwargs`: `CVResult.fit_kwargs`, which only make the fit faster)."""
    return _fit(head_name, params, X, y, **fit_kwargs)
