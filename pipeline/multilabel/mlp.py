"""Multi-label MLP: one hidden layer (ReLU + dropout), one sigmoid output per label, trained
with binary cross-entropy and AdamW (``pipeline.heads.mlp.AdamW``), early stopping on held-out
BCE. Held-out rows: ``X_val``/``Y_val`` if given, else an iteratively stratified
``val_fraction`` of the rows that is never trained on (no refit: it decides the epoch count and
tunes the per-label thresholds). Deterministic given ``seed``; the global torch RNG is left alone.
"""

from __future__ import annotations

import numpy as np

from pipeline.heads.base import Standardizer, torch_threads
from pipeline.heads.mlp import AdamW
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

        with torch_threads(self.n_threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seed))
            gen = torch.Generator().manual_seed(int(self.seed))
            model = nn.Sequential(nn.Linear(X.shape[1], int(self.hidden)), nn.ReLU(),
                                  nn.Dropout(float(self.dropout)), nn.Linear(int(self.hidden), L))
            opt = AdamW(list(model.parameters()), lr=float(self.lr), weight_decay=float(self.weight_decay))
            loss_fn = nn.BCEWithLogitsLoss(pos_weight=pw)
            Xt = torch.from_numpy(scaler.transform(Xf))
            Yt = torch.from_numpy(Yf.astype(np.float32))
            Xvt = torch.from_numpy(scaler.transform(Xv))
            Yvt = torch.from_numpy(Yv.astype(np.float32))
            bs = max(1, int(self.batch_size))
            best_loss, best_state, best_epoch, bad, history = float("inf"), None, 0, 0, []
            for epoch in range(int(self.max_epochs)):
                model.train()
                perm = torch.randperm(len(Xt), generator=gen)
                for i in range(0, len(Xt), bs):
                    idx = perm[i:i + bs]
                    opt.zero_grad()
                    loss_fn(model(Xt[idx]), Yt[idx]).backward()
                    opt.step()
                model.eval()
                with torch.no_grad():
                    vloss = float(loss_fn(model(Xvt), Yvt))
                history.append({"epoch": epoch + 1, "val_bce": vloss})
                significant = vloss < best_loss - max(1e-4 * abs(best_loss), 1e-7)
                if vloss < best_loss:
                    best_loss, best_epoch = vloss, epoch + 1
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                bad = 0 if significant else bad + 1
                if bad >= int(self.patience):
                    break
            model.load_state_dict(best_state)

        sd = model.state_dict()
        self.scaler_ = scaler
        self.W1_ = sd["0.weight"].T.contiguous().numpy()
        self.b1_ = sd["0.bias"].numpy().copy()
        self.W2_ = sd["3.weight"].T.contiguous().numpy()
        self.b2_ = sd["3.bias"].numpy().copy()
        self.history_ = history
        self.best_epoch_ = best_epoch
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
