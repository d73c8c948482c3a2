"""KNN: cosine k-nearest-neighbour classifier on a FAISS inner-product index.

Support vectors are L2-normalised and stored in ``faiss.IndexFlatIP`` (exact search; swap for
IVF / HNSW beyond ~1M vectors). Each query's k neighbours vote for their labels with weight

* ``"softmax"``: ``exp(cos / temperature)`` (default; a soft, temperature-controlled vote),
* ``"distance"``: ``1 / (1 - cos + 1e-6)`` (inverse cosine distance),
* ``"uniform"``: 1,

and ``predict_proba`` is the normalised vote per class (a class with no neighbour gets 0).
There is no ``decision_function``. ``add(X, y)`` grows the support set after fitting (new labels
extend ``classes_``). Saved as config.json + arrays.safetensors (labels) + index.faiss.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.heads.base import Head, check_labels
from pipeline.heads.extmath import l2_normalize
from pipeline.heads.registry import register

INDEX_FILE = "index.faiss"
_WEIGHTINGS = ("softmax", "distance", "uniform")


def check_vote_params(k: int, weights: str, temperature: float) -> None:
    """A k-NN vote's settings (ValueError naming the bad one)."""
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if weights not in _WEIGHTINGS:
        raise ValueError(f"weights must be one of {_WEIGHTINGS}, got {weights!r}")
    if weights == "softmax" and not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def write_index(index, directory: Path) -> None:
    """A head's FAISS index as `directory/INDEX_FILE`, written atomically."""
    import faiss

    tmp = directory / (INDEX_FILE + ".tmp")
    tmp.write_bytes(np.asarray(faiss.serialize_index(index), dtype=np.uint8).tobytes())
    os.replace(tmp, directory / INDEX_FILE)


def read_index(directory, head: str):
    """The FAISS index `write_index` saved in `directory` (FileNotFoundError naming `head`)."""
    import faiss

    index_path = Path(directory) / INDEX_FILE
    if not index_path.exists():
        raise FileNotFoundError(f"{index_path} is missing: the {head} save is incomplete")
    return faiss.deserialize_index(np.frombuffer(index_path.read_bytes(), dtype=np.uint8))


@register
class KNN(Head):
    """Cosine k-NN with distance-weighted voting.

    Parameters
    ----------
    k: neighbours per query (capped at the support-set size).
    weights: "softmax" | "distance" | "uniform" (see module docstring).
    temperature: softmax vote temperature on cosine similarity.
    """

    _has_decision_function = False

    def __init__(self, k: int = 10, weights: str = "softmax", temperature: float = 0.07):
        self.k = k
        self.weights = weights
        self.temperature = temperature

    def _check_params(self) -> None:
        check_vote_params(self.k, self.weights, self.temperature)

    def fit(self, X, y) -> "KNN":
        import faiss

        self._check_params()
        X, codes = self._validate_fit(X, y)
        index = faiss.IndexFlatIP(X.shape[1])
        index.add(l2_normalize(X))
        self.index_ = index
        self.labels_ = codes  # class index of each support vector
        return self

    def add(self, X, y) -> "KNN":
        """Append support examples (labels may be new classes; classes_ stays sorted)."""
        X = self._validate_predict(X)
        y = check_labels(y, X.shape[0])
        if y.dtype.kind != self.classes_.dtype.kind and not (
            y.dtype.kind in "iu" and self.classes_.dtype.kind in "iu"
        ):
            raise ValueError(f"y labels are {y.dtype} but classes_ are {self.classes_.dtype}")
        old = self.classes_
        classes = np.unique(np.concatenate([old, y]))  # widens '<U' as needed
        remap = np.searchsorted(classes, old)
        self.labels_ = np.concatenate([remap[self.labels_], np.searchsorted(classes, y)])
        self.classes_ = classes
        self.index_.add(l2_normalize(X))
        return self

    def kneighbors(self, X, n_neighbors: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarities (M, k), support indices (M, k)), nearest first."""
        X = self._validate_predict(X)
        k = min(int(n_neighbors or self.k), self.index_.ntotal)
        sims, ids = self.index_.search(l2_normalize(X), k)
        return sims, ids

    def predict_proba(self, X) -> np.ndarray:
        self._check_params()
        sims, ids = self.kneighbors(X)
        sims = sims.astype(np.float64)
        if self.weights == "softmax":
            w = np.exp((sims - sims[:, :1]) / float(self.temperature))
        elif self.weights == "distance":
            w = 1.0 / (1.0 - sims + 1e-6)
        else:
            w = np.ones_like(sims)
        proba = np.zeros((len(sims), len(self.classes_)), dtype=np.float64)
        rows = np.repeat(np.arange(len(sims)), sims.shape[1])
        np.add.at(proba, (rows, self.labels_[ids].ravel()), w.ravel())
        proba /= proba.sum(axis=1, keepdims=True)
        return proba

    # ------------------------------------------------------------------ persistence
    def _state(self):
        return {"labels": self.labels_.astype(np.int64)}, {"n_support": int(self.index_.ntotal)}

    def _save_extra(self, path: Path) -> None:
        write_index(self.index_, path)

    def _set_state(self, arrays, state, path):
        self.index_ = read_index(path, "KNN")
        self.labels_ = arrays["labels"].astype(np.int64)
        if self.index_.ntotal != len(self.labels_):
            raise ValueError(
                f"{path}: index holds {self.index_.ntotal} vectors but {len(self.labels_)} labels"
            )
        if self.index_.d != self.n_features_in_:
            raise ValueError(f"{path}: index dimension {self.index_.d} != {self.n_features_in_}")
