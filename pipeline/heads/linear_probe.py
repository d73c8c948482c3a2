"""LinearProbe: multinomial logistic regression on cached features, with a batched L2 sweep.

All weight-decay values are fitted together (see ``batched_lbfgs``): one shared matrix product
per objective evaluation, full-batch L-BFGS per member, on standardised features.

Regularisation convention: ``loss = weighted mean CE + weight_decay / 2 * ||W||^2`` (intercept
unpenalised), which is scikit-learn's ``LogisticRegression(C=1 / (weight_decay * n_samples))``
(``n_samples`` = the number of rows the model is fitted on; with sample weights, their sum).

Model selection (kept honest):

* ``fit(X, y, X_val, y_val)``: every member is trained on (X, y) and scored on (X_val, y_val);
  the best member is kept as is.
* ``fit(X, y)``: a seeded, stratified ``val_fraction`` of (X, y) is held out, the sweep is
  trained on the rest and scored on the held-out part; with ``refit=True`` (default) the chosen
  weight decay is then refitted on all of (X, y), warm-started from the selected member.
  ``sweep_results_`` always holds the held-out scores, never the refitted model's train scores.

Selection criterion: ``scoring="accuracy"`` (ties broken by lower log-loss) or ``"log_loss"``.
With ``prune=True`` (default) values that fall clearly behind on the selection data are stopped
early (``ValidationPruner``); they are flagged ``stopped_early`` in ``sweep_results_`` and the
selected value is always run to convergence.
The feature mean / std and the solver's preconditioner are computed on all rows of X (they use
no labels), so the hold-out rows are standardised exactly like future inputs.

Large training sets (successive halving over data): with more than ``2 * subsample`` training
rows, every value is first trained on a seeded stratified ``subsample`` of them at the same C
(``lambda * n`` held constant: the optimal C of a probe barely moves with n, the optimal
lambda of the mean-loss form falls as 1/n), all values together as one batched tensor and scored
on the selection data; the ``finalists`` best then continue on all rows, warm-started from their
subsample solutions, and the best of those on the selection data is chosen. ``sweep_results_``
marks which rows are subsample scores (``"rows"``) and keeps both scores for the finalists.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.heads.base import Head, codes_for, torch_threads
from pipeline.heads.errors import HeadInputError, NotFittedError
from pipeline.heads.extmath import Standardizer, log_loss, softmax, stratified_split
from pipeline.heads.registry import register

#: 20 log-spaced weight decays, strong to weak enough for ~100 .. ~100k training rows
DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = tuple(float(v) for v in np.logspace(-6, 1, 20))


def per_class_weights(codes: np.ndarray, n_classes: int, class_weight: Any, classes: np.ndarray):
    """(C,) weight per class, or None. 'balanced' = n / (n_classes * count(class))."""
    if class_weight is None:
        return None
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise ValueError(f"class_weight must be None, 'balanced' or a dict, got {class_weight!r}")
        return len(codes) / (n_classes * np.maximum(counts, 1))
    if isinstance(class_weight, dict):
        per_class = np.ones(n_classes)
        for label, wgt in class_weight.items():
            if classes.dtype.kind in "iu" and isinstance(label, str):
                label = int(label)  # dict keys come back from config.json as strings
            idx = codes_for(classes, np.asarray([label]), name="class_weight key")[0]
            per_class[idx] = float(wgt)
        return per_class
    raise ValueError(f"class_weight must be None, 'balanced' or a dict, got {class_weight!r}")


def class_weights(codes: np.ndarray, n_classes: int, class_weight: Any, classes: np.ndarray):
    """Per-sample weights (N,) from per_class_weights, or None."""
    per_class = per_class_weights(codes, n_classes, class_weight, classes)
    return None if per_class is None else per_class[codes]


class ValidationPruner:
    """Early stopping of hopeless sweep members (successive-halving style), on validation data.

    Called by the solver every few iterations with every member's current weights. From
    ``min_iter`` on, a still-running member is stopped when its validation score is more than
    ``margin`` behind the best member's current score AND did not improve since the previous
    check. The best member is never stopped (it is not behind itself), so the selected model is
    always a fully converged one; stopped members keep their last weights and are reported with
    ``stopped_early: True`` in ``sweep_results_``.
    """

    MIN_ROWS = 200

    def __init__(self, X_val, codes_val, scoring: str, margin: float, min_iter: int = 10):
        import torch

        self.X = torch.from_numpy(np.ascontiguousarray(X_val, dtype=np.float32))
        self.codes = torch.from_numpy(np.asarray(codes_val, dtype=np.int64))
        self.scoring = scoring
        self.margin = float(margin)
        self.min_iter = int(min_iter)
        self.prev: np.ndarray | None = None

    def scores(self, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
        """(S,) validation score per member, higher is better (accuracy or -log-loss)."""
        import torch

        S, D, C = coef.shape
        W = torch.from_numpy(np.ascontiguousarray(coef.transpose(1, 0, 2))).reshape(D, S * C)
        Z = (self.X @ W).view(-1, S, C) + torch.from_numpy(intercept)[None]
        if self.scoring == "accuracy":
            return (Z.argmax(2) == self.codes[:, None]).double().mean(0).numpy()
        logp = torch.log_softmax(Z.double(), dim=2)
        idx = self.codes[:, None, None].expand(-1, S, 1)
        return logp.gather(2, idx)[:, :, 0].mean(0).numpy()

    def __call__(self, iteration: int, coef, intercept, active) -> np.ndarray:
        score = self.scores(coef, intercept)
        stop = np.zeros(len(score), dtype=bool)
        if iteration >= self.min_iter and self.prev is not None:
            behind = score.max() - score > self.margin
            stop = active & behind & (score <= self.prev)
        self.prev = score
        return stop


@register
class LinearProbe(Head):
    """Multinomial logistic regression with a batched weight-decay sweep.

    Parameters
    ----------
    weight_decays: values of lambda to sweep (None = 20 log-spaced values in [1e-6, 10]).
    class_weight: None, 'balanced' or {label: weight}.
    label_smoothing: epsilon of label smoothing in the training loss (0 = off).
    val_fraction: share of training rows held out for selection when no X_val is given.
    refit: after selecting on an internal hold-out, refit the chosen value on all rows.
    scoring: "accuracy" (ties -> lower log-loss) or "log_loss".
    max_iter, tol: L-BFGS iteration cap and max-abs-gradient tolerance per member.
    prune: stop members that are clearly out of the running on the validation data (see
        ``ValidationPruner``); needs >= 200 validation rows, else no member is stopped.
    prune_margin: how far behind the best a member must be to be stopped, in the scoring's
        units (None = 0.02 accuracy, or 0.05 nats of log-loss).
    standardize: z-score features with the training mean / std (stored with the head).
    seed: seeds the hold-out split (the solver itself is deterministic).
    n_threads: torch intra-op threads during fit (None = leave torch's setting).
    subsample: rows for the all-values phase on large training sets (None = every value on
        every row); used when there are more than twice as many training rows.
    finalists: values that continue from the subsample phase to all rows.
    """

    def __init__(
        self,
        weight_decays=None,
        class_weight=None,
        label_smoothing: float = 0.0,
        val_fraction: float = 0.15,
        refit: bool = True,
        scoring: str = "accuracy",
        max_iter: int = 500,
        tol: float = 1e-4,
        prune: bool = True,
        prune_margin: float | None = None,
        standardize: bool = True,
        seed: int = 0,
        n_threads: int | None = None,
        subsample: int | None = 8192,
        finalists: int = 2,
    ):
        self.weight_decays = weight_decays
        self.class_weight = class_weight
        self.label_smoothing = label_smoothing
        self.val_fraction = val_fraction
        self.refit = refit
        self.scoring = scoring
        self.max_iter = max_iter
        self.tol = tol
        self.prune = prune
        self.prune_margin = prune_margin
        self.standardize = standardize
        self.seed = seed
        self.n_threads = n_threads
        self.subsample = subsample
        self.finalists = finalists

    # ------------------------------------------------------------------ fitting
    def _lambdas(self) -> np.ndarray:
        lams = DEFAULT_WEIGHT_DECAYS if self.weight_decays is None else self.weight_decays
        lams = np.asarray(lams, dtype=np.float64).ravel()
        if len(lams) == 0 or not np.all(np.isfinite(lams)) or np.any(lams < 0):
            raise ValueError(f"weight_decays must be non-empty, finite and >= 0, got {lams}")
        return lams

    def fit(self, X, y, X_val=None, y_val=None, *, basis=None, init=None, scaler=None,
            rotated=None) -> "LinearProbe":
        """`basis`: a precomputed preconditioner ``second_moment_basis(standardised X)``, e.g.
        one computed on every row and shared by the folds of a cross-validation. `init`: a warm
        start (coef (S, D, C), intercept (S, C)) per weight decay, in the standardised space,
        e.g. the previous fold's solutions (`members`). Both change how fast the solver
        converges, never what it converges to. `scaler`: a fitted `Standardizer` to use instead
        of fitting one on X (label-free statistics shared by the folds of a cross-validation);
        `rotated`: ``rotate_rows(scaler.transform(X), basis)``, sliced from the whole set's."""
        from pipeline.heads.batched_lbfgs import fit_sweep, second_moment_basis

        if self.scoring not in ("accuracy", "log_loss"):
            raise ValueError(f"scoring must be 'accuracy' or 'log_loss', got {self.scoring!r}")
        if not 0.0 <= float(self.label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        lams = self._lambdas()
        X, codes = self._validate_fit(X, y)
        val = self._validate_val(X_val, y_val)
        C = len(self.classes_)

        if scaler is None:
            scaler = (
                Standardizer.fit(X)
                if self.standardize
                else Standardizer(np.zeros(X.shape[1], np.float32), np.ones(X.shape[1], np.float32))
            )
        if rotated is not None and (basis is None or np.shape(rotated) != np.shape(X)):
            raise ValueError(f"rotated rows {np.shape(rotated)} need a basis and the shape of X {np.shape(X)}")
        Xs = scaler.transform(X)
        sw = class_weights(codes, C, self.class_weight, self.classes_)
        kw = dict(
            label_smoothing=float(self.label_smoothing),
            max_iter=int(self.max_iter),
            tol=float(self.tol),
        )

        if init is not None and (np.shape(init[0]) != (len(lams), X.shape[1], C)
                                 or np.shape(init[1]) != (len(lams), C)):
            raise ValueError(f"init has shapes {np.shape(init[0])}, {np.shape(init[1])}; expected "
                             f"{(len(lams), X.shape[1], C)}, {(len(lams), C)}")
        with torch_threads(self.n_threads):
            if basis is None:
                basis = second_moment_basis(Xs)
            elif np.shape(basis[0]) != (X.shape[1],):
                raise ValueError(f"basis has {np.shape(basis[0])} eigenvalues for {X.shape[1]} features")
            if val is not None:
                fit_idx = np.arange(len(codes))
                Xv, cv = scaler.transform(val[0]), val[1]
            elif len(lams) > 1:
                fit_idx, hold_idx = stratified_split(codes, float(self.val_fraction), int(self.seed))
                if len(hold_idx) == 0:
                    raise HeadInputError(
                        "too few samples per class to hold out a validation split; "
                        "pass X_val / y_val or a single weight decay"
                    )
                Xv, cv = Xs[hold_idx], codes[hold_idx]
            else:
                fit_idx, Xv, cv = np.arange(len(codes)), None, None

            sw_fit = None if sw is None else sw[fit_idx]
            whole = len(fit_idx) == len(codes)  # no copy of X when every row is used
            X_fit = Xs if whole else Xs[fit_idx]
            c_fit = codes if whole else codes[fit_idx]
            r_fit = rotated if (rotated is None or whole) else rotated[fit_idx]
            n_sub = int(self.subsample) if self.subsample else 0
            halving = Xv is not None and n_sub > 0 and len(c_fit) > 2 * n_sub and len(lams) > int(self.finalists) >= 1
            if halving:
                _, sub = stratified_split(c_fit, n_sub / len(c_fit), int(self.seed) + 1)
                sw_sub = None if sw_fit is None else sw_fit[sub]
                # the same C on fewer rows: lambda scales with (weighted) n_fit / n_sub
                scale = (len(c_fit) / len(sub)) if sw_fit is None else float(sw_fit.sum() / sw_sub.sum())
                coef, intercept, results = self._sweep(
                    X_fit[sub], c_fit[sub], C, lams * scale, sw_sub, Xv, cv, basis, kw, init=init,
                    lams_reported=lams, rotated=None if r_fit is None else r_fit[sub])
                for r in results:
                    r["rows"] = int(len(sub))
                fin = self._ranking(results)[: int(self.finalists)]
                coef_f, intercept_f, res_f = self._sweep(
                    X_fit, c_fit, C, lams[fin], sw_fit, Xv, cv, basis, kw,
                    init=(coef[fin], intercept[fin]), rotated=r_fit)
                for j, s_ in enumerate(fin):
                    sub_scores = {f"subsample_{k}": results[s_][k] for k in ("val_accuracy", "val_log_loss", "n_iter")}
                    results[s_] = {**res_f[j], **sub_scores, "rows": int(len(c_fit)), "finalist": True}
                    coef[s_], intercept[s_] = coef_f[j], intercept_f[j]
                best = int(fin[self._ranking(res_f)[0]])
            else:
                coef, intercept, results = self._sweep(X_fit, c_fit, C, lams, sw_fit, Xv, cv, basis,
                                                       kw, init=init, rotated=r_fit)
                best = self._ranking(results)[0] if Xv is not None else 0

            # every member's solution, for cross-validation over the weight decays
            # (`member_proba`); large only while fitting, never saved
            self._members = (coef.copy(), intercept.copy(), lams.copy()) if val is not None else None
            coef, intercept = coef[best], intercept[best]
            refitted = False
            if val is None and len(lams) > 1 and self.refit:
                final = fit_sweep(
                    Xs, codes, C, lams[best : best + 1], sample_weight=sw, basis=basis,
                    init=(coef[None], intercept[None]), rotated=rotated, **kw,
                )
                coef, intercept = final.coef[0], final.intercept[0]
                refitted = True

        self.scaler_ = scaler
        self.coef_ = np.ascontiguousarray(coef, dtype=np.float32)  # (D, C), standardised space
        self.intercept_ = np.ascontiguousarray(intercept, dtype=np.float32)
        self.sweep_results_ = results
        self.best_params_ = {
            "weight_decay": float(lams[best]),
            # C of the final model: after a refit it was fitted on all rows
            "C": (
                float(1.0 / (lams[best] * (len(codes) if sw is None else float(sw.sum()))))
                if refitted and lams[best] > 0
                else results[best]["C"]
            ),
            "refitted": refitted,
            "selected_on": "X_val" if val is not None else ("holdout" if Xv is not None else "none"),
            **{k: results[best][k] for k in ("val_accuracy", "val_log_loss") if k in results[best]},
        }
        return self

    def _ranking(self, results: list[dict]) -> list[int]:
        """Member indices, best first, by the selection criterion on the selection data."""
        if self.scoring == "accuracy":
            key = lambda s: (-results[s]["val_accuracy"], results[s]["val_log_loss"])  # noqa: E731
        else:
            key = lambda s: results[s]["val_log_loss"]  # noqa: E731
        return sorted(range(len(results)), key=key)

    def _sweep(self, X, codes, n_classes, lams, sw, Xv, cv, basis, kw, *, init=None, lams_reported=None,
               rotated=None):
        """One batched fit of every value in `lams`: (coef (S,D,C), intercept (S,C), result rows)."""
        from pipeline.heads.batched_lbfgs import fit_sweep

        monitor = None
        if self.prune and Xv is not None and len(lams) > 2 and len(cv) >= ValidationPruner.MIN_ROWS:
            margin = self.prune_margin
            if margin is None:
                margin = 0.02 if self.scoring == "accuracy" else 0.05
            monitor = ValidationPruner(Xv, cv, self.scoring, margin)
        sweep = fit_sweep(X, codes, n_classes, lams, sample_weight=sw, basis=basis, monitor=monitor,
                          init=init, rotated=rotated, **kw)
        n_fit = float(len(codes) if sw is None else sw.sum())
        shown = lams if lams_reported is None else lams_reported
        results = []
        for s, lam in enumerate(lams):
            row = {
                "weight_decay": float(shown[s]),
                "C": float(1.0 / (lam * n_fit)) if lam > 0 else None,
                "n_iter": int(sweep.n_iter[s]),
                "converged": bool(sweep.converged[s]),
                "stopped_early": bool(sweep.stopped[s]),
                "train_objective": float(sweep.loss[s]),
            }
            if Xv is not None:
                proba = softmax(Xv @ sweep.coef[s] + sweep.intercept[s])
                row["val_accuracy"] = float(np.mean(proba.argmax(1) == cv))
                row["val_log_loss"] = log_loss(proba, cv)
            results.append(row)
        return sweep.coef, sweep.intercept, results  # fresh arrays: the caller may overwrite members

    # ------------------------------------------------------------------ prediction
    @property
    def members(self) -> tuple[np.ndarray, np.ndarray]:
        """(coef (S, D, C), intercept (S, C)) of every swept member, standardised space: the
        `init` of a fit on similar rows (the next cross-validation fold). Fitting process only."""
        members = getattr(self, "_members", None)
        if members is None:
            raise NotFittedError("members needs a LinearProbe fitted with X_val / y_val")
        return members[0], members[1]

    def member_proba(self, X) -> tuple[np.ndarray, np.ndarray]:
        """(weight decays (S,), probabilities (S, N, C)) of every swept member on X.

        Available after ``fit(X, y, X_val, y_val)`` in the fitting process (not saved): it lets
        k-fold cross-validation choose the weight decay on all folds at once, as scikit-learn's
        GridSearchCV would, from one batched fit per fold."""
        members = getattr(self, "_members", None)
        if members is None:
            raise NotFittedError("member_proba needs a LinearProbe fitted with X_val / y_val")
        coef, intercept, lams = members
        Xs = self.scaler_.transform(self._validate_predict(X))
        return lams, np.stack([softmax(Xs @ coef[s] + intercept[s]) for s in range(len(lams))])

    def _logits(self, X: np.ndarray) -> np.ndarray:
        return self.scaler_.transform(X) @ self.coef_ + self.intercept_

    # ------------------------------------------------------------------ persistence
    def _state(self):
        arrays = {
            "mean": self.scaler_.mean,
            "std": self.scaler_.std,
            "coef": self.coef_,
            "intercept": self.intercept_,
        }
        return arrays, {"sweep_results": self.sweep_results_, "best_params": self.best_params_}

    def _set_state(self, arrays, state, path):
        self.scaler_ = Standardizer(arrays["mean"], arrays["std"])
        self.coef_ = arrays["coef"]
        self.intercept_ = arrays["intercept"]
        self.sweep_results_ = state.get("sweep_results", [])
        self.best_params_ = state.get("best_params", {})
