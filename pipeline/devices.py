"""Device / thread helpers shared by extraction and serving. torch is imported only when needed."""
from __future__ import annotations

import os

__all__ = ["resolve_device", "default_dtype", "cpu_count"]


def resolve_device(device: str | None = "cpu") -> str:
    """'auto' -> 'cuda' when a CUDA GPU is visible, else 'cpu'. 'cuda' without a GPU is an error."""
    d = (device or "cpu").strip().lower()
    if d == "cpu":
        return "cpu"
    if d == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if d.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but no CUDA GPU is visible: use device='cpu' or 'auto'")
        return d
    raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")


def default_dtype(device: str) -> str:
    """float32 on CPU, bfloat16 (autocast) on CUDA."""
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def cpu_count() -> int:
    """CPUs this process may use (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)
