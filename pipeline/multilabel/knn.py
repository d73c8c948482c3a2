"""Multi-label cosine k-NN: the neighbours vote for every label they carry.

Support vectors are L2-normalised in a FAISS ``IndexFlatIP`` (as ``pipeline.heads.knn.KNN``).
A query's score for label l is the weighted share of its k neighbours that carry l, weights as
in ``KNN`` (``softmax`` of cosine / temperature, ``distance`` or ``uniform``), so scores lie in
[0, 1] and need not sum to 1. Thresholds are tuned on ``X_val``/``Y_val`` when given, else on
leave-one-out scores of the support set itself (each training row voted on by its k nearest
*other* rows): held-out scores at no extra fit. Saved as config.json + arrays.safetensors
(indicator matrix, thresholds) + index.faiss.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.heads.extmath import l2_normalize
from pipeline.heads.knn import check_vote_params, read_index, write_index
from pipeline.multilabel.base import MultiLabelHead


def vote_weights(sims: np.ndarray, weights: str, temperature: float) -> np.ndarray:
    """(Q, k) neighbour weights from cosine similarities (nearest first)."""
    sims = sims.astype(np.float64)
    if weights == "softmax":
        return np.exp((sims - sims[:, :1]) / float(temperature))
    if weights == "distance":
        return 1.0 / (1.0 - sims + 1e-6)
    return np.ones_like(sims)


def label_vote(sims: np.ndarray, neighbour_labels: np.ndarray, weights: str = "softmax",
               temperature: float = 0.07) -> np.ndarray:
    """(Q, L) weighted share of the neighbours carrying each label; ``neighbour_labels`` is the
    (Q, k, L) indicator of each neighbour (rows of absent neighbours all zero, sims -inf)."""
    w = vote_weights(np.where(np.isfinite(sims), sims, -1.0), weights, temperature)
    w = np.where(np.isfinite(sims), w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    votes = np.einsum("qk,qkl->ql", w, neighbour_labels.astype(np.float64))
    return np.divide(votes, total, out=np.zeros_like(votes), where=total > 0)


class MultiLabelKNN(MultiLabelHead):
    """Parameters
    ----------
    k: neighbours per query (capped at the support-set size).
    weights: "softmax" | "distance" | "uniform"; temperature: of the softmax vote.
    """

    _has_decision_function = False

    def __init__(self, k: int = 10, weights: str = "softmax", temperature: float = 0.07):
        self.k = k
        self.weights = weights
        self.temperature = temperature

    def _check_params(self) -> None:
        check_vote_params(self.k, self.weights, self.temperature)

    def fit(self, X, Y, X_val=None, Y_val=None, *, classes=None) -> "MultiLabelKNN":
        import faiss

        self._check_params()
        X, Y = self._validate_fit_ml(X, Y, classes)
        val = self._validate_val_ml(X_val, Y_val)
        index = faiss.IndexFlatIP(X.shape[1])
        index.add(l2_normalize(X))
        self.index_ = index
        self.labels_ = Y.astype(np.uint8)
        if val is not None:
            self._tune(val[1], self.predict_proba(val[0]), "X_val")
        else:
            self._tune(Y, self._leave_one_out(X), "leave_one_out")
        return self

    def _leave_one_out(self, X: np.ndarray) -> np.ndarray:
        """Each support row's scores from its k nearest other rows."""
        n = self.index_.ntotal
        k = min(int(self.k) + 1, n)
        sims, ids = self.index_.search(l2_normalize(X), k)
        own = ids == np.arange(len(X))[:, None]
        # drop the row itself (or, when an identical vector took its place, the last neighbour)
        drop = np.where(own.any(axis=1), own.argmax(axis=1), k - 1)
        keep = np.ones_like(own)
        keep[np.arange(len(X)), drop] = False
        sims = sims[keep].reshape(len(X), k - 1)
        ids = ids[keep].reshape(len(X), k - 1)
        if k - 1 == 0:
            return np.zeros((len(X), self.labels_.shape[1]))
        return label_vote(sims, self.labels_[ids], self.weights, self.temperature)

    def kneighbors(self, X, n_neighbors: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarities (M, k), support indices (M, k)), nearest first."""
        X = self._validate_predict(X)
        k = min(int(n_neighbors or self.k), self.index_.ntotal)
        return self.index_.search(l2_normalize(X), k)

    def predict_proba(self, X) -> np.ndarray:
        self._check_params()
        sims, ids = self.kneighbors(X)
        return label_vote(sims, self.labels_[ids], self.weights, self.temperature)

    # ------------------------------------------------------------------ persistence
    def _head_state(self):
        return {"labels": self.labels_}, {"n_support": int(self.index_.ntotal)}

    def _save_extra(self, path: Path) -> None:
        write_index(self.index_, path)

    def _set_head_state(self, arrays, state, path):
        self.index_ = read_index(path, "MultiLabelKNN")
        self.labels_ = arrays["labels"].astype(np.uint8)
        if self.index_.ntotal != len(self.labels_) or self.index_.d != self.n_features_in_:
            raise ValueError(f"{path}: index holds {self.index_.ntotal} x {self.index_.d} vectors but "
                             f"{len(self.labels_)} label rows x {self.n_features_in_} features")
