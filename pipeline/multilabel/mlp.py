"""Multi-label MLP: one hidden layer (ReLU + dropout), one sigmoid output per label, trained
with binary cross-entropy and AdamW (``pipeline.heads.mlp.AdamW``), early stopping on held-out
BCE. Held-out rows: ``X_val``/``Y_val`` if given, else an iteratively stratified
``val_fraction`` of the rows that is never trained on (no refit: it decides the epoch count and
tunes the per-label thresholds). Deterministic given ``seed``; the global torch RNG is left alone.
"""

from __future__ import annotations

import numpy as np

from pipeline.heads.base import Standardizer
from pipeline.heads.mlp import train_mlp
from pipeline.multilabel.base import MultiLabelHead, holdout_or_val


class MultiLabelMLP(MultiLabelHead):
    """Parameters
    ----------
    hidden, dropout: hidden units and their dropout; lr, weight_decay: AdamW settings.
    batch_size, max_epochs, patience: schedule; val_fraction: hold-out share without X_val.
    pos_weight: None or "balanced" (BCE positives weighted by negatives / positives per label).
    seed: init / shuffle / dropout seed; n_threads: torch threads during fit (None = leave).
    """

    def __init__(self, hidden: int = 256, dropout: float = 0.2, lr: float = 1e-3,
                 weight_decay: float = 1e-4, batch_size: int = 128, max_epochs: int = 200,
                 patience: int = 8, val_fraction: float = 0.2, pos_weight=None, seed: int = 0,
                 n_threads: int | None = None):
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.val_fraction = val_fraction
        self.pos_weight = pos_weight
        self.seed = seed
        self.n_threads = n_threads

    def fit(self, X, Y, X_val=None, Y_val=None, *, classes=None) -> "MultiLabelMLP":
        import torch
        from torch import nn

        if self.pos_weight not in (None, "balanced"):
            raise ValueError(f"pos_weight must be None or 'balanced', got {self.pos_weight!r}")
        X, Y = self._validate_fit_ml(X, Y, classes)
        val = self._validate_val_ml(X_val, Y_val)
        if val is None:
            fit_idx, held = holdout_or_val(Y, self.val_fraction, self.seed, "early-stopping")
            Xf, Yf, Xv, Yv, source = X[fit_idx], Y[fit_idx], X[held], Y[held], "holdout"
        else:
            Xf, Yf, (Xv, Yv), source = X, Y, val, "X_val"
        scaler = Standardizer.fit(Xf)
        L = Y.shape[1]
        pw = None
        if self.pos_weight == "balanced":
            pos = Yf.sum(0).astype(np.float64)
            pw = torch.as_tensor(np.where(pos > 0, (len(Yf) - pos) / np.maximum(pos, 1), 1.0),
                                 dtype=torch.float32)

        loss_fn = nn.BCEWithLogitsLoss(pos_weight=pw)
        Yvt = torch.from_numpy(Yv.astype(np.float32))
        weights, self.history_, self.best_epoch_ = train_mlp(
            torch.from_numpy(scaler.transform(Xf)), torch.from_numpy(Yf.astype(np.float32)),
            torch.from_numpy(scaler.transform(Xv)), L, loss_fn=loss_fn,
            val_metrics=lambda logits: {"val_loss": float(loss_fn(logits, Yvt))},
            hidden=self.hidden, dropout=self.dropout, lr=self.lr, weight_decay=self.weight_decay,
            batch_size=self.batch_size, max_epochs=self.max_epochs, patience=self.patience,
            seed=self.seed, n_threads=self.n_threads)
        self.scaler_ = scaler
        self.W1_, self.b1_, self.W2_, self.b2_ = weights
        self._tune(Yv, self.predict_proba(Xv), source)
        return self

    def _logits(self, X: np.ndarray) -> np.ndarray:
        h = np.maximum(self.scaler_.transform(X) @ self.W1_ + self.b1_, 0)
        return h @ self.W2_ + self.b2_

    def _head_state(self):
        arrays = {"mean": self.scaler_.mean, "std": self.scaler_.std, "W1": self.W1_, "b1": self.b1_,
                  "W2": self.W2_, "b2": self.b2_}
        return arrays, {"best_epoch": self.best_epoch_, "history": self.history_}

    def _set_head_state(self, arrays, state, path):
        self.scaler_ = Standardizer(arrays["mean"], arrays["std"])
        self.W1_, self.b1_ = arrays["W1"], arrays["b1"]
        self.W2_, self.b2_ = arrays["W2"], arrays["b2"]
        self.best_epoch_ = int(state.get("best_epoch", 0))
        self.history_ = state.get("history", [])
