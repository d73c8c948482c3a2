"""Latency measurement on the running machine, and parameter counting.

Numbers from `measure_latency` describe the machine it ran on (recorded under ``"machine"``);
compare latencies only between measurements taken on the same kind of machine.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable, Iterable

import numpy as np


def _cpuinfo(field: str) -> str | None:
    """The first ``field: value`` of ``/proc/cpuinfo`` (Linux), else None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    return _cpuinfo("model name") or platform.processor() or None


def cpu_flags() -> list[str]:
    """The CPU's feature flags (``/proc/cpuinfo`` on Linux; empty elsewhere)."""
    return sorted((_cpuinfo("flags") or "").split())


def machine_info() -> dict[str, Any]:
    """Short description of the machine the measurement runs on."""
    return {"platform": platform.platform(), "machine": platform.machine(),
            "processor": cpu_model(), "cpu_count": os.cpu_count(),
            "python": platform.python_version()}


#: timed calls a batch size gets at least, whatever the time budget
MIN_REPEATS = 3
#: the batch sizes every backbone and head latency is measured at (b1: one request; b32: a batch)
LATENCY_BATCH_SIZES = (1, 32)


def measure_latency(fn: Callable[[Any], Any], make_batch: Callable[[int], Any],
                    batch_sizes: Iterable[int] = (1, 32), warmup: int = 2, repeats: int = 5,
                    *, sync: Callable[[], Any] | None = None,
                    budget_s: float | None = None) -> dict[str, Any]:
    """Median wall-clock milliseconds per image of ``fn(make_batch(bs))`` for each batch size.

    ``make_batch(bs)`` is called once per batch size, outside the timed region. ``fn`` runs
    ``warmup`` untimed times, then ``repeats`` timed times (``time.perf_counter``). For
    asynchronous engines (CUDA) pass ``sync`` (e.g. ``torch.cuda.synchronize``); it is called
    before the clock starts and before it stops. With ``budget_s``, a batch size stops repeating
    once its timed calls took that long and at least ``MIN_REPEATS`` ran (slow large batches
    would otherwise dominate the measuring time; the repeats done are in ``batches``).

    Returns ``{"latency_ms_b<bs>": median ms per image, "latency_noise_ms_b<bs>": interquartile
    range of the repeats per image, ..., "batches": [per batch size details],
    "warmup", "repeats", "machine"}``.
    """
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 for b in sizes):
        raise ValueError(f"batch_sizes must be positive integers, got {list(batch_sizes)!r}")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, "
                         f"repeats={repeats}")
    result: dict[str, Any] = {}
    details = []
    for bs in sizes:
        batch = make_batch(bs)
        for _ in range(warmup):
            fn(batch)
        if sync is not None:
            sync()
        times_ms: list[float] = []
        for _ in range(repeats):
            if (budget_s is not None and len(times_ms) >= min(MIN_REPEATS, repeats)
                    and sum(times_ms) > 1000.0 * budget_s):
                break
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            fn(batch)
            if sync is not None:
                sync()
            times_ms.append((time.perf_counter() - t0) * 1000.0)
        med = statistics.median(times_ms)
        result[f"latency_ms_b{bs}"] = med / bs
        # the spread of the repeats: a cost gap smaller than this is measurement noise
        q75, q25 = np.percentile(times_ms, [75, 25])
        result[f"latency_noise_ms_b{bs}"] = float(q75 - q25) / bs
        details.append({"batch_size": bs, "median_ms_per_image": med / bs,
                        "median_ms_per_batch": med, "min_ms_per_batch": min(times_ms),
                        "max_ms_per_batch": max(times_ms), "repeats": len(times_ms),
                        "images_per_s": (bs * 1000.0 / med) if med > 0 else None})
    result.update({"batches": details, "warmup": int(warmup), "repeats": int(repeats),
                   "machine": machine_info()})
    return result


def count_params(module: Any, *, trainable_only: bool = False) -> int:
    """Number of parameters of a torch ``nn.Module`` (shared parameters counted once)."""
    if not hasattr(module, "parameters"):
        raise TypeError(f"count_params needs an object with .parameters() (a torch nn.Module), "
                        f"got {type(module).__name__}")
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not getattr(p, "requires_grad", True)):
            continue
        seen.add(id(p))
        total += int(p.numel())
    return total
