"""Honest evaluation of a classifier's probabilities on a held-out split.

`evaluate` turns (true labels, probability matrix, class list) into an `EvalReport`: plain,
JSON-safe data holding accuracy, top-k, balanced accuracy, macro F1, per-class metrics, the
confusion matrix, expected calibration error with its reliability bins and a seeded percentile
bootstrap confidence interval on the selection metric.

Conventions (they match scikit-learn's defaults):
* the prediction is the arg-max column (first column wins ties);
* balanced accuracy is the mean recall over classes that occur in ``y_true``;
* macro F1 is the mean F1 over classes that occur in ``y_true`` or in the predictions
  (classes absent from both are listed per class with support 0 but not averaged);
* a precision / recall / F1 with a zero denominator is 0.0;
* top-k uses k = min(5, n_classes); a tie in score is broken by column order, so top-1 equals
  accuracy.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Sequence

import numpy as np

SELECTION_METRICS = ("balanced_accuracy", "accuracy", "macro_f1", "top5")
ECE_BINS = 15
_PROBA_SUM_TOL = 1e-2
# Bootstrap works on chunks of resamples so the index matrix stays near this many elements.
_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000


@dataclass
class EvalReport:
    """Plain-data evaluation result. Every field is a Python builtin (JSON-safe)."""

    classes: list[str]
    n_samples: int
    accuracy: float
    top5: float
    top_k: int
    balanced_accuracy: float
    macro_f1: float
    per_class: list[dict[str, Any]]       # {class, precision, recall, f1, support}
    confusion_matrix: list[list[int]]     # rows = true class, columns = predicted class
    ece: float
    reliability: list[dict[str, Any]]     # {lower, upper, count, mean_confidence, accuracy}
    selection_metric: str
    metric_value: float
    ci_low: float | None
    ci_high: float | None
    ci_level: float = 0.95
    n_bootstrap: int = 0
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalReport":
        known = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls)
                   if f.name not in d and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise ValueError(f"EvalReport.from_dict: missing keys {missing}; "
                             "the dict must come from EvalReport.to_dict()")
        return cls(**{k: v for k, v in d.items() if k in known})

    def metric(self, name: str | None = None) -> float:
        """Value of a headline metric by name (default: the selection metric)."""
        name = name or self.selection_metric
        if name not in SELECTION_METRICS:
            raise KeyError(f"unknown metric {name!r}; choose one of {SELECTION_METRICS}")
        return float(getattr(self, name))

    def summary(self) -> dict[str, Any]:
        """Flat dict of the headline numbers (for MLflow metrics / leaderboard rows)."""
        return {
            "n_samples": self.n_samples,
            "accuracy": self.accuracy,
            f"top{self.top_k}": self.top5,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_f1": self.macro_f1,
            "ece": self.ece,
            "selection_metric": self.selection_metric,
            "metric_value": self.metric_value,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
        }



def _jsonable(x: Any) -> Any:
    """Recursively convert numpy scalars/arrays and tuples into JSON-safe builtins."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(x, np.str_):
        return str(x)
    return x


# ----------------------------------------------------------------------------- inputs

def _encode(y_true: Sequence[Any], classes: Sequence[Any]) -> tuple[np.ndarray, list[str]]:
    class_names = [str(c) for c in classes]
    if len(class_names) < 2:
        raise ValueError(f"need at least 2 classes to evaluate, got {class_names!r}")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"classes contain duplicates: {class_names!r}")
    index = {c: i for i, c in enumerate(class_names)}
    y = [str(v) for v in np.asarray(y_true, dtype=object).ravel().tolist()]
    unknown = sorted(set(y) - index.keys())
    if unknown:
        raise ValueError(f"y_true holds labels not in classes: {unknown[:10]!r}; classes must "
                         "list every label, in the order of the probability columns")
    return np.fromiter((index[v] for v in y), dtype=np.int64, count=len(y)), class_names


