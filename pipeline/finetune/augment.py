"""Training augmentations: RandomResizedCrop + horizontal flip on uint8 tensors (one image at a
time, in the data loader), MixUp / CutMix on normalised float batches (in the train step)."""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["TrainTransform", "BatchMixer", "one_hot"]

_MODES = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST", "lanczos": "LANCZOS",
          "box": "BOX", "hamming": "HAMMING"}


class TrainTransform:
    """uint8 (3, H, W) tensor -> uint8 (3, size, size): random area/aspect crop, resized with the
    backbone's interpolation (antialiased), then a random horizontal flip."""

    def __init__(self, size: int, *, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), hflip: bool = True,
                 interpolation: str = "bicubic"):
        from torchvision.transforms import InterpolationMode, v2

        mode = getattr(InterpolationMode, _MODES.get(interpolation, "BICUBIC"))
        if mode not in (InterpolationMode.BICUBIC, InterpolationMode.BILINEAR, InterpolationMode.NEAREST):
            mode = InterpolationMode.BICUBIC  # tensor resize supports these three
        ops = [v2.RandomResizedCrop(int(size), scale=tuple(scale), ratio=tuple(ratio),
                                    interpolation=mode, antialias=True)]
        if hflip:
            ops.append(v2.RandomHorizontalFlip())
        self.transform = v2.Compose(ops)
        self.size = int(size)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if img.dtype != torch.uint8 or img.ndim != 3:
            raise TypeError(f"TrainTransform expects a uint8 (3, H, W) tensor, got {img.dtype} {tuple(img.shape)}")
        return self.transform(img)


def one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(y.long(), num_classes).float()


class BatchMixer:
    """MixUp (Zhang et al.) and CutMix (Yun et al.) with soft targets, seeded.

    With both alphas > 0 each mixed batch uses one of them at random. `prob` is the share of
    batches mixed. ``__call__(x, y) -> (x_mixed, soft_targets (N, C))``.
    """

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 prob: float = 1.0, seed: int = 0):
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("BatchMixer needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.num_classes = int(num_classes)
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target = one_hot(y, self.num_classes).to(x.device)
        if x.shape[0] < 2 or self.rng.random() >= self.prob:
            return x, target
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or self.rng.random() < 0.5)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(self.rng.beta(alpha, alpha))
        perm = torch.from_numpy(self.rng.permutation(x.shape[0])).to(x.device)
        if use_cutmix:
            h, w = x.shape[-2:]
            cut = math.sqrt(1.0 - lam)
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = int(self.rng.integers(h)), int(self.rng.integers(w))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
        else:
            x = lam * x + (1.0 - lam) * x[perm]
        return x, lam * target + (1.0 - lam) * target[perm]
