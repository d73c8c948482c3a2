"""`TorchBackbone`: the shared eager-PyTorch engine behind every adapter.

An adapter only builds a *feature module* (normalised float (N, 3, S, S) -> (N, D)) and, where the
checkpoint has one, a *classifier module* (same input -> logits); this class does the rest:
uint8 -> float, mean/std normalisation, channels_last for CNNs, inference mode, bf16 autocast on
CUDA, chunking, and numpy output.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .base import Backbone, as_uint8_batch
from .spec import BackboneSpec

__all__ = ["TorchBackbone", "Uint8Normalize", "FusedUint8Model", "resolve_dtype", "count_params_m"]

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(device: str, dtype: str | None) -> str:
    """float32 on CPU; bfloat16 autocast on CUDA unless told otherwise."""
    if dtype is None:
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_TORCH_DTYPES)} (or None for the device default), got {dtype!r}")
    return dtype


def count_params_m(module: nn.Module, exclude: nn.Module | None = None) -> float:
    skip = {id(p) for p in exclude.parameters()} if exclude is not None else set()
    return round(sum(p.numel() for p in module.parameters() if id(p) not in skip) / 1e6, 6)


class Uint8Normalize(nn.Module):
    """uint8 (or float 0..255) (N, 3, H, W) -> (x / 255 - mean) / std, as one multiply-add."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) * self.scale + self.shift


class FusedUint8Model(nn.Module):
    """uint8 pixels -> normalise -> feature module. What gets exported to ONNX."""

    def __init__(self, normalize: Uint8Normalize, features: nn.Module):
        super().__init__()
        self.normalize = normalize
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x)).to(torch.float32)


class TorchBackbone(Backbone):
    engine = "torch"

    def __init__(
        self,
        spec: BackboneSpec,
        features: nn.Module,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        classifier: nn.Module | None = None,
        channels_last: bool = False,
        text_encoder: Callable[[list[str]], torch.Tensor] | None = None,
        params_m: float | None = None,
        batch_size: int = 64,
    ):
        self.device = str(device)
        self.dtype = resolve_dtype(self.device, dtype)
        self._features = features.eval().to(self.device)
        self._classifier = classifier.eval().to(self.device) if classifier is not None else None
        self._channels_last = bool(channels_last)
        if self._channels_last:
            self._features = self._features.to(memory_format=torch.channels_last)
            if self._classifier is not None:
                self._classifier = self._classifier.to(memory_format=torch.channels_last)
        for p in self._features.parameters():
            p.requires_grad_(False)
        self._normalize = Uint8Normalize(spec.mean, spec.std).to(self.device)
        self._text_encoder = text_encoder
        self.batch_size = int(batch_size)
        embed_dim = self._probe_embed_dim(spec)
        self.spec = spec.replace(
            embed_dim=embed_dim,
            params_m=params_m if params_m is not None else count_params_m(self._features, exclude=None),
        )

    # ---------------------------------------------------------------- helpers
    def _autocast(self):
        if self.dtype == "float32":
            return contextlib.nullcontext()
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        return torch.autocast(device_type=device_type, dtype=_TORCH_DTYPES[self.dtype])

    def _to_input(self, batch: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(batch)
        if self.device != "cpu":
            t = t.to(self.device, non_blocking=True)
        x = self._normalize(t)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _run(self, module: nn.Module, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), self._autocast():
            out = module(self._to_input(batch))
        return out.float().cpu().numpy()

    def _probe_embed_dim(self, spec: BackboneSpec) -> int:
        """Real output width, from one 2-image forward pass at the spec's input size."""
        probe = np.zeros((2, 3, spec.input_size, spec.input_size), dtype=np.uint8)
        out = self._run(self._features, probe)
        if out.ndim != 2 or out.shape[0] != 2:
            raise RuntimeError(
                f"{spec.name}: the feature module returned shape {tuple(out.shape)} for 2 images, expected (2, D)"
            )
        return int(out.shape[1])

    # ---------------------------------------------------------------- contract
    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        return self._run(self._features, batch)

    @property
    def has_classifier(self) -> bool:
        return self._classifier is not None

    def classify(self, pixels: Any) -> np.ndarray:
        if self._classifier is None:
            return super().classify(pixels)
        batch = as_uint8_batch(pixels, self.spec.input_size)
        step = max(1, self.batch_size)
        parts = [self._run(self._classifier, batch[i:i + step]) for i in range(0, batch.shape[0], step)]
        return np.concatenate(parts, axis=0).astype(np.float32, copy=False)

    @property
    def supports_text(self) -> bool:
        return self._text_encoder is not None

    def text_embed(self, prompts: Sequence[str]) -> np.ndarray:
        if self._text_encoder is None:
            return super().text_embed(prompts)
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        with torch.inference_mode(), self._autocast():
            out = self._text_encoder(prompts)
        return np.ascontiguousarray(out.float().cpu().numpy(), dtype=np.float32)

    def torch_module(self) -> nn.Module:
        return self._features

    def fused_uint8_module(self) -> nn.Module:
        """uint8 (N, 3, S, S) -> (N, D) module (normalisation inside), on CPU-compatible buffers."""
        return FusedUint8Model(Uint8Normalize(self.spec.mean, self.spec.std), self._features)
