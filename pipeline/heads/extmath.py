"""Small numeric helpers shared by the heads: softmax, L2 normalisation, log loss, a seeded
stratified split and a per-feature standardiser. numpy only."""

from __future__ import annotations

import numpy as np

from pipeline.heads.errors import HeadInputError

__all__ = ["Standardizer", "l2_normalize", "log_loss", "softmax", "stratified_split"]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (rows sum to 1 to ~1e-15), returned as float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def l2_normalize(X: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return (X / np.maximum(norms, eps)).astype(np.float32, copy=False)


def stratified_split(
    codes: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified (train_idx, holdout_idx): ~fraction of each class held out.

    A class with a single sample stays entirely in train; every class with >= 2 samples keeps
    at least one sample on each side. Indices are returned sorted.
    """
    if not 0.0 < fraction < 1.0:
        raise HeadInputError(f"validation fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    train, hold = [], []
    for c in np.unique(codes):
        idx = np.flatnonzero(codes == c)
        idx = idx[rng.permutation(len(idx))]
        n_hold = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        hold.append(idx[:n_hold])
        train.append(idx[n_hold:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(hold))


class Standardizer:
    """Per-feature mean / std, std floored so constant features do not explode."""

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    @classmethod
    def fit(cls, X: np.ndarray, eps: float = 1e-6) -> "Standardizer":
        mean = X.mean(axis=0, dtype=np.float64)
        std = X.std(axis=0, dtype=np.float64)  # float64 accumulators, no float64 copy of X
        scale = max(float(np.median(std)), 1.0) * eps
        std = np.where(std > scale, std, 1.0)
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def transform(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.mean) / self.std).astype(np.float32, copy=False)


def log_loss(proba: np.ndarray, codes: np.ndarray) -> float:
    p = proba[np.arange(len(codes)), codes]
    return float(-np.mean(np.log(np.clip(p, 1e-15, 1.0))))
