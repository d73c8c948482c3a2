"""Confidence thresholds chosen on validation data for a target precision.

`precision_threshold` picks the lowest cut on a confidence score such that the predictions at or
above it reach the target precision on validation (so coverage is as large as the target allows).
The predictor uses it twice: on the classifier's top probability, and on the k-NN fallback's vote
agreement for the inputs the classifier passes on.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

#: the fallback answers with a majority of its neighbours when too few uncertain rows exist to
#: calibrate its vote threshold on
DEFAULT_KNN_THRESHOLD = 0.6
#: a label with fewer support examples than k is voted on among its n nearest neighbours (at
#: least this many): a class added with a handful of examples can then win the fallback's vote
MIN_VOTE_NEIGHBOURS = 3


def min_calibration_rows(target_precision: float, confidence: float = 0.95) -> int:
    """Fewest rows that can show `target_precision` at one-sided `confidence` even if every one
    is correct (n with target^n <= 1 - confidence: 29 for 0.9, 59 for 0.95). A threshold tuned
    on fewer rows claims a precision its data cannot support; keep the default instead."""
    if not 0.0 < target_precision < 1.0:
        return 1
    return int(math.ceil(math.log(1.0 - confidence) / math.log(target_precision)))


def precision_threshold(confidence, correct, *, target_precision: float = 0.9,
                        min_support: int = 5) -> float:
    """Smallest threshold t with precision(confidence >= t) >= target on (confidence, correct).

    Only cuts keeping at least `min_support` samples count (a cut kept by 2 samples says
    nothing). If no cut reaches the target, returns a threshold above every confidence seen
    (everything below it abstains / falls back) — that is the honest answer.
    """
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"target_precision must be in (0, 1], got {target_precision}")
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    ok = np.asarray(correct, dtype=bool).ravel()
    if conf.shape != ok.shape:
        raise ValueError(f"confidence {conf.shape} and correct {ok.shape} differ in length")
    if conf.size == 0:
        raise ValueError("cannot calibrate a threshold on zero validation samples")
    order = np.argsort(-conf, kind="stable")
    conf, ok = conf[order], ok[order]
    precision = np.cumsum(ok) / np.arange(1, ok.size + 1)  # precision of the top-i predictions
    # a cut can only fall between distinct confidence values: use the last index of each value
    last_of_value = np.r_[conf[1:] != conf[:-1], True]
    valid = last_of_value & (np.arange(1, ok.size + 1) >= min(min_support, ok.size)) & (
        precision >= target_precision)
    if not valid.any():
        return float(np.nextafter(conf[0], np.inf))
    return float(conf[np.flatnonzero(valid).max()])


def knn_vote(scores: np.ndarray, labels: np.ndarray,
             class_sizes: Mapping[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Similarity-weighted vote of k neighbours → (label, agreement in [0, 1]) per query.

    `scores` are cosine similarities (Q, k), sorted best first per row as the index returns
    them; `labels` their labels (Q, k). Negative similarities and missing neighbours (label "")
    carry no weight. A label's agreement is its weighted share of the k neighbours; with
    `class_sizes` ({label: support examples}), a label with n < k examples is judged among the
    max(n, MIN_VOTE_NEIGHBOURS) nearest instead — k neighbours could never be mostly of it.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    out_label = np.empty(len(scores), dtype=object)
    agreement = np.zeros(len(scores), dtype=np.float64)
    for i in range(len(scores)):
        w = np.where(np.isfinite(scores[i]) & (labels[i] != ""), np.maximum(scores[i], 0.0), 0.0)
        labs = labels[i].astype(str)
        k = len(labs)
        if w.sum() <= 0:
            out_label[i] = None
            continue
        cum = np.cumsum(w)
        best, best_key = None, None
        for lab in dict.fromkeys(labs[w > 0].tolist()):
            mine = np.cumsum(np.where(labs == lab, w, 0.0))
            n = k
            if class_sizes is not None:
                n = max(min(k, int(class_sizes.get(lab, k))), min(MIN_VOTE_NEIGHBOURS, k))
            share = float(mine[n - 1] / cum[n - 1]) if cum[n - 1] > 0 else 0.0
            key = (share, float(mine[-1]), lab)
            if best_key is None or key > best_key:
                best, best_key = lab, key
        out_label[i] = best
        agreement[i] = best_key[0]
    return out_label, agreement
