"""Confidence thresholds chosen on validation data for a target precision.

`precision_threshold` picks the lowest cut on a confidence score such that the predictions at or
above it reach the target precision on validation (so coverage is as large as the target allows).
The predictor uses it twice: on the classifier's top probability, and on the k-NN fallback's vote
agreement for the inputs the classifier passes on.
"""

from __future__ import annotations

import numpy as np


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


def knn_vote(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Similarity-weighted vote of k neighbours → (label, agreement in [0, 1]) per query.

    `scores` are cosine similarities (Q, k), `labels` their labels (Q, k). Negative similarities
    and missing neighbours (label "") carry no weight.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    out_label = np.empty(len(scores), dtype=object)
    agreement = np.zeros(len(scores), dtype=np.float64)
    for i in range(len(scores)):
        weights: dict[str, float] = {}
        for s, lab in zip(scores[i], labels[i]):
            if lab == "" or not np.isfinite(s):
                continue
            weights[str(lab)] = weights.get(str(lab), 0.0) + max(float(s), 0.0)
        total = sum(weights.values())
        if total <= 0:
            out_label[i] = None
            continue
        best = max(weights, key=lambda k: (weights[k], k))
        out_label[i] = best
        agreement[i] = weights[best] / total
    return out_label, agreement
