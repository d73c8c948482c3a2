"""NearestCentroid: cosine similarity to class prototypes (a strong few-shot baseline).

Fit: centre the features on the training mean, L2-normalise, average per class and
L2-normalise again -> one prototype per class. Predict: ``cos(centred query, prototype) /
temperature`` are the logits; ``predict_proba`` is their softmax.
"""

from __future__ import annotations

import numpy as np

from pipeline.heads.base import Head
from pipeline.heads.extmath import l2_normalize
from pipeline.heads.registry import register


@register
class NearestCentroid(Head):
    """Cosine nearest-class-mean classifier.

    Parameters
    ----------
    temperature: softmax temperature on cosine scores (smaller = sharper probabilities).
    center: subtract the training mean before normalising (recommended for CNN features,
        which share a large common component).
    """

    def __init__(self, temperature: float = 0.1, center: bool = True):
        self.temperature = temperature
        self.center = center

    def fit(self, X, y) -> "NearestCentroid":
        if not float(self.temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        X, codes = self._validate_fit(X, y)
        mean = X.mean(axis=0, dtype=np.float64).astype(np.float32)
        if not self.center:
            mean = np.zeros_like(mean)
        Z = l2_normalize(X - mean)
        C = len(self.classes_)
        onehot = np.zeros((C, len(codes)), dtype=np.float32)
        onehot[codes, np.arange(len(codes))] = 1.0
        sums = (onehot @ Z).astype(np.float64)  # per-class sums (np.add.at is ~100x slower)
        self.mean_ = mean
        self.centroids_ = l2_normalize(sums / np.bincount(codes, minlength=C)[:, None])
        return self

    def _logits(self, X: np.ndarray) -> np.ndarray:
        return (l2_normalize(X - self.mean_) @ self.centroids_.T) / np.float32(self.temperature)

    def _state(self):
        return {"mean": self.mean_, "centroids": self.centroids_}, {}

    def _set_state(self, arrays, state, path):
        self.mean_ = arrays["mean"]
        self.centroids_ = arrays["centroids"]
