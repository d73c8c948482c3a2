"""`FinetuneConfig`: the frozen recipe of one fine-tune (LoRA or full), plain data both ways."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipeline.fields import reject_unknown

__all__ = ["FinetuneConfig", "METHODS", "MONITORS"]

METHODS = ("lora", "full")
#: early-stopping / best-epoch criteria (ties on accuracy are broken by the lower val loss)
MONITORS = ("val_balanced_accuracy", "val_accuracy", "val_loss")


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune a backbone + the head initialised from its linear probe.

    method: "lora" (PEFT LoRA adapters; on CNNs where no layer takes LoRA, the last stages are
        unfrozen instead and the result says so) or "full" (every parameter trains).
    epochs, batch_size: per-worker batch size; the global batch is batch_size * workers.
    lr: peak learning rate of the backbone's trainable parameters (adapters, unfrozen stages);
        head_lr: of the head (None = lr). AdamW, linear warm-up over `warmup_epochs`, then
        cosine decay to `min_lr_ratio * lr`, stepped per optimiser step.
    weight_decay: AdamW decay on matrices / kernels (biases, norms and LoRA vectors: none).
    label_smoothing: epsilon of the cross-entropy (works with MixUp / CutMix soft targets).
    mixup_alpha, cutmix_alpha: > 0 turns MixUp / CutMix on (both on: one of them per batch);
        mix_prob: share of batches mixed.
    scale, ratio, hflip: RandomResizedCrop area / aspect ranges and horizontal flips.
    input_size: train and serve at this size (None = the spec's); the merged spec records it.
    lora_r, lora_alpha, lora_dropout: the adapters; target_modules: explicit module names
        (None = per family: attention projections on ViTs, 1x1 / dense convs of the last
        `cnn_last_stages` stages + the conv head on CNNs); cnn_lora=False skips conv LoRA and
        unfreezes the last stages directly.
    freeze_norm: keep normalisation layers (BatchNorm statistics and affine) frozen; None = frozen
        for LoRA / unfrozen stages (so the adapter alone reproduces the model), trained for "full".
    patience, min_delta, monitor: early stopping on validation (patience epochs without
        improvement); the best epoch's weights are the ones saved.
    grad_clip: max global grad norm (None = off). dtype: None = bfloat16 autocast on CUDA,
        float32 on CPU. seed: every random choice (init of adapters, shuffling, augmentation).
    num_threads: torch intra-op threads per worker (None = leave torch's setting).
    """

    method: str = "lora"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    head_lr: float | None = None
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    input_size: int | None = None
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    cnn_last_stages: int = 2
    cnn_lora: bool = True
    freeze_norm: bool | None = None
    patience: int = 3
    min_delta: float = 0.0
    monitor: str = "val_balanced_accuracy"
    grad_clip: float | None = 1.0
    dtype: str | None = None
    seed: int = 0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {MONITORS}, got {self.monitor!r}")
        for name in ("epochs", "batch_size", "lora_r", "cnn_last_stages"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.lr <= 0 or (self.head_lr is not None and self.head_lr <= 0):
            raise ValueError(f"learning rates must be > 0, got lr={self.lr}, head_lr={self.head_lr}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0 or not 0.0 <= self.mix_prob <= 1.0:
            raise ValueError("mixup_alpha / cutmix_alpha must be >= 0 and mix_prob in [0, 1]")
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max <= 1, got {self.scale}")
        if self.input_size is not None and int(self.input_size) < 8:
            raise ValueError(f"input_size must be >= 8 (or None), got {self.input_size}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be None, 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        object.__setattr__(self, "ratio", tuple(float(v) for v in self.ratio))
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                object.__setattr__(self, "target_modules", (self.target_modules,))
            else:
                object.__setattr__(self, "target_modules", tuple(str(t) for t in self.target_modules))

    @property
    def norm_frozen(self) -> bool:
        return self.method != "full" if self.freeze_norm is None else bool(self.freeze_norm)

    @property
    def mixing(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0

    def replace(self, **changes: Any) -> "FinetuneConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("scale", "ratio", "target_modules"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetuneConfig":
        reject_unknown(cls, data)
        d = dict(data)
        for k in ("scale", "ratio", "target_modules"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)
