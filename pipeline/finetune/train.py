"""The training side of a fine-tune: AdamW, warm-up + cosine schedule, label smoothing, MixUp /
CutMix, mixed precision on GPU, sharded validation, early stopping and best-epoch weights.

`Finetuner` is pure torch; it works in one process or as one rank of a torch.distributed group
(DDP: pass the wrapped module as ``train_module``; metrics are all-reduced over ranks). A driver
(``fit_local`` here, ``jobs.finetune`` on Ray Train) runs epochs and checkpoints
(`pipeline.finetune.checkpoint`).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import BatchMixer
from .config import FinetuneConfig
from .model import FinetuneModel, trainable_state_keys

__all__ = ["Finetuner", "fit_local", "epoch_seed", "autocast_dtype", "predict_logits"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(device: str, dtype: str | None) -> str:
    """float32 on CPU; bfloat16 autocast on CUDA unless told otherwise."""
    if dtype is None:
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    return dtype


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Seed of one rank's epoch: a resumed run replays exactly the epochs it had not finished."""
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + int(rank) * 104_729) % (2**31 - 1)


def _dist() -> tuple[bool, int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    on, _, world = _dist()
    if on and world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class Finetuner:
    """Optimiser, schedule, loss, metrics and early-stopping state of one fine-tune.

    State that a checkpoint restores: trainable weights, optimiser moments, ``global_step``,
    ``epoch`` (the next epoch to run), ``history``, best score / epoch / weights, bad epochs,
    ``attempts`` (the epoch each (re)start began at).
    """

    def __init__(self, model: FinetuneModel, cfg: FinetuneConfig, *, steps_per_epoch: int,
                 device: str = "cpu", train_module: nn.Module | None = None):
        self.model = model
        self.train_module = train_module if train_module is not None else model
        self.cfg = cfg
        self.device = str(device)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.num_classes = int(model.head.out_features)
        self.dtype = autocast_dtype(self.device, cfg.dtype)
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.lr, betas=(0.9, 0.999),
                                           eps=1e-8)
        for g in self.optimizer.param_groups:
            g["base_lr"] = g["lr"]
        self.total_steps = int(cfg.epochs) * self.steps_per_epoch
        self.warmup_steps = int(round(float(cfg.warmup_epochs) * self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == "float16" else None
        self.mixer = (BatchMixer(self.num_classes, mixup_alpha=cfg.mixup_alpha,
                                 cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mix_prob, seed=cfg.seed)
                      if cfg.mixing else None)
        self.state_keys = trainable_state_keys(model)
        self.global_step = 0
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best_score: float | None = None
        self.best_loss: float | None = None
        self.best_epoch = -1
        self.bad_epochs = 0
        self.stopped_early = False
        self.best_state: dict[str, torch.Tensor] | None = None
        self.attempts: list[dict[str, Any]] = []
        self._set_lr()

    # ------------------------------------------------------------------ setup
    def _param_groups(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        head_ids = {id(p) for p in self.model.head.parameters()}
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            is_head = id(p) in head_ids
            decay = p.ndim >= 2 and "lora_" not in name
            groups.setdefault((is_head, decay), []).append(p)
        out = []
        for (is_head, decay), params in sorted(groups.items()):
            lr = (cfg.head_lr or cfg.lr) if is_head else cfg.lr
            out.append({"params": params, "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0,
                        "name": f"{'head' if is_head else 'backbone'}{'' if decay else '_no_decay'}"})
        return out

    def lr_factor(self, step: int) -> float:
        """Linear warm-up to 1, then cosine to min_lr_ratio at the last step."""
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        lo = float(self.cfg.min_lr_ratio)
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * t))

    def _set_lr(self) -> None:
        f = self.lr_factor(self.global_step)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * f

    def _autocast(self):
        if self.dtype == "float32":
            return contextlib.nullcontext()
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        return torch.autocast(device_type=device_type, dtype=_DTYPES[self.dtype])

    def _to_device(self, pixels: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device != "cpu":
            pixels = pixels.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
        return self.model.prepare_input(pixels), y

    # ------------------------------------------------------------------ epochs
    def train_epoch(self, loader) -> dict[str, float]:
        """One pass over this rank's shard; returns loss / accuracy (all ranks) and throughput."""
        cfg = self.cfg
        if self.mixer is not None:
            _, rank, _ = _dist()
            self.mixer.reseed(epoch_seed(cfg.seed, self.epoch, rank))
        self.train_module.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, n
        t0 = time.perf_counter()
        for pixels, y in loader:
            x, y = self._to_device(pixels, y)
            if self.mixer is not None:
                x, target = self.mixer(x, y)
            else:
                target = y
            with self._autocast():
                logits = self.train_module(x)
            loss = F.cross_entropy(logits.float(), target, label_smoothing=float(cfg.label_smoothing))
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, float(cfg.grad_clip))
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.global_step += 1
            self._set_lr()
            n = int(y.shape[0])
            totals += torch.tensor([float(loss.detach()) * n,
                                    float((logits.detach().argmax(1) == y).sum()), n],
                                   dtype=torch.float64)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        local_n = float(totals[2])
        totals = _all_reduce(totals)
        _, _, world = _dist()
        n = max(1.0, float(totals[2]))
        return {"train_loss": float(totals[0]) / n, "train_accuracy": float(totals[1]) / n,
                "train_images": int(totals[2]), "epoch_seconds": seconds,
                "images_per_s": (local_n / seconds * world) if seconds > 0 else 0.0,
                "lr": float(self.optimizer.param_groups[0]["lr"])}

    @torch.no_grad()
    def evaluate(self, loader) -> dict[str, float]:
        """Loss, accuracy and balanced accuracy over every rank's shard (un-augmented images)."""
        self.model.eval()
        C = self.num_classes
        stats = torch.zeros(2 * C + 2, dtype=torch.float64)  # correct per class, count per class, loss, n
        for pixels, y in loader:
            x, y = self._to_device(pixels, y)
            with self._autocast():
                logits = self.model(x)
            logits = logits.float()
            loss = F.cross_entropy(logits, y, reduction="sum")
            hit = (logits.argmax(1) == y).double().cpu()
            yc = y.cpu()
            stats[:C] += torch.bincount(yc, weights=hit, minlength=C)
            stats[C:2 * C] += torch.bincount(yc, minlength=C).double()
            stats[-2] += float(loss)
            stats[-1] += float(y.shape[0])
        stats = _all_reduce(stats)
        n = float(stats[-1])
        if n == 0:
            return {}
        counts = stats[C:2 * C]
        present = counts > 0
        recall = stats[:C][present] / counts[present]
        return {"val_loss": float(stats[-2]) / n, "val_accuracy": float(stats[:C].sum()) / n,
                "val_balanced_accuracy": float(recall.mean()), "val_images": int(n)}

    def _score(self, m: dict[str, float]) -> float:
        return -m["val_loss"] if self.cfg.monitor == "val_loss" else m[self.cfg.monitor]

    def end_epoch(self, train_metrics: dict[str, float], val_metrics: dict[str, float]) -> dict[str, Any]:
        """Record the epoch, update best weights and early stopping; returns the history row."""
        row: dict[str, Any] = {"epoch": self.epoch, **train_metrics, **val_metrics}
        improved = True
        if val_metrics:
            score, loss = self._score(val_metrics), val_metrics["val_loss"]
            if self.best_score is not None:
                better = score > self.best_score + float(self.cfg.min_delta)
                tie = abs(score - self.best_score) <= 1e-12 and loss < (self.best_loss or math.inf)
                improved = better or tie
            if improved:
                self.best_score, self.best_loss = score, loss
        if improved:
            self.best_epoch = self.epoch
            self.bad_epochs = 0
            self.best_state = self.trainable_state(clone=True)
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= int(self.cfg.patience):
                self.stopped_early = True
        row["best_epoch"] = self.best_epoch
        row["improved"] = bool(improved)
        self.history.append(row)
        self.epoch += 1
        return row

    @property
    def done(self) -> bool:
        return self.stopped_early or self.epoch >= int(self.cfg.epochs)

    # ------------------------------------------------------------------ weights
    def trainable_state(self, *, clone: bool = False) -> dict[str, torch.Tensor]:
        sd = self.model.state_dict()
        out = {}
        for k in self.state_keys:
            t = sd[k].detach()
            out[k] = t.to("cpu", copy=True).contiguous() if clone else t
        return out

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.state_keys) - set(state))
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[:3]}); it was "
                             "written for another model or plan")
        result = self.model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"checkpoint has tensors this model does not: {result.unexpected_keys[:5]}")

    def restore_best(self) -> None:
        """Put the best epoch's weights back (no-op when the last epoch was the best)."""
        if self.best_state is not None:
            self.load_trainable_state(self.best_state)


