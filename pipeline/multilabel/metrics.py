"""Multi-label metrics, per-label thresholds and a paired bootstrap of two candidates.

Inputs are an (N, L) 0/1 indicator matrix ``Y`` of true labels and an (N, L) score matrix ``S``
(per-label probabilities; any monotone score works for AP).

* ``average_precision`` — non-interpolated AP of one label, sum over distinct score thresholds
  of (recall step) x precision: scikit-learn's ``average_precision_score`` (ties grouped).
* ``mean_average_precision`` (mAP) — the macro average of AP over labels with at least one
  positive (a label with none has no AP; ``per_label_ap`` gives it NaN). The default selection
  metric: it is threshold-free, so it compares candidates before any threshold is tuned.
* ``tune_thresholds`` — per label, the threshold that maximises F1 on held-out (out-of-fold or
  validation) scores, put halfway to the next lower score; labels without a positive there keep
  ``fallback`` (0.5: the probability decision boundary). Never tune on the test split.
* ``micro_f1`` / ``macro_f1`` / ``subset_accuracy`` / ``hamming_loss`` at given thresholds
  (prediction = score >= threshold). Macro F1 averages the labels that occur in the truth or the
  predictions of the scored set (labels absent from both carry no information).
* ``bootstrap_multilabel_scores`` / ``paired_map_bootstrap`` — the images are resampled jointly
  for every candidate (same resamples as ``pipeline.paired.bootstrap_scores`` for the same seed,
  number of images and resamples), each resample scored through per-image weights, so the whole
  bootstrap is a few vectorised passes, not a Python loop per resample.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from pipeline.paired import PairedDifference, check_bootstrap, summarise

#: selection metrics for multi-label candidates; "map" is the default (threshold-free)
MULTILABEL_METRICS = ("map", "micro_f1", "macro_f1", "subset_accuracy")
DEFAULT_THRESHOLD = 0.5

_CHUNK_ELEMENTS = 2_000_000  # (resamples x images) per block, as in pipeline.paired


def _check(Y: Any, S: Any) -> tuple[np.ndarray, np.ndarray]:
    Y = np.asarray(Y)
    S = np.asarray(S, dtype=np.float64)
    if Y.ndim != 2 or S.shape != Y.shape:
        raise ValueError(f"Y and scores must be (n_images, n_labels) of one shape, got {Y.shape} "
                         f"and {S.shape}")
    if len(Y) == 0:
        raise ValueError("cannot score 0 images")
    if not np.isin(Y, (0, 1)).all():
        raise ValueError("Y must be a 0/1 indicator matrix (use labelsets.binarize)")
    return Y.astype(bool), S


def check_multilabel_metric(name: str) -> None:
    if name not in MULTILABEL_METRICS:
        raise ValueError(f"unknown multi-label metric {name!r}; choose one of {MULTILABEL_METRICS}")


# ----------------------------------------------------------------------------- average precision

class _APLabel:
    """One label's AP under per-image weights, with the score order and thresholds fixed once."""

    def __init__(self, y: np.ndarray, s: np.ndarray):
        self.order = np.argsort(-s, kind="stable")
        ss = s[self.order]
        self.y = y[self.order].astype(np.float64)
        self.thr = np.r_[np.flatnonzero(np.diff(ss)), len(ss) - 1]  # last index of each tie group

    def ap(self, w: np.ndarray) -> np.ndarray:
        """(m,) AP for (m, N) image weights (NaN where the weighted positives are 0)."""
        ws = w[:, self.order]
        tps = np.cumsum(ws * self.y, axis=1)[:, self.thr]
        seen = np.cumsum(ws, axis=1)[:, self.thr]
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(seen > 0, tps / seen, 0.0)
            recall = tps / tps[:, -1:]
        steps = np.diff(np.concatenate([np.zeros((len(w), 1)), recall], axis=1), axis=1)
        out = (steps * precision).sum(axis=1)
        out[tps[:, -1] <= 0] = np.nan
        return out


