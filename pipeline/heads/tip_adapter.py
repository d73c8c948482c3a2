"""TipAdapter: a training-free key/value cache of support features on top of a base head.

    logits = base_logits + alpha * cache,   cache = exp(-beta * (1 - cos(x, keys))) @ values * C / K

keys = L2-normalised support features (K of them), values = their one-hot labels, C classes.
The ``C / K`` factor (not in the Tip-Adapter paper, where K is fixed at a few shots per class)
keeps the cache on the same scale whatever the support-set size, so the tuned ``alpha`` still
applies when the cache grows after refitting. ``alpha`` / ``beta`` are chosen on validation
data over the ``alphas`` x ``betas`` grid by accuracy (ties -> lower log-loss); ``alpha = 0``
(the base head alone) is always in the grid, so the adapter never does worse on validation.

Base head: ``ZeroShot`` for CLIP-family backbones (training-free end to end) or
``LinearProbe`` (the default, ``base=None``) for the others. An unfitted base is cloned and
fitted here; an already fitted base (``classes_`` set) is used as is and never refitted.

Validation protocol: with ``X_val`` / ``y_val`` the base and cache come from (X, y) and the grid
is scored on the validation set. Without them, a seeded stratified ``val_fraction`` of (X, y) is
held out from both base fitting and the cache; with ``refit=True`` the base is then refitted on
all of (X, y) (unless prefitted) and the cache rebuilt from all of (X, y).

Saved as config.json + arrays.safetensors (keys, labels) + ``base/`` (the fitted base head).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.heads.base import Head
from pipeline.heads.errors import HeadInputError
from pipeline.heads.extmath import l2_normalize, log_loss, softmax, stratified_split
from pipeline.heads.linear_probe import LinearProbe
from pipeline.heads.registry import HEADS, load_head, register

DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
DEFAULT_BETAS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
BASE_DIR = "base"


def _clone(head: Head) -> Head:
    return type(head)(**head.get_params(deep=False))


@register
class TipAdapter(Head):
    """Cache-model adapter over a base head (see module docstring).

    Parameters
    ----------
    base: None (a default LinearProbe) or a Head instance, fitted or not.
    alphas, betas: tuning grids for the cache weight and sharpness.
    val_fraction: held-out share of (X, y) for tuning when no X_val is given.
    refit: rebuild base (if we fitted it) and cache on all of (X, y) after tuning.
    seed: seeds the hold-out split.
    chunk_size: query rows per block when computing cache affinities.
    """

    _unsaved_params = ("base",)

    def __init__(
        self,
        base=None,
        alphas=DEFAULT_ALPHAS,
        betas=DEFAULT_BETAS,
        val_fraction: float = 0.2,
        refit: bool = True,
        seed: int = 0,
        chunk_size: int = 2048,
    ):
        self.base = base
        self.alphas = alphas
        self.betas = betas
        self.val_fraction = val_fraction
        self.refit = refit
        self.seed = seed
        self.chunk_size = chunk_size

    # ------------------------------------------------------------------ helpers
    def _fit_base(self, X, y):
        if self.base is None:
            return LinearProbe().fit(X, y), False
        if not isinstance(self.base, Head):
            raise ValueError(f"base must be None or a tlpipe Head, got {type(self.base).__name__}")
        if hasattr(self.base, "classes_"):
            return self.base, True
        return _clone(self.base).fit(X, y), False

    def _cache_logits(self, Xn: np.ndarray, keys: np.ndarray, labels: np.ndarray, betas):
        """{beta: (M, C) cache term} for normalised queries Xn against keys."""
        C, K = len(self.classes_), len(keys)
        onehot = np.zeros((K, C), dtype=np.float32)
        onehot[np.arange(K), labels] = 1.0
        out = {float(b): np.empty((len(Xn), C), dtype=np.float32) for b in betas}
        step = max(1, min(int(self.chunk_size), 2**24 // max(K, 1)))  # <= 16M affinities a block
        for i in range(0, len(Xn), step):
            dist = 1.0 - Xn[i : i + step] @ keys.T
            for b in betas:
                out[float(b)][i : i + step] = (np.exp(-float(b) * dist) @ onehot) * (C / K)
        return out

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y, X_val=None, y_val=None) -> "TipAdapter":
        alphas = [float(a) for a in self.alphas]
        betas = [float(b) for b in self.betas]
        if not alphas or not betas or min(alphas) < 0 or min(betas) < 0:
            raise ValueError("alphas and betas must be non-empty and >= 0")
        X, codes = self._validate_fit(X, y)
        val = self._validate_val(X_val, y_val)
        if val is not None:
            fit_idx, (Xv, cv) = np.arange(len(codes)), val
        else:
            fit_idx, hold_idx = stratified_split(codes, float(self.val_fraction), int(self.seed))
            if len(hold_idx) == 0:
                raise HeadInputError(
                    "too few samples per class to hold out a tuning split; pass X_val / y_val"
                )
            Xv, cv = X[hold_idx], codes[hold_idx]

        base, prefitted = self._fit_base(X[fit_idx], self.classes_[codes[fit_idx]])
        if not np.array_equal(base.classes_, self.classes_):
            raise HeadInputError(
                f"base head classes {base.classes_.tolist()} differ from the training labels "
                f"{self.classes_.tolist()}; fit the base on the same label set"
            )
        if base.n_features_in_ != self.n_features_in_:
            raise HeadInputError(
                f"base head expects {base.n_features_in_} features, X has {self.n_features_in_}"
            )
        base_val = base.decision_function(Xv).astype(np.float64)
        cache = self._cache_logits(l2_normalize(Xv), l2_normalize(X[fit_idx]), codes[fit_idx], betas)
        grid = []
        for b in betas:
            for a in alphas:
                proba = softmax(base_val + a * cache[b])
                grid.append(
                    {
                        "alpha": a,
                        "beta": b,
                        "val_accuracy": float(np.mean(proba.argmax(1) == cv)),
                        "val_log_loss": log_loss(proba, cv),
                    }
                )
        best = min(grid, key=lambda r: (-r["val_accuracy"], r["val_log_loss"], r["alpha"]))

        if val is None and self.refit:
            if not prefitted:
                base, _ = self._fit_base(X, self.classes_[codes])
            keys, labels = X, codes
        else:
            keys, labels = X[fit_idx], codes[fit_idx]
        self.base_ = base
        self.base_prefitted_ = bool(prefitted)
        self.keys_ = l2_normalize(keys)
        self.labels_ = labels.astype(np.int64)
        self.alpha_ = best["alpha"]
        self.beta_ = best["beta"]
        self.grid_results_ = grid
        self.best_params_ = dict(best)
        return self

    # ------------------------------------------------------------------ prediction
    def _logits(self, X: np.ndarray) -> np.ndarray:
        base = self.base_.decision_function(X).astype(np.float32)
        if self.alpha_ == 0:
            return base
        cache = self._cache_logits(l2_normalize(X), self.keys_, self.labels_, [self.beta_])
        return base + np.float32(self.alpha_) * cache[float(self.beta_)]

    # ------------------------------------------------------------------ persistence
    def _params_for_save(self):
        params = super()._params_for_save()
        b = self.base
        params["base"] = None if b is None else {"class": type(b).__name__, "params": b._params_for_save()}
        return params

    @classmethod
    def _params_from_saved(cls, params, path):
        params = dict(params)
        spec = params.pop("base", None)
        out = super()._params_from_saved(params, path)
        if spec is not None:
            base_cls = HEADS[spec["class"]]
            out["base"] = base_cls(**base_cls._params_from_saved(spec["params"], path))
        else:
            out["base"] = None
        return out

    def _state(self):
        state = {
            "alpha": self.alpha_,
            "beta": self.beta_,
            "base_prefitted": self.base_prefitted_,
            "grid_results": self.grid_results_,
            "best_params": self.best_params_,
        }
        return {"keys": self.keys_, "labels": self.labels_}, state

    def _save_extra(self, path: Path) -> None:
        self.base_.save(Path(path) / BASE_DIR)

    def _set_state(self, arrays, state, path):
        self.keys_ = arrays["keys"]
        self.labels_ = arrays["labels"].astype(np.int64)
        self.alpha_ = float(state["alpha"])
        self.beta_ = float(state["beta"])
        self.base_prefitted_ = bool(state.get("base_prefitted", False))
        self.grid_results_ = state.get("grid_results", [])
        self.best_params_ = state.get("best_params", {})
        self.base_ = load_head(Path(path) / BASE_DIR)
