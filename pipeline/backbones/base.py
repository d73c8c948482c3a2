"""The `Backbone` contract every engine/adapter implements, plus the errors the package raises.

``embed(uint8 (N, 3, S, S)) -> (N, D) float32``: pixels come straight from
`pipeline.preprocess.prepare` (uint8, CHW, already resized/cropped to ``spec.input_size``);
normalisation happens inside the backbone. This module imports no torch.
"""
from __future__ import annotations

import abc
from typing import Any, Sequence

import numpy as np

from .speclike import SpecLike

__all__ = ["Backbone", "WeightsUnavailableError", "UnknownBackboneError", "as_uint8_batch"]


class WeightsUnavailableError(RuntimeError):
    """The weights a spec names are not on this machine. The message names the cause and the fix."""

    def __init__(self, spec_name: str, reason: str):
        self.spec_name = spec_name
        self.reason = reason
        super().__init__(reason)


class UnknownBackboneError(KeyError, ValueError):
    """An unknown backbone name. Catchable as KeyError or ValueError; lists what exists."""

    def __init__(self, name: str, message: str):
        self.name = name
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


def as_uint8_batch(pixels: Any, input_size: int | None = None) -> np.ndarray:
    """Validate/convert pixels to a C-contiguous uint8 (N, 3, S, S) numpy array.

    Accepts a numpy array or a torch tensor (moved to CPU), (3, S, S) or (N, 3, S, S).
    """
    if hasattr(pixels, "detach") and hasattr(pixels, "cpu"):  # torch tensor, without importing torch
        pixels = pixels.detach().cpu().numpy()
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8:
        raise TypeError(
            f"embed expects uint8 pixels (N, 3, S, S) as produced by pipeline.preprocess.prepare, got dtype "
            f"{arr.dtype}; normalisation happens inside the backbone, so do not pre-normalise"
        )
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"embed expects pixels shaped (N, 3, S, S) (channels first), got {arr.shape}")
    if input_size is not None and (arr.shape[2] != input_size or arr.shape[3] != input_size):
        raise ValueError(
            f"embed expects {input_size}x{input_size} pixels for this backbone (spec.input_size), got "
            f"{arr.shape[2]}x{arr.shape[3]}: prepare them with pipeline.preprocess.prepare(img, spec)"
        )
    return np.ascontiguousarray(arr)


class Backbone(abc.ABC):
    """A loaded, frozen image backbone.

    Attributes: ``spec`` (the spec it was loaded from, with ``embed_dim``/``params_m`` set to the
    loaded model's real values), ``engine`` ("torch" | "onnx"), ``device``, ``dtype``,
    ``batch_size`` (``embed`` splits larger inputs into chunks of this many images).
    """

    spec: "SpecLike"
    engine: str = "torch"
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 64

    # ---------------------------------------------------------------- identity
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def fingerprint(self) -> str:
        """Feature-set key: the spec's fingerprint for this engine and dtype."""
        return self.spec.fingerprint_for(self.engine, self.dtype)

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def params_m(self) -> float | None:
        """Millions of parameters on the embedding path (classification head excluded)."""
        return self.spec.params_m

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    # ---------------------------------------------------------------- compute
    def embed(self, pixels: Any) -> np.ndarray:
        """uint8 (N, 3, S, S) (numpy or torch) -> (N, D) float32 numpy embeddings."""
        batch = as_uint8_batch(pixels, self.spec.input_size)
        n = batch.shape[0]
        if n == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        step = max(1, int(self.batch_size))
        parts = [self._embed_batch(batch[i:i + step]) for i in range(0, n, step)]
        out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        return np.ascontiguousarray(out, dtype=np.float32)

    __call__ = embed

    @abc.abstractmethod
    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        """One chunk: validated uint8 (n, 3, S, S) -> (n, D) float32."""

    @property
    def has_classifier(self) -> bool:
        return False

    def classify(self, pixels: Any) -> np.ndarray:
        """ImageNet (or whatever the checkpoint was trained on) logits (N, C), for models with a head."""
        raise NotImplementedError(
            f"{self.spec.name} has no classification head loaded (only backbones with num_classes > 0 do)"
        )

    @property
    def supports_text(self) -> bool:
        return False

    def text_embed(self, prompts: Sequence[str]) -> np.ndarray:
        """CLIP-family only: (N, D) float32 text embeddings in the same space as ``embed``."""
        raise NotImplementedError(f"{self.spec.name} has no text tower (only CLIP-family backbones do)")

    def torch_module(self):
        """An ``nn.Module`` mapping normalised float (N, 3, S, S) -> (N, D), for fine-tuning."""
        raise NotImplementedError(f"{type(self).__name__} ({self.engine}) has no torch module")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.spec.name!r}, engine={self.engine!r}, device={self.device!r}, "
            f"dtype={self.dtype!r}, embed_dim={self.embed_dim}, input_size={self.input_size})"
        )


def find_checkpoint(folder, names: Sequence[str], suffixes: Sequence[str]):
    """The weights file in a local model folder: the first of `names` present, else the first
    file (sorted) with one of `suffixes`, else None."""
    from pathlib import Path

    folder = Path(folder)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    for suffix in suffixes:
        hits = sorted(folder.glob(f"*{suffix}"))
        if hits:
            return hits[0]
    return None
