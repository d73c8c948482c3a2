"""One-vs-rest logistic probe: one L2-regularised logistic regression per label, every weight
decay of the sweep fitted together by the batched L-BFGS of ``pipeline.heads.batched_lbfgs``.

Per label l and weight decay lambda (standardised features, intercept unpenalised):

    f(w, b) = mean_i BCE(sigmoid(x_i w + b), y_il) + lambda / 2 * ||w||^2

= scikit-learn's ``LogisticRegression(C = 1 / (lambda * n))``. It is solved as the two-class
softmax regression ``fit_sweep`` already batches: logits (0, z) and (z0, z1) give the same
probabilities when z = z1 - z0, and with both columns penalised by lambda' the optimum is
symmetric (z0 = -z1), so lambda' = 2 lambda recovers the binary problem exactly. Each label is
one ``fit_sweep`` call (its own targets); the preconditioner ``second_moment_basis`` depends only
on X and is computed once for every label.

Selection: every member is scored on held-out rows (``X_val``/``Y_val``, else an iteratively
stratified ``val_fraction`` of the rows). ``select="shared"`` keeps the one weight decay with
the best held-out mAP (ties: lower mean BCE); ``"per_label"`` picks each label's own by its AP
(ties: lower BCE; labels without a held-out positive take the shared choice). Thresholds are
tuned on the held-out probabilities of the chosen members; with an internal hold-out the chosen
weight decays are then refitted on every row (``refit``), as ``LinearProbe`` does.
"""

from __future__ import annotations

import numpy as np

from pipeline.heads.base import Standardizer, torch_threads
from pipeline.heads.errors import HeadInputError, NotFittedError
from pipeline.heads.linear_probe import DEFAULT_WEIGHT_DECAYS
from pipeline.multilabel.base import MultiLabelHead, holdout_or_val, sigmoid
from pipeline.multilabel.metrics import average_precision

_SELECT = ("shared", "per_label")
#: intercept of a label that has no positive (or no negative) among the fitting rows
_CONSTANT_LOGIT = 12.0


def balanced_weights(y: np.ndarray) -> np.ndarray:
    """Per-row weights giving positives and negatives of one label equal total weight."""
    n, pos = len(y), int(y.sum())
    return np.where(y > 0, n / (2.0 * max(pos, 1)), n / (2.0 * max(n - pos, 1)))