def average_precision(y: Any, s: Any) -> float:
    """AP of one label (NaN when y has no positive)."""
    y = np.asarray(y).astype(bool).ravel()
    s = np.asarray(s, dtype=np.float64).ravel()
    if len(y) != len(s) or not len(y):
        raise ValueError(f"y and s must be non-empty and of one length, got {len(y)} and {len(s)}")
    return float(_APLabel(y, s).ap(np.ones((1, len(y))))[0])


def per_label_ap(Y: Any, S: Any) -> np.ndarray:
    """(L,) AP per label; NaN for labels with no positive."""
    Y, S = _check(Y, S)
    return np.array([average_precision(Y[:, j], S[:, j]) for j in range(Y.shape[1])])


def mean_average_precision(Y: Any, S: Any) -> float:
    """Macro mAP over the labels with at least one positive (NaN if none has)."""
    ap = per_label_ap(Y, S)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


# ----------------------------------------------------------------------------- thresholds

def tune_thresholds(Y: Any, S: Any, *, fallback: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """(L,) per-label thresholds maximising that label's F1 on (Y, S) — held-out scores only.

    The cut is placed halfway between the lowest score kept and the next lower score, so small
    score changes do not flip it; ties in F1 keep the higher threshold (fewer positives).
    Labels with no positive in Y get ``fallback``.
    """
    Y, S = _check(Y, S)
    out = np.full(Y.shape[1], float(fallback))
    for j in range(Y.shape[1]):
        y, s = Y[:, j], S[:, j]
        P = int(y.sum())
        if P == 0:
            continue
        order = np.argsort(-s, kind="stable")
        ss, ys = s[order], y[order]
        thr = np.r_[np.flatnonzero(np.diff(ss)), len(ss) - 1]
        tp = np.cumsum(ys)[thr]
        predicted = thr + 1
        f1 = 2.0 * tp / (predicted + P)
        b = int(np.argmax(f1))  # first max = highest threshold among ties
        hi = ss[thr[b]]
        lo = ss[thr[b] + 1] if thr[b] + 1 < len(ss) else hi - max(abs(hi) * 1e-3, 1e-6)
        out[j] = float((hi + lo) / 2.0)
    return out


def apply_thresholds(S: Any, thresholds: Any) -> np.ndarray:
    """(N, L) uint8 predictions: score >= that label's threshold."""
    S = np.asarray(S, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64).ravel()
    if S.ndim != 2 or S.shape[1] != len(t):
        raise ValueError(f"scores {S.shape} and {len(t)} thresholds do not match")
    return (S >= t[None, :]).astype(np.uint8)


# ----------------------------------------------------------------------------- F1 & co (weighted)

def _counts(Y: np.ndarray, P: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """(m, L) weighted tp, fp, fn and (m,) exact-match weight for (m, N) image weights."""
    Yf, Pf = Y.astype(np.float64), P.astype(np.float64)
    tp = w @ (Yf * Pf)
    fp = w @ ((1.0 - Yf) * Pf)
    fn = w @ (Yf * (1.0 - Pf))
    exact = w @ np.all(Y == P, axis=1).astype(np.float64)
    return tp, fp, fn, exact


def _f1s(tp, fp, fn, w_total) -> dict[str, np.ndarray]:
    denom = 2 * tp + fp + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        micro = np.where(denom.sum(1) > 0, 2 * tp.sum(1) / denom.sum(1), 0.0)
        per = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1.0), 0.0)
        present = denom > 0
        macro = np.where(present.any(1), per.sum(1) / np.maximum(present.sum(1), 1), 0.0)
    return {"micro_f1": micro, "macro_f1": macro}


def micro_f1(Y: Any, P: Any) -> float:
    Y, P = np.asarray(Y).astype(bool), np.asarray(P).astype(bool)
    tp, fp, fn, _ = _counts(Y, P, np.ones((1, len(Y))))
    return float(_f1s(tp, fp, fn, len(Y))["micro_f1"][0])


