"""``MultiLabelHead``: the contract every multi-label head follows (sklearn style, no pickle).

* ``fit(X, Y, X_val=None, Y_val=None, *, classes=None) -> self``. ``Y``: one label set per row
  (lists/tuples of labels, or keys such as ``"cat|dog"``; ``()`` / ``""`` for an image without a
  label) or an (N, L) 0/1 indicator matrix. ``classes`` fixes the label vocabulary and its order
  (default: the sorted labels seen in ``Y``; a label with no training positive gets a constant
  "never" model rather than an error).
* ``classes_`` — the labels, one column each; ``predict_proba(X)`` -> (N, L) independent
  per-label probabilities (rows need not sum to 1); ``predict(X)`` -> (N, L) uint8 indicator at
  ``thresholds_``; ``predict_labels(X)`` -> a tuple of labels per row.
* ``thresholds_`` — per-label decision thresholds tuned on held-out scores (``X_val``/``Y_val``,
  else an internal iterative-stratified hold-out, or the caller's out-of-fold scores through
  ``set_thresholds``), never on the rows a head was trained on, never on test.
* ``save(dir)`` / ``load(dir)`` — config.json + arrays.safetensors (+ index.faiss) through
  ``pipeline.heads.base.Head``; the thresholds travel in the arrays.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pipeline.heads.base import Head, check_features
from pipeline.heads.errors import HeadInputError
from pipeline.multilabel.labelsets import binarize, label_sets
from pipeline.multilabel.metrics import (DEFAULT_THRESHOLD, apply_thresholds, mean_average_precision,
                                         tune_thresholds)
from pipeline.multilabel.stratify import iterative_split


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function, float64."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def indicator(Y: Any, n_rows: int, classes: Sequence[Any] | None, *, name: str = "Y"
              ) -> tuple[np.ndarray, np.ndarray]:
    """(classes array, (N, L) uint8 indicator) of label sets or an indicator matrix."""
    if Y is None:
        raise HeadInputError(f"{name} is None; pass one label set per row of X")
    if isinstance(Y, np.ndarray) and Y.ndim == 2 and Y.dtype.kind in "biuf":
        if not np.isin(Y, (0, 1)).all():
            raise HeadInputError(f"{name} as a matrix must be a 0/1 indicator (n_samples, n_labels)")
        if classes is None:
            classes = np.arange(Y.shape[1], dtype=np.int64)
        cls = np.asarray(classes)
        if len(cls) != Y.shape[1]:
            raise HeadInputError(f"{name} has {Y.shape[1]} label columns but {len(cls)} classes")
        M = Y.astype(np.uint8)
    else:
        sets = label_sets(list(Y))
        seen = sorted({lab for row in sets for lab in row})
        cls = np.asarray(seen if classes is None else [str(c) for c in classes], dtype=str)
        try:
            M = binarize(sets, cls.tolist())
        except ValueError as exc:
            raise HeadInputError(f"{name}: {exc}") from exc
    if len(M) != n_rows:
        raise HeadInputError(f"X and {name} have different lengths: {n_rows} rows vs {len(M)} label sets")
    if len(np.unique(cls)) != len(cls):
        raise HeadInputError(f"classes must be unique, got {list(cls)}")
    return cls, M


class MultiLabelHead(Head):
    """Base for multi-label heads: input checks, thresholds, predict, score, save/load."""

    def _validate_fit_ml(self, X: Any, Y: Any, classes=None) -> tuple[np.ndarray, np.ndarray]:
        X = check_features(X)
        cls, M = indicator(Y, X.shape[0], classes)
        if len(cls) < 1:
            raise HeadInputError("need at least one label to fit a multi-label head")
        self.classes_ = cls
        self.n_features_in_ = int(X.shape[1])
        return X, M

    def _validate_val_ml(self, X_val: Any, Y_val: Any) -> tuple[np.ndarray, np.ndarray] | None:
        if X_val is None and Y_val is None:
            return None
        if X_val is None or Y_val is None:
            raise HeadInputError("pass both X_val and Y_val, or neither")
        Xv = check_features(X_val, n_features=self.n_features_in_, name="X_val")
        _, M = indicator(Y_val, Xv.shape[0], self.classes_.tolist(), name="Y_val")
        return Xv, M

    # ---- thresholds ---------------------------------------------------------------------
    def _tune(self, Y_held: np.ndarray, P_held: np.ndarray, source: str) -> None:
        self.thresholds_ = tune_thresholds(Y_held, P_held, fallback=float(DEFAULT_THRESHOLD))
        self.threshold_info_ = {"source": source, "rows": int(len(Y_held)),
                                "tuned_labels": int((np.asarray(Y_held).sum(0) > 0).sum())}

    def set_thresholds(self, thresholds: Any, *, source: str = "caller") -> "MultiLabelHead":
        """Replace the per-label thresholds (e.g. tuned on out-of-fold scores)."""
        self._check_fitted()
        t = np.asarray(thresholds, dtype=np.float64).ravel()
        if len(t) != len(self.classes_) or not np.isfinite(t).all():
            raise ValueError(f"need {len(self.classes_)} finite thresholds, got {len(t)}")
        self.thresholds_ = t
        self.threshold_info_ = {"source": source}
        return self

    # ---- prediction ---------------------------------------------------------------------
    def predict_proba(self, X: Any) -> np.ndarray:
        X = self._validate_predict(X)
        return sigmoid(self._logits(X))

    def predict(self, X: Any) -> np.ndarray:
        return apply_thresholds(self.predict_proba(X), self.thresholds_)

    def predict_labels(self, X: Any) -> list[tuple]:
        P = self.predict(X)
        return [tuple(self.classes_[np.flatnonzero(row)].tolist()) for row in P]

    def score(self, X: Any, Y: Any) -> float:
        """mAP of predict_proba on (X, Y)."""
        X = self._validate_predict(X)
        _, M = indicator(Y, X.shape[0], self.classes_.tolist())
        return mean_average_precision(M, self.predict_proba(X))

    # ---- persistence --------------------------------------------------------------------
    def _head_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {}, {}

    def _set_head_state(self, arrays: dict[str, np.ndarray], state: dict[str, Any], path) -> None:
        """Inverse of _head_state."""

    def _state(self):
        arrays, state = self._head_state()
        arrays = {**arrays, "thresholds": np.asarray(self.thresholds_, dtype=np.float64)}
        return arrays, {**state, "threshold_info": getattr(self, "threshold_info_", {})}

    def _set_state(self, arrays, state, path):
        self.thresholds_ = np.asarray(arrays["thresholds"], dtype=np.float64)
        self.threshold_info_ = state.get("threshold_info", {})
        self._set_head_state(arrays, state, path)


def holdout_or_val(Y: np.ndarray, val_fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(fit_idx, held_idx) by iterative stratification; an error when nothing can be held out."""
    fit_idx, held_idx = iterative_split(Y, float(val_fraction), int(seed))
    if len(held_idx) == 0 or len(fit_idx) == 0:
        raise HeadInputError(f"too few rows to hold out a {what} split; pass X_val / Y_val")
    return fit_idx, held_idx


__all__ = ["MultiLabelHead", "holdout_or_val", "indicator", "sigmoid"]