def predict_logits(model: FinetuneModel, loader, *, device: str = "cpu",
                   dtype: str | None = None) -> np.ndarray:
    """Logits (N, C) for a non-shuffled loader of uint8 images, in loader order."""
    dt = autocast_dtype(device, dtype)
    ctx = (torch.autocast("cuda" if str(device).startswith("cuda") else "cpu", dtype=_DTYPES[dt])
           if dt != "float32" else contextlib.nullcontext())
    model.eval()
    out = []
    with torch.no_grad():
        for pixels, _ in loader:
            x = model.prepare_input(pixels.to(device))
            with ctx:
                out.append(model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.head.out_features), np.float32)


def fit_local(model: FinetuneModel, cfg: FinetuneConfig, train_set, val_set=None, *,
              device: str = "cpu", num_workers: int = 0,
              on_epoch: Callable[[Finetuner, dict[str, Any]], None] | None = None) -> Finetuner:
    """Single-process fine-tune (no Ray): epochs with early stopping, best weights restored."""
    from pipeline.heads.base import torch_threads

    with torch_threads(cfg.num_threads):
        return _fit_local(model, cfg, train_set, val_set, device=device, num_workers=num_workers,
                          on_epoch=on_epoch)


def _fit_local(model, cfg, train_set, val_set, *, device, num_workers, on_epoch) -> Finetuner:
    from .data import eval_loader, steps_per_epoch, train_loader

    torch.manual_seed(cfg.seed)
    ft = Finetuner(model, cfg, steps_per_epoch=steps_per_epoch(len(train_set), cfg.batch_size),
                   device=device)
    ft.attempts.append({"attempt": 0, "start_epoch": 0})
    val = eval_loader(val_set, batch_size=cfg.batch_size * 2) if val_set is not None and len(val_set) else None
    while not ft.done:
        torch.manual_seed(epoch_seed(cfg.seed, ft.epoch))
        tm = ft.train_epoch(train_loader(train_set, batch_size=cfg.batch_size, epoch=ft.epoch,
                                         seed=cfg.seed, num_workers=num_workers))
        row = ft.end_epoch(tm, ft.evaluate(val) if val is not None else {})
        if on_epoch is not None:
            on_epoch(ft, row)
    ft.restore_best()
    return ft