def macro_f1(Y: Any, P: Any) -> float:
    Y, P = np.asarray(Y).astype(bool), np.asarray(P).astype(bool)
    tp, fp, fn, _ = _counts(Y, P, np.ones((1, len(Y))))
    return float(_f1s(tp, fp, fn, len(Y))["macro_f1"][0])


def subset_accuracy(Y: Any, P: Any) -> float:
    """Share of images whose predicted set equals the true set exactly."""
    return float(np.mean(np.all(np.asarray(Y).astype(bool) == np.asarray(P).astype(bool), axis=1)))


def hamming_loss(Y: Any, P: Any) -> float:
    return float(np.mean(np.asarray(Y).astype(bool) != np.asarray(P).astype(bool)))


# ----------------------------------------------------------------------------- report

@dataclass
class MultiLabelReport:
    """Scores of one candidate on one labelled set; plain data (JSON / MLflow via to_dict)."""

    n_images: int
    n_labels: int
    map: float                       # macro AP over labels with a positive
    micro_f1: float                  # at `thresholds`
    macro_f1: float
    subset_accuracy: float
    hamming_loss: float
    label_cardinality: float         # true labels per image
    predicted_cardinality: float     # predicted labels per image at the thresholds
    no_label_rate: float             # images where no label passes its threshold (abstentions)
    per_label_ap: dict[str, float | None] = field(default_factory=dict)
    per_label_f1: dict[str, float | None] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metric(self, name: str) -> float:
        check_multilabel_metric(name)
        return float(getattr(self, name))


def evaluate_multilabel(Y: Any, S: Any, thresholds: Any, classes: Sequence[str]) -> MultiLabelReport:
    """Every metric above for scores ``S`` at ``thresholds`` against ``Y``."""
    Y, S = _check(Y, S)
    if len(classes) != Y.shape[1]:
        raise ValueError(f"{len(classes)} classes for {Y.shape[1]} label columns")
    P = apply_thresholds(S, thresholds).astype(bool)
    ap = per_label_ap(Y, S)
    tp, fp, fn, _ = _counts(Y, P, np.ones((1, len(Y))))
    denom = (2 * tp + fp + fn)[0]
    per_f1 = {str(c): (float(2 * tp[0, j] / denom[j]) if denom[j] > 0 else None)
              for j, c in enumerate(classes)}
    f = _f1s(tp, fp, fn, len(Y))
    t = np.asarray(thresholds, dtype=np.float64).ravel()
    return MultiLabelReport(
        n_images=int(len(Y)), n_labels=int(Y.shape[1]),
        map=float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
        micro_f1=float(f["micro_f1"][0]), macro_f1=float(f["macro_f1"][0]),
        subset_accuracy=subset_accuracy(Y, P), hamming_loss=hamming_loss(Y, P),
        label_cardinality=float(Y.sum(1).mean()), predicted_cardinality=float(P.sum(1).mean()),
        no_label_rate=float(np.mean(~P.any(axis=1))),
        per_label_ap={str(c): (None if np.isnan(ap[j]) else float(ap[j])) for j, c in enumerate(classes)},
        per_label_f1=per_f1,
        thresholds={str(c): float(t[j]) for j, c in enumerate(classes)},
    )


# ----------------------------------------------------------------------------- bootstrap