def _bce(Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Mean binary cross-entropy per label (last axis)."""
    P = np.clip(P, 1e-12, 1 - 1e-12)
    return -(Y * np.log(P) + (1 - Y) * np.log(1 - P)).mean(axis=-2)


class OneVsRestProbe(MultiLabelHead):
    """Parameters
    ----------
    weight_decays: lambda values swept per label (None = LinearProbe's 20 log-spaced values).
    select: "shared" (one lambda, best held-out mAP) or "per_label" (each label's best AP).
    class_weight: None or "balanced" (per label: positives and negatives weigh the same).
    val_fraction: held-out share for selection + thresholds when no X_val is given.
    refit: after selecting on the internal hold-out, refit the chosen lambdas on every row.
    max_iter, tol: L-BFGS cap and gradient tolerance; standardize: z-score the features.
    seed: hold-out seed; n_threads: torch threads during fit (None = leave torch's setting).
        Default 1: the labels are fitted one after another and each product is small, so
        OpenMP hand-offs cost more than they gain (measured 0.18 s vs 2.6 s per label with 1 vs
        2 threads, 188 x 1280 features, on the shared 2-core test machine).
    """

    def __init__(self, weight_decays=None, select: str = "shared", class_weight=None,
                 val_fraction: float = 0.2, refit: bool = True, max_iter: int = 500,
                 tol: float = 1e-4, standardize: bool = True, seed: int = 0,
                 n_threads: int | None = 1):
        self.weight_decays = weight_decays
        self.select = select
        self.class_weight = class_weight
        self.val_fraction = val_fraction
        self.refit = refit
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize
        self.seed = seed
        self.n_threads = n_threads

    def _lambdas(self) -> np.ndarray:
        lams = np.asarray(DEFAULT_WEIGHT_DECAYS if self.weight_decays is None else self.weight_decays,
                          dtype=np.float64).ravel()
        if len(lams) == 0 or not np.all(np.isfinite(lams)) or np.any(lams < 0):
            raise ValueError(f"weight_decays must be non-empty, finite and >= 0, got {lams}")
        return lams

    def _fit_members(self, Xs, Y, lams, basis, init=None):
        """(W (S, D, L), b (S, L), n_iter (S, L)) of every lambda for every label."""
        from pipeline.heads.batched_lbfgs import fit_sweep

        S, D, L = len(lams), Xs.shape[1], Y.shape[1]
        W = np.zeros((S, D, L), np.float32)
        b = np.zeros((S, L), np.float32)
        iters = np.zeros((S, L), np.int64)
        for j in range(L):
            y = Y[:, j].astype(np.int64)
            pos = int(y.sum())
            if pos == 0 or pos == len(y):  # nothing to separate: a constant answer
                b[:, j] = _CONSTANT_LOGIT if pos else -_CONSTANT_LOGIT
                continue
            sw = balanced_weights(y) if self.class_weight == "balanced" else None
            start = None
            if init is not None:  # the symmetric two-column form of a binary solution
                w0, b0 = init[0][:, :, j], init[1][:, j]
                start = (np.stack([-w0 / 2, w0 / 2], axis=2), np.stack([-b0 / 2, b0 / 2], axis=1))
            fit = fit_sweep(Xs, y, 2, 2.0 * lams, sample_weight=sw, basis=basis, init=start,
                            max_iter=int(self.max_iter), tol=float(self.tol))
            W[:, :, j] = fit.coef[:, :, 1] - fit.coef[:, :, 0]
            b[:, j] = fit.intercept[:, 1] - fit.intercept[:, 0]
            iters[:, j] = fit.n_iter
        return W, b, iters

    @staticmethod
    def _member_proba(Xs, W, b) -> np.ndarray:
        """(S, N, L) probabilities of every member."""
        return sigmoid(np.einsum("nd,sdl->snl", Xs, W, optimize=True) + b[:, None, :])

    def fit(self, X, Y, X_val=None, Y_val=None, *, classes=None, basis=None) -> "OneVsRestProbe":
        """`basis`: a precomputed ``second_moment_basis`` of the standardised X (shared by folds)."""
        from pipeline.heads.batched_lbfgs import second_moment_basis

        if self.select not in _SELECT:
            raise ValueError(f"select must be one of {_SELECT}, got {self.select!r}")
        if self.class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")
        lams = self._lambdas()
        X, Y = self._validate_fit_ml(X, Y, classes)
        val = self._validate_val_ml(X_val, Y_val)
        scaler = (Standardizer.fit(X) if self.standardize
                  else Standardizer(np.zeros(X.shape[1], np.float32), np.ones(X.shape[1], np.float32)))
        Xs = scaler.transform(X)
        with torch_threads(self.n_threads):
            if basis is None:
                basis = second_moment_basis(Xs)
            elif np.shape(basis[0]) != (X.shape[1],):
                raise ValueError(f"basis has {np.shape(basis[0])} eigenvalues for {X.shape[1]} features")
            if val is not None:
                fit_idx = np.arange(len(Y))
                Xh, Yh, source = scaler.transform(val[0]), val[1], "X_val"
            else:
                fit_idx, held = holdout_or_val(Y, self.val_fraction, self.seed, "selection")
                Xh, Yh, source = Xs[held], Y[held], "holdout"
            W, b, iters = self._fit_members(Xs[fit_idx], Y[fit_idx], lams, basis)
            Ph = self._member_proba(Xh, W, b)  # (S, n_held, L)
            pick, table = self._choose(lams, Yh, Ph)
            L = Y.shape[1]
            Wc, bc = W[pick, :, np.arange(L)].T, b[pick, np.arange(L)]  # (D, L), (L,)
            self._tune(Yh, Ph[pick, :, np.arange(L)].T, source)
            self._members = (W, b, lams) if val is not None else None
            refitted = False
            if val is None and self.refit:
                # one refit per distinct chosen lambda, warm-started from the hold-out solution
                for s in np.unique(pick):
                    cols = np.flatnonzero(pick == s)
                    W1, b1, _ = self._fit_members(Xs, Y[:, cols], lams[s:s + 1], basis,
                                                  init=(Wc[None, :, cols], bc[None, cols]))
                    Wc[:, cols], bc[cols] = W1[0], b1[0]
                refitted = True
        self.scaler_ = scaler
        self.coef_ = np.ascontiguousarray(Wc, dtype=np.float32)
        self.intercept_ = np.ascontiguousarray(bc, dtype=np.float32)
        self.weight_decay_ = lams[pick].astype(np.float64)
        self.sweep_results_ = table
        self.best_params_ = {"select": self.select, "selected_on": source, "refitted": refitted,
                             "weight_decay": [float(v) for v in lams[pick]],
                             "n_iter_max": int(iters.max()) if iters.size else 0}
        return self

    def _choose(self, lams, Yh, Ph):
        """Chosen member per label (L,) and the sweep table (one row per lambda)."""
        S, _, L = Ph.shape
        ap = np.array([[average_precision(Yh[:, j], Ph[s, :, j]) if Yh[:, j].any() else np.nan
                        for j in range(L)] for s in range(S)])  # (S, L)
        bce = _bce(Yh[None].astype(np.float64), Ph)  # (S, L)
        has = np.isfinite(ap).any(axis=0)
        mean_ap = np.nanmean(ap[:, has], axis=1) if has.any() else np.zeros(S)
        shared = min(range(S), key=lambda s: (-mean_ap[s], bce[s].mean(), -lams[s]))
        pick = np.full(L, shared, dtype=np.int64)
        if self.select == "per_label":
            for j in np.flatnonzero(has):
                pick[j] = min(range(S), key=lambda s: (-ap[s, j], bce[s, j], -lams[s]))
        table = [{"weight_decay": float(lams[s]), "val_map": float(mean_ap[s]),
                  "val_bce": float(bce[s].mean())} for s in range(S)]
        return pick, table

    # ------------------------------------------------------------------ prediction
    def _logits(self, X: np.ndarray) -> np.ndarray:
        return self.scaler_.transform(X) @ self.coef_ + self.intercept_

    def member_proba(self, X) -> tuple[np.ndarray, np.ndarray]:
        """(weight decays (S,), probabilities (S, N, L)) of every swept member; available after
        ``fit(X, Y, X_val, Y_val)`` in the fitting process (not saved), so cross-validation can
        choose lambda on all folds at once."""
        members = getattr(self, "_members", None)
        if members is None:
            raise NotFittedError("member_proba needs a OneVsRestProbe fitted with X_val / Y_val")
        W, b, lams = members
        return lams, self._member_proba(self.scaler_.transform(self._validate_predict(X)), W, b)

    # ------------------------------------------------------------------ persistence
    def _head_state(self):
        arrays = {"mean": self.scaler_.mean, "std": self.scaler_.std, "coef": self.coef_,
                  "intercept": self.intercept_, "weight_decay": self.weight_decay_}
        return arrays, {"sweep_results": self.sweep_results_, "best_params": self.best_params_}

    def _set_head_state(self, arrays, state, path):
        self.scaler_ = Standardizer(arrays["mean"], arrays["std"])
        self.coef_, self.intercept_ = arrays["coef"], arrays["intercept"]
        self.weight_decay_ = arrays["weight_decay"]
        self.sweep_results_ = state.get("sweep_results", [])
        self.best_params_ = state.get("best_params", {})
        if self.coef_.shape != (self.n_features_in_, len(self.classes_)):
            raise HeadInputError(f"{path}: coef shape {self.coef_.shape} does not match "
                                 f"{self.n_features_in_} features x {len(self.classes_)} labels")
