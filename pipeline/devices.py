"""Device / thread helpers shared by extraction and serving. torch is imported only when needed."""
from __future__ import annotations

import glob
import os
import sys

__all__ = ["resolve_device", "cuda_possible", "default_dtype", "cpu_count"]


def resolve_device(device: str | None = "cpu") -> str:
    """'auto' -> 'cuda' when a CUDA GPU is visible, else 'cpu'. 'cuda' without a GPU is an error."""
    d = (device or "cpu").strip().lower()
    if d == "cpu":
        return "cpu"
    if d == "auto":
        if not cuda_possible():
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if d.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but no CUDA GPU is visible: use device='cpu' or 'auto'")
        return d
    raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")


def cuda_possible() -> bool:
    """False when this machine certainly has no usable CUDA GPU: CUDA_VISIBLE_DEVICES hides every
    device, or (Linux) no NVIDIA driver is loaded. Answers 'auto' without importing torch
    (seconds of CPU in every process that asks); True means "ask torch"."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    if sys.platform.startswith("linux"):
        return os.path.exists("/proc/driver/nvidia") or bool(glob.glob("/dev/nvidia[0-9]*"))
    return True


def default_dtype(device: str) -> str:
    """float32 on CPU, bfloat16 (autocast) on CUDA."""
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def cpu_count() -> int:
    """CPUs this process may use (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)