class _Scorer:
    """One candidate's metric under (m, N) image weights."""

    def __init__(self, name: str, Y: np.ndarray, S: np.ndarray, thresholds: np.ndarray | None):
        self.name, self.Y, self.n = name, Y, len(Y)
        if name == "map":
            self.labels = [_APLabel(Y[:, j], S[:, j]) for j in range(Y.shape[1]) if Y[:, j].any()]
        else:
            if thresholds is None:
                raise ValueError(f"metric {name!r} needs thresholds (or pass predictions as scores "
                                 "with thresholds 0.5)")
            self.P = apply_thresholds(S, thresholds).astype(bool)

    def score(self, w: np.ndarray) -> np.ndarray:
        if self.name == "map":
            if not self.labels:
                return np.full(len(w), np.nan)
            aps = np.stack([lab.ap(w) for lab in self.labels], axis=1)
            with warnings.catch_warnings():  # a resample may miss every positive of all labels
                warnings.simplefilter("ignore", RuntimeWarning)
                return np.nanmean(aps, axis=1)
        tp, fp, fn, exact = _counts(self.Y, self.P, w)
        if self.name == "subset_accuracy":
            return exact / self.n
        return _f1s(tp, fp, fn, self.n)[self.name]


def bootstrap_multilabel_scores(metric_name: str, Y: Any, scores: Sequence[Any], *,
                                thresholds: Sequence[Any] | None = None, n_bootstrap: int = 2000,
                                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(point metrics (k,), resampled metrics (n_bootstrap, k)) of k candidates' score matrices
    on the same images; image resamples are shared (and equal to ``pipeline.paired``'s)."""
    check_multilabel_metric(metric_name)
    check_bootstrap(n_bootstrap, 0.5)
    Yb = _check(Y, scores[0])[0]
    scorers = []
    for i, S in enumerate(scores):
        _, Sf = _check(Y, S)
        t = None if thresholds is None else np.asarray(thresholds[i], dtype=np.float64)
        scorers.append(_Scorer(metric_name, Yb, Sf, t))
    n = len(Yb)
    ones = np.ones((1, n))
    point = np.array([s.score(ones)[0] for s in scorers])
    rng = np.random.default_rng(seed)
    chunk = max(1, min(int(n_bootstrap), _CHUNK_ELEMENTS // n))
    out = np.empty((int(n_bootstrap), len(scorers)))
    done = 0
    while done < n_bootstrap:
        m = min(chunk, int(n_bootstrap) - done)
        idx = rng.integers(0, n, size=(m, n), dtype=np.int32 if n < 2**31 else np.int64)
        keys = idx + (np.arange(m, dtype=idx.dtype) * n)[:, None]
        w = np.bincount(keys.ravel(), minlength=m * n).reshape(m, n).astype(np.float64)
        for j, s in enumerate(scorers):
            out[done:done + m, j] = s.score(w)
        done += m
    return point, out


def paired_map_bootstrap(Y: Any, scores_a: Any, scores_b: Any, *, metric_name: str = "map",
                         thresholds_a: Any = None, thresholds_b: Any = None,
                         n_bootstrap: int = 2000, confidence: float = 0.95,
                         seed: int = 0) -> PairedDifference:
    """metric(a) - metric(b) on the same images (default mAP), image indices resampled jointly.
    The result is ``pipeline.paired.PairedDifference``, the type selection already reads."""
    check_bootstrap(n_bootstrap, confidence)
    th = None if metric_name == "map" else [thresholds_a, thresholds_b]
    point, boot = bootstrap_multilabel_scores(metric_name, Y, [scores_a, scores_b], thresholds=th,
                                              n_bootstrap=n_bootstrap, seed=seed)
    diff = boot[:, 0] - boot[:, 1]
    diff = diff[np.isfinite(diff)]
    return summarise(metric_name, float(point[0] - point[1]), diff, len(np.asarray(Y)),
                     float(confidence))


__all__ = ["DEFAULT_THRESHOLD", "MULTILABEL_METRICS", "MultiLabelReport", "apply_thresholds",
           "average_precision", "bootstrap_multilabel_scores", "check_multilabel_metric",
           "evaluate_multilabel", "hamming_loss", "macro_f1", "mean_average_precision", "micro_f1",
           "paired_map_bootstrap", "per_label_ap", "subset_accuracy", "tune_thresholds"]
