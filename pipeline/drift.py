"""Embedding drift: are production images farther from the training embeddings than training
images themselves are, by more than noise?

A `DriftReference` keeps a seeded sample of the training embeddings (L2-normalised) and their
labels. An image's *novelty* is ``1 - mean cosine similarity to its k nearest reference
vectors``. Classes differ in how spread out they are, so an image is compared with its own
kind: its *residual* is its novelty minus the mean held-out novelty of the class of its nearest
reference vector. A window's drift score is the mean residual of its images; a change of class
mix alone leaves it near 0 (that is reported separately, by the predicted-class distribution
against the training prior), images unlike any training class push it up.

Calibration, on held-out training embeddings (disjoint from the sample): their residuals have
mean ``mu`` and spread ``sigma``; a window of n images is flagged when its mean residual exceeds
``mu + z * sigma / sqrt(n)`` (z standard errors: noise crosses z=4 about once in 30 000 windows).

Saved as ``reference.json`` + ``sample.npy`` + ``labels.npy`` (no pickle); `load` mirrors `save`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

FORMAT = "tlpipe.drift_reference"
FORMAT_VERSION = 1
MAX_SAMPLE = 1024  # reference vectors kept with the predictor (1024 x 1280 float32 = 5 MB)
MAX_HELDOUT = 512  # held-out vectors the threshold is calibrated on
MIN_VECTORS = 20  # fewer training embeddings than this: no reference (too little to calibrate)
DEFAULT_K = 5
DEFAULT_Z = 4.0
MIN_WINDOW = 20  # images a window needs before it is judged


def normalise(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class DriftReference:
    """A training-embedding sample and the calibrated per-window drift threshold."""

    sample: np.ndarray  # (R, D) L2-normalised float32
    labels: np.ndarray  # (R,) str: the sample's training labels
    class_mu: dict = field(default_factory=dict)  # mean held-out novelty per class
    k: int = DEFAULT_K
    mu: float = 0.0  # mean held-out residual
    sigma: float = 0.0  # its standard deviation
    z: float = DEFAULT_Z
    min_window: int = MIN_WINDOW
    class_prior: dict = field(default_factory=dict)  # training label frequencies
    seed: int = 0
    n_heldout: int = 0

    @property
    def dim(self) -> int:
        return int(self.sample.shape[1])

    # ------------------------------------------------------------------ fit
    @classmethod
    def fit(cls, X, y: Sequence, *, seed: int = 0, k: int = DEFAULT_K, z: float = DEFAULT_Z,
            max_sample: int = MAX_SAMPLE, max_heldout: int = MAX_HELDOUT) -> "DriftReference | None":
        """From labelled training embeddings; None when there are too few to calibrate on."""
        X = normalise(X)
        y = np.asarray([str(v) for v in y])
        n = len(X)
        if n < MIN_VECTORS:
            return None
        order = np.random.default_rng(seed).permutation(n)
        n_held = min(max_heldout, max(n // 4, 5))
        held, ref = order[:n_held], order[n_held:n_held + max_sample]
        out = cls(sample=X[ref].copy(), labels=y[ref].copy(), k=min(int(k), len(ref)), z=float(z),
                  seed=int(seed), n_heldout=int(n_held))
        nov, near = out._novelty(X[held])
        out.class_mu = {str(c): float(nov[near == c].mean()) for c in np.unique(near)}
        fallback = float(nov.mean())  # a class no held-out image landed nearest to
        out.class_mu.update({str(c): fallback for c in np.unique(out.labels) if str(c) not in out.class_mu})
        res = out.residuals(X[held])
        out.mu, out.sigma = float(res.mean()), float(res.std(ddof=1))
        names, counts = np.unique(y, return_counts=True)
        out.class_prior = {str(a): float(b) / n for a, b in zip(names, counts)}
        return out

    # ------------------------------------------------------------------ score
    def _novelty(self, X) -> tuple[np.ndarray, np.ndarray]:
        sims = normalise(X) @ self.sample.T
        k = min(self.k, sims.shape[1])
        top = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:]
        return (1.0 - top.mean(axis=1)).astype(np.float32), self.labels[sims.argmax(axis=1)]

    def residuals(self, X) -> np.ndarray:
        """Per image: novelty minus the held-out mean novelty of its nearest class."""
        nov, near = self._novelty(X)
        base = np.asarray([self.class_mu.get(str(c), 0.0) for c in near], dtype=np.float32)
        return nov - base

    def threshold(self, n: int) -> float:
        """The drift threshold for the mean residual of a window of `n` images."""
        return float(self.mu + self.z * self.sigma / math.sqrt(max(int(n), 1)))

    def judge(self, scores) -> dict:
        """{available, n, score, threshold, drifted} for one window's per-image residuals."""
        scores = np.asarray(scores, dtype=np.float64)
        n = int(scores.size)
        if n == 0:
            return {"available": True, "n": 0, "score": None, "threshold": None, "drifted": False}
        score, thr = float(scores.mean()), self.threshold(n)
        return {"available": True, "n": n, "score": score, "threshold": thr,
                "drifted": bool(n >= self.min_window and score > thr)}

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "sample.npy", self.sample.astype(np.float32), allow_pickle=False)
        np.save(d / "labels.npy", self.labels.astype(str), allow_pickle=False)
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "class_mu": self.class_mu, "k": self.k,
                "mu": self.mu, "sigma": self.sigma, "z": self.z, "min_window": self.min_window,
                "class_prior": self.class_prior, "seed": self.seed, "n_heldout": self.n_heldout,
                "n_sample": int(len(self.sample))}
        (d / "reference.json").write_text(json.dumps(meta, indent=2))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "DriftReference":
        d = Path(directory)
        meta = json.loads((d / "reference.json").read_text())
        if meta.pop("format", None) != FORMAT or meta.pop("version", None) != FORMAT_VERSION:
            raise ValueError(f"{d}/reference.json is not a {FORMAT} v{FORMAT_VERSION}; re-save the predictor")
        meta.pop("n_sample", None)
        return cls(sample=np.load(d / "sample.npy", allow_pickle=False),
                   labels=np.load(d / "labels.npy", allow_pickle=False), **meta)


def prior_distance(counts: dict, prior: dict) -> float | None:
    """Total variation distance between predicted-label frequencies and the training prior
    (0: same mix, 1: disjoint); None without counts or prior."""
    total = sum(counts.values())
    if not total or not prior:
        return None
    labels = set(counts) | set(prior)
    return 0.5 * sum(abs(counts.get(c, 0) / total - prior.get(c, 0.0)) for c in labels)
