"""Image files -> uint8 tensors for fine-tuning, sharded per worker (no Ray here).

Evaluation images go through `pipeline.preprocess.load_pixels(path, spec)` — exactly what
extraction and serving do. Training images are decoded once at the resize size the spec implies
(``floor(S / crop_pct)``, no crop) and kept in memory while that stays under ``cache_bytes``;
`TrainTransform` then draws a random crop + flip from them every epoch.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from pipeline.images import DEFAULT_MAX_PIXELS

__all__ = ["ImageFileDataset", "train_decode_spec", "train_loader", "eval_loader", "shard_indices",
           "steps_per_epoch"]


def train_decode_spec(spec: Any) -> Any:
    """The spec training images are decoded at: the resize size, no centre crop."""
    size = max(int(spec.input_size), int(math.floor(spec.input_size / spec.crop_pct)))
    return spec.replace(input_size=size, crop_pct=1.0)


class ImageFileDataset(Dataset):
    """(path, class index) pairs -> (uint8 (3, S, S) tensor, class index)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], spec: Any, *,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 cache_bytes: int = 512 << 20, max_pixels: int = DEFAULT_MAX_PIXELS):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.spec = spec
        self.transform = transform
        self.max_pixels = int(max_pixels)
        per_image = 3 * int(spec.input_size) ** 2
        self._cache: dict[int, np.ndarray] | None = {} if per_image * len(self.paths) <= cache_bytes else None

    def __len__(self) -> int:
        return len(self.paths)

    def _pixels(self, i: int) -> np.ndarray:
        from pipeline.preprocess import load_pixels

        if self._cache is not None and i in self._cache:
            return self._cache[i]
        px = load_pixels(self.paths[i], self.spec, max_pixels=self.max_pixels)
        if self._cache is not None:
            self._cache[i] = px
        return px

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(self._pixels(int(i)))
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Every index exactly once across ranks (no padding, unlike DistributedSampler)."""
    return list(range(int(rank), int(n), max(1, int(world_size))))


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Optimiser steps per epoch on each rank, as `train_loader` batches them."""
    per_rank = math.ceil(int(n) / max(1, int(world_size)))
    return per_rank // int(batch_size) if per_rank > batch_size else 1


def train_loader(dataset: Dataset, *, batch_size: int, epoch: int, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Shuffled (seed, epoch), sharded over ranks; drops a last partial batch when it is not the
    only batch (a batch of one breaks BatchNorm in training mode)."""
    sampler = DistributedSampler(dataset, num_replicas=max(1, world_size), rank=rank, shuffle=True,
                                 seed=int(seed), drop_last=False)
    sampler.set_epoch(int(epoch))
    per_rank = math.ceil(len(dataset) / max(1, world_size))
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) * 101 + int(rank))
    return DataLoader(dataset, batch_size=int(batch_size), sampler=sampler, num_workers=num_workers,
                      drop_last=per_rank > batch_size, generator=g, pin_memory=pin_memory,
                      persistent_workers=False)


def eval_loader(dataset: Dataset, *, batch_size: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    return DataLoader(Subset(dataset, shard_indices(len(dataset), rank, world_size)),
                      batch_size=int(batch_size), shuffle=False, num_workers=num_workers,
                      pin_memory=pin_memory)
