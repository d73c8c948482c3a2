"""Backbone latencies measured on this machine, kept beside the feature store.

A backbone's latency depends on its weights and preprocessing (the feature set's fingerprint),
the engine and its version, the device and the machine, not on the dataset: a second sweep on
the same machine reuses the measurement instead of spending seconds of both cores on it before
any head can start. An entry is used only when all of those match and it is younger than
`MAX_AGE_S`; the sweep records where each latency came from (``"measured_at"``, ``"cached"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from fsspec.implementations.local import LocalFileSystem

from feature_store.shards import write_json_atomic
from pipeline.latency import cpu_flags, cpu_model
from pipeline.sweep.plan import FeatureSetRef

#: a cached measurement older than this is measured again (a week)
MAX_AGE_S = 7 * 24 * 3600
#: a measurement is kept only when its repeats agree: interquartile range / median of a batch
#: size at most this (one taken on a machine busy with other work spreads far more)
MAX_KEPT_SPREAD = 0.5
#: the libraries whose version changes what an engine runs
ENGINE_PACKAGES = ("torch", "onnxruntime", "openvino")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_key() -> dict[str, Any]:
    """What makes two latency measurements comparable, apart from the backbone itself."""
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "cpu_flags": hashlib.sha256(" ".join(cpu_flags()).encode()).hexdigest()[:16],
            **{p: _version(p) for p in ENGINE_PACKAGES}}


class LatencyCache:
    """``get(ref, device)`` / ``put(ref, device, latency)`` of one JSON file per key under
    `directory` (written atomically; an unreadable or foreign file is a miss)."""

    def __init__(self, directory: str | os.PathLike, *, max_age_s: float = MAX_AGE_S):
        self.directory = Path(directory)
        self.max_age_s = float(max_age_s)

    def _key(self, ref: FeatureSetRef, device: str) -> dict[str, Any]:
        return {"fingerprint": ref.fingerprint, "engine": ref.engine, "dtype": ref.dtype,
                "device": str(device), **machine_key()}

    def _path(self, key: Mapping[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.directory / f"{digest}.json"

    def get(self, ref: FeatureSetRef, device: str) -> dict[str, Any] | None:
        key = self._key(ref, device)
        try:
            entry = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if entry.get("key") != key or time.time() - float(entry.get("measured_at", 0)) > self.max_age_s:
            return None
        return {**entry["latency"], "cached": True, "measured_at": entry["measured_at"]}

    def put(self, ref: FeatureSetRef, device: str, latency: Mapping[str, Any]) -> bool:
        """Keep `latency` if it is stable (see `MAX_KEPT_SPREAD`); returns whether it was kept."""
        if not stable(latency):
            return False
        key = self._key(ref, device)
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"key": key, "measured_at": time.time(), "backbone": ref.backbone,
                 "latency": json.loads(json.dumps(dict(latency), default=str))}
        write_json_atomic(LocalFileSystem(), str(path), entry)
        return True


def stable(latency: Mapping[str, Any]) -> bool:
    """Whether every batch size's repeats spread by at most `MAX_KEPT_SPREAD` of their median."""
    pairs = [(latency.get(k), latency.get(k.replace("latency_ms_", "latency_noise_ms_")))
             for k in latency if k.startswith("latency_ms_")]
    return bool(pairs) and all(
        isinstance(m, (int, float)) and isinstance(n, (int, float)) and m > 0
        and n <= MAX_KEPT_SPREAD * m for m, n in pairs)