def _check_proba(proba: Any, n: int, n_classes: int) -> np.ndarray:
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape != (n, n_classes):
        raise ValueError(f"proba must have shape (n_samples, n_classes) = ({n}, {n_classes}), "
                         f"got {p.shape}; its columns must follow `classes`")
    if n == 0:
        raise ValueError("cannot evaluate on 0 samples: the evaluation split is empty")
    if not np.isfinite(p).all():
        raise ValueError("proba contains NaN or infinite values")
    if (p < -1e-6).any():
        raise ValueError("proba contains negative values; pass probabilities (apply softmax to "
                         "logits / decision scores first)")
    sums = p.sum(axis=1)
    bad = np.abs(sums - 1.0) > _PROBA_SUM_TOL
    if bad.any():
        raise ValueError(f"{int(bad.sum())} proba rows do not sum to 1 (e.g. {float(sums[bad][0]):.4f});"
                         " pass probabilities (apply softmax to logits / decision scores first)")
    return p


def _true_class_rank(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Rank of the true class when columns are ordered by (-score, column index)."""
    s_true = p[np.arange(len(y)), y][:, None]
    cols = np.arange(p.shape[1])[None, :]
    ahead = (p > s_true) | ((p == s_true) & (cols < y[:, None]))
    return ahead.sum(axis=1)


# ----------------------------------------------------------------------------- metrics

def _batched_metric(name: str, y: np.ndarray, pred: np.ndarray, hit_k: np.ndarray,
                    n_classes: int) -> np.ndarray:
    """Metric per row of (B, n) label / prediction matrices, fully vectorised."""
    b, n = y.shape
    correct = y == pred
    if name == "accuracy":
        return correct.mean(axis=1)
    if name == "top5":
        return hit_k.mean(axis=1)
    offs = (np.arange(b, dtype=np.int64) * n_classes)[:, None]
    ky = (y + offs).ravel()
    size = b * n_classes
    support = np.bincount(ky, minlength=size).reshape(b, n_classes)
    tp = np.bincount(ky[correct.ravel()], minlength=size).reshape(b, n_classes)
    if name == "balanced_accuracy":
        present = support > 0
        recall = np.divide(tp, support, out=np.zeros((b, n_classes)), where=present)
        return recall.sum(axis=1) / present.sum(axis=1)
    if name == "macro_f1":
        n_pred = np.bincount((pred + offs).ravel(), minlength=size).reshape(b, n_classes)
        denom = support + n_pred
        present = denom > 0
        f1 = np.divide(2.0 * tp, denom, out=np.zeros((b, n_classes)), where=present)
        return f1.sum(axis=1) / present.sum(axis=1)
    raise ValueError(f"unknown selection metric {name!r}; choose one of {SELECTION_METRICS}")


def _bootstrap(name: str, y: np.ndarray, pred: np.ndarray, hit_k: np.ndarray, n_classes: int,
               n_bootstrap: int, seed: int, level: float) -> tuple[float, float]:
    n = len(y)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_bootstrap, _BOOTSTRAP_CHUNK_ELEMENTS // max(n, 1)))
    idx_dtype = np.int32 if n < 2**31 else np.int64
    values = []
    done = 0
    while done < n_bootstrap:
        m = min(chunk, n_bootstrap - done)
        idx = rng.integers(0, n, size=(m, n), dtype=idx_dtype)
        values.append(_batched_metric(name, y[idx], pred[idx], hit_k[idx], n_classes))
        done += m
    vals = np.concatenate(values)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(vals, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _calibration(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> tuple[float, list[dict]]:
    # Bin i holds confidences in (i/n_bins, (i+1)/n_bins]; bin 0 also holds exactly 0.
    b = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    conf_sum = np.bincount(b, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(b, weights=correct.astype(np.float64), minlength=n_bins)
    n = len(conf)
    ece = 0.0
    bins = []
    for i in range(n_bins):
        c = int(count[i])
        mean_conf = conf_sum[i] / c if c else None
        acc = acc_sum[i] / c if c else None
        if c:
            ece += c / n * abs(acc - mean_conf)
        bins.append({"lower": i / n_bins, "upper": (i + 1) / n_bins, "count": c,
                     "mean_confidence": None if mean_conf is None else float(mean_conf),
                     "accuracy": None if acc is None else float(acc)})
    return float(ece), bins


def evaluate(y_true: Sequence[Any], proba: Any, classes: Sequence[Any], *,
             selection_metric: str = "balanced_accuracy", n_bootstrap: int = 1000,
             seed: int = 0, ci_level: float = 0.95) -> EvalReport:
    """Evaluate class probabilities against true labels.

    ``proba[:, j]`` is the probability of ``classes[j]``; labels may be any hashable values and
    are compared as strings. ``n_bootstrap=0`` skips the confidence interval (ci_low/ci_high None).
    """
    if selection_metric not in SELECTION_METRICS:
        raise ValueError(f"unknown selection_metric {selection_metric!r}; "
                         f"choose one of {SELECTION_METRICS}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    if not 0.0 < ci_level < 1.0:
        raise ValueError(f"ci_level must be in (0, 1), got {ci_level}")
    y, class_names = _encode(y_true, classes)
    c = len(class_names)
    p = _check_proba(proba, len(y), c)
    n = len(y)

    pred = p.argmax(axis=1)
    conf = p[np.arange(n), pred]
    correct = pred == y
    k = min(5, c)
    hit_k = _true_class_rank(p, y) < k

    cm = np.bincount(y * c + pred, minlength=c * c).reshape(c, c)
    support = cm.sum(axis=1)
    n_pred = cm.sum(axis=0)
    tp = np.diag(cm)
    precision = np.divide(tp, n_pred, out=np.zeros(c), where=n_pred > 0)
    recall = np.divide(tp, support, out=np.zeros(c), where=support > 0)
    denom = support + n_pred
    f1 = np.divide(2.0 * tp, denom, out=np.zeros(c), where=denom > 0)
    per_class = [{"class": class_names[i], "precision": float(precision[i]),
                  "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
                 for i in range(c)]

    one = lambda name: float(_batched_metric(name, y[None], pred[None], hit_k[None], c)[0])  # noqa: E731
    values = {name: one(name) for name in SELECTION_METRICS}
    ece, reliability = _calibration(conf, correct, ECE_BINS)

    ci_low = ci_high = None
    if n_bootstrap > 0:
        ci_low, ci_high = _bootstrap(selection_metric, y, pred, hit_k, c, n_bootstrap, seed,
                                     ci_level)

    return EvalReport(
        classes=class_names, n_samples=int(n), accuracy=values["accuracy"], top5=values["top5"],
        top_k=int(k), balanced_accuracy=values["balanced_accuracy"], macro_f1=values["macro_f1"],
        per_class=per_class, confusion_matrix=cm.astype(int).tolist(), ece=ece,
        reliability=reliability, selection_metric=selection_metric,
        metric_value=values[selection_metric], ci_low=ci_low, ci_high=ci_high,
        ci_level=float(ci_level), n_bootstrap=int(n_bootstrap), seed=int(seed))


def hardest_examples(y_true: Sequence[Any], proba: Any, classes: Sequence[Any],
                     ids: Sequence[Any], k: int = 16) -> list[dict[str, Any]]:
    """The k most confident mistakes, most confident first.

    Each item: ``{"id", "true", "predicted", "confidence", "true_prob"}`` where confidence is the
    probability of the (wrong) predicted class and true_prob that of the true class.
    """
    y, class_names = _encode(y_true, classes)
    p = _check_proba(proba, len(y), len(class_names))
    ids = list(ids)
    if len(ids) != len(y):
        raise ValueError(f"ids has {len(ids)} entries but y_true has {len(y)}")
    pred = p.argmax(axis=1)
    rows = np.arange(len(y))
    conf = p[rows, pred]
    wrong = np.flatnonzero(pred != y)
    # Most confident first; stable on original order for equal confidences.
    order = wrong[np.argsort(-conf[wrong], kind="stable")][: max(int(k), 0)]
    return [{"id": _jsonable(ids[i]), "true": class_names[y[i]],
             "predicted": class_names[pred[i]], "confidence": float(conf[i]),
             "true_prob": float(p[i, y[i]])} for i in order]
