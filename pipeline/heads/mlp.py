"""MLP: one hidden layer (ReLU + dropout) trained with AdamW and early stopping.

Features are z-scored with the training mean / std (stored with the head). Training stops when
the validation loss has not improved for ``patience`` epochs and the best epoch's weights are
kept. Validation data: ``X_val`` / ``y_val`` if given, else a seeded stratified
``val_fraction`` of (X, y) held out from training (no refit afterwards: the hold-out decides
the epoch count and stays unseen). Deterministic given ``seed`` (own RNG for init, shuffling
and dropout; the global torch RNG is left untouched).
"""

from __future__ import annotations

import numpy as np

from pipeline.heads.base import Head, torch_threads
from pipeline.heads.errors import HeadInputError
from pipeline.heads.extmath import Standardizer, stratified_split
from pipeline.heads.linear_probe import per_class_weights
from pipeline.heads.registry import register


class AdamW:
    """AdamW (Loshchilov & Hutter; torch.optim.AdamW's defaults and update, no amsgrad).

    Written out because constructing any ``torch.optim`` optimizer imports ``torch._dynamo``,
    seconds of CPU in every fresh worker process that fits one small head."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 1e-2,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        import torch

        self.params = list(params)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        import torch

        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v):
                if p.grad is None:
                    continue
                p.mul_(1 - self.lr * self.weight_decay)
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (v.sqrt() / bc2 ** 0.5).add_(self.eps)
                p.addcdiv_(m, denom, value=-self.lr / bc1)


def train_mlp(Xt, yt, Xvt, n_out: int, *, loss_fn, val_metrics, hidden: int, dropout: float,
              lr: float, weight_decay: float, batch_size: int, max_epochs: int, patience: int,
              seed: int, n_threads: int | None):
    """One hidden layer (ReLU + dropout) trained with AdamW on the tensors (Xt, yt) and stopped
    early on ``val_metrics(logits of Xvt)["val_loss"]`` (only a clear improvement resets the
    patience; the best epoch's weights are kept). Deterministic given `seed` (own generator; the
    global torch RNG is left untouched). Returns ((W1, b1, W2, b2) as numpy, history, best epoch)."""
    import torch
    from torch import nn

    with torch_threads(n_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        gen = torch.Generator().manual_seed(int(seed))
        model = nn.Sequential(nn.Linear(Xt.shape[1], int(hidden)), nn.ReLU(),
                              nn.Dropout(float(dropout)), nn.Linear(int(hidden), int(n_out)))
        opt = AdamW(list(model.parameters()), lr=float(lr), weight_decay=float(weight_decay))
        bs = max(1, int(batch_size))
        best_loss, best_state, best_epoch, bad, history = float("inf"), None, 0, 0, []
        for epoch in range(int(max_epochs)):
            model.train()
            perm = torch.randperm(len(Xt), generator=gen)
            for i in range(0, len(Xt), bs):
                idx = perm[i : i + bs]
                opt.zero_grad()
                loss_fn(model(Xt[idx]), yt[idx]).backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                row = val_metrics(model(Xvt))
            vloss = row["val_loss"]
            history.append({"epoch": epoch + 1, **row})
            significant = vloss < best_loss - max(1e-4 * abs(best_loss), 1e-7)
            if vloss < best_loss:
                best_loss, best_epoch = vloss, epoch + 1
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            bad = 0 if significant else bad + 1
            if bad >= int(patience):
                break
        model.load_state_dict(best_state)
    sd = model.state_dict()
    weights = (sd["0.weight"].T.contiguous().numpy(), sd["0.bias"].numpy().copy(),
               sd["3.weight"].T.contiguous().numpy(), sd["3.bias"].numpy().copy())
    return weights, history, best_epoch


def auto_hidden(n_classes: int) -> int:
    """Hidden units when none are given: the power of two at or above twice the classes, within
    [128, 512]. Narrower than about twice the classes bottlenecks the output layer; wider costs
    compute (the first layer is most of an epoch) without a better cross-validated score on
    ten-class sets (BENCHMARKS.md, MLP width)."""
    return int(min(512, max(128, 2 ** int(np.ceil(np.log2(max(1, 2 * int(n_classes))))))))


@register
class MLP(Head):
    """Parameters
    ----------
    hidden: hidden units (None: `auto_hidden` of the number of classes); dropout: drop
    probability on the hidden layer (and none on input).
    lr, weight_decay: AdamW settings; batch_size, max_epochs, patience: training schedule.
    val_fraction: held-out share of (X, y) for early stopping when no X_val is given.
    label_smoothing, class_weight (None | 'balanced' | {label: w}): loss options.
    seed: init / shuffle / dropout seed. n_threads: torch threads during fit (None = leave).
    """

    def __init__(
        self,
        hidden: int | None = None,
        dropout: float = 0.2,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        batch_size: int = 256,
        max_epochs: int = 100,
        patience: int = 4,
        val_fraction: float = 0.1,
        label_smoothing: float = 0.0,
        class_weight=None,
        seed: int = 0,
        n_threads: int | None = None,
    ):
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.val_fraction = val_fraction
        self.label_smoothing = label_smoothing
        self.class_weight = class_weight
        self.seed = seed
        self.n_threads = n_threads

    def fit(self, X, y, X_val=None, y_val=None) -> "MLP":
        import torch
        from torch import nn

        X, codes = self._validate_fit(X, y)
        val = self._validate_val(X_val, y_val)
        C = len(self.classes_)
        if val is None:
            fit_idx, hold_idx = stratified_split(codes, float(self.val_fraction), int(self.seed))
            if len(hold_idx) == 0:
                raise HeadInputError(
                    "too few samples per class to hold out an early-stopping split; "
                    "pass X_val / y_val"
                )
            Xf, cf, Xv, cv = X[fit_idx], codes[fit_idx], X[hold_idx], codes[hold_idx]
        else:
            Xf, cf, (Xv, cv) = X, codes, val
        scaler = Standardizer.fit(Xf)
        sw = per_class_weights(cf, C, self.class_weight, self.classes_)
        weight = None if sw is None else torch.as_tensor(sw, dtype=torch.float32)

        loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=float(self.label_smoothing))
        val_loss_fn = nn.CrossEntropyLoss(weight=weight)
        yvt = torch.from_numpy(cv)

        def val_metrics(logits):
            return {"val_loss": float(val_loss_fn(logits, yvt)),
                    "val_accuracy": float((logits.argmax(1) == yvt).float().mean())}

        self.hidden_ = auto_hidden(C) if self.hidden is None else int(self.hidden)
        weights, self.history_, self.best_epoch_ = train_mlp(
            torch.from_numpy(scaler.transform(Xf)), torch.from_numpy(cf),
            torch.from_numpy(scaler.transform(Xv)), C, loss_fn=loss_fn, val_metrics=val_metrics,
            hidden=self.hidden_, dropout=self.dropout, lr=self.lr, weight_decay=self.weight_decay,
            batch_size=self.batch_size, max_epochs=self.max_epochs, patience=self.patience,
            seed=self.seed, n_threads=self.n_threads)
        self.scaler_ = scaler
        self.W1_, self.b1_, self.W2_, self.b2_ = weights
        return self

    def _logits(self, X: np.ndarray) -> np.ndarray:
        h = np.maximum(self.scaler_.transform(X) @ self.W1_ + self.b1_, 0)
        return h @ self.W2_ + self.b2_

    def _state(self):
        arrays = {
            "mean": self.scaler_.mean,
            "std": self.scaler_.std,
            "W1": self.W1_,
            "b1": self.b1_,
            "W2": self.W2_,
            "b2": self.b2_,
        }
        return arrays, {"best_epoch": self.best_epoch_, "history": self.history_}

    def _set_state(self, arrays, state, path):
        self.scaler_ = Standardizer(arrays["mean"], arrays["std"])
        self.W1_, self.b1_ = arrays["W1"], arrays["b1"]
        self.W2_, self.b2_ = arrays["W2"], arrays["b2"]
        self.best_epoch_ = int(state.get("best_epoch", 0))
        self.hidden_ = int(self.W1_.shape[1])
        self.history_ = state.get("history", [])
