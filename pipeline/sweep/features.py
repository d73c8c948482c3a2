"""Reading one feature set out of the feature store in the sweep's layout (train+val rows with
their folds, test rows), and measuring a backbone's latency on this machine."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.latency import LATENCY_BATCH_SIZES
from pipeline.sweep.latency_cache import LatencyCache
from pipeline.sweep.plan import FeatureSetRef

#: seconds of timed calls per batch size after which a backbone's measurement may stop
LATENCY_BUDGET_S = 1.0


def split_records(dataset: Any) -> dict[str, list[Any]]:
    """The dataset's records by split (train, val, test)."""
    out: dict[str, list[Any]] = {"train": [], "val": [], "test": []}
    for r in dataset.records:
        if r.split in out:
            out[r.split].append(r)
    return out


def plan_features(store: Any, ref: FeatureSetRef, splits: Mapping[str, list[Any]]
                  ) -> tuple[dict[str, list[Any]], str | None]:
    """Records of each split that have an embedding for this backbone, or why it is skipped."""
    kept: dict[str, list[Any]] = {}
    for split in ("train", "val", "test"):
        recs = splits[split]
        if not recs:
            kept[split] = []
            continue
        try:
            present = store.contains(ref.fingerprint, [r.sha256 for r in recs])
        except KeyError:
            present = np.zeros(len(recs), dtype=bool)
        kept[split] = [r for r, ok in zip(recs, present) if ok]
    if not kept["train"]:
        return kept, (f"no train embeddings in the feature store for {ref.backbone} "
                      f"(fingerprint {ref.fingerprint[:16]}): run `tlpipe extract` first")
    if not kept["test"]:
        return kept, (f"no test embeddings for {ref.backbone}: the dataset has no test split "
                      "or it was not extracted")
    return kept, None


def read_features(store: Any, ref: FeatureSetRef, kept: Mapping[str, list[Any]],
                  splits: Mapping[str, list[Any]], folds: Mapping[str, np.ndarray] | None = None
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """({X, y, ids, folds, X_test, y_test, ids_test}, {n_<split>, missing_<split>, test_records}).

    `folds` maps a train+val id to its (R,) folds (`pipeline.sweep.folds.fold_lookup`); without
    it, train rows are always trained on and val rows are the one held-out fold."""
    trval = list(kept["train"]) + list(kept["val"])
    info: dict[str, Any] = {"test_records": kept["test"]}
    for split in ("train", "val", "test"):
        info[f"n_{split}"] = len(kept[split])
        info[f"missing_{split}"] = len(splits[split]) - len(kept[split])
    ids = [r.sha256 for r in trval]
    if folds is not None:
        f = np.stack([folds[i] for i in ids], axis=1)
    else:
        f = np.asarray([[0 if r.split == "val" else -1 for r in trval]])
    data = {"X": store.get(ref.fingerprint, ids), "y": np.asarray([r.label for r in trval], dtype=str),
            "ids": ids, "folds": f,
            "X_test": store.get(ref.fingerprint, [r.sha256 for r in kept["test"]]),
            "y_test": np.asarray([r.label for r in kept["test"]], dtype=str),
            "ids_test": [r.sha256 for r in kept["test"]]}
    return data, info


def measure_backbone_latency(ref: FeatureSetRef, *, device: str = "cpu",
                             batch_sizes: Sequence[int] = LATENCY_BATCH_SIZES,
                             warmup: int = 2, repeats: int = 5) -> dict[str, Any]:
    """Median ms per image of `load_backbone(spec, engine).embed` on random uint8 pixels, on
    this machine (`device`: "cpu" or "cuda", synchronised around each timed call)."""
    from pipeline.backbones import load_backbone
    from pipeline.latency import measure_latency

    if ref.spec is None:
        raise ValueError(f"cannot measure {ref.backbone}'s latency without its spec; pass "
                         "FeatureSetRef.from_spec(spec) or backbone_latency={name: {...}}")
    kw = {"dtype": ref.dtype} if ref.engine == "torch" else {}
    backbone = load_backbone(ref.spec, device=device, engine=ref.engine, **kw)
    sync = None
    if str(device).startswith("cuda"):
        import torch

        sync = torch.cuda.synchronize
    size = int(ref.spec.input_size)
    rng = np.random.default_rng(0)
    result = measure_latency(
        backbone.embed, lambda bs: rng.integers(0, 256, size=(bs, 3, size, size), dtype=np.uint8),
        batch_sizes=batch_sizes, warmup=warmup, repeats=repeats, sync=sync,
        budget_s=LATENCY_BUDGET_S)
    result["device"] = str(device)
    if backbone.params_m is not None:
        result["params_m"] = float(backbone.params_m)
    return result


def backbone_latency(ref: FeatureSetRef, source: Any, device: str = "cpu", repeats: int = 5, *,
                     cache_dir: str | os.PathLike | None = None) -> tuple[dict[str, Any], str | None]:
    """({latency_ms_b1, latency_ms_b32, ...} or {}, reason it is missing). `source`: None to
    measure here (or reuse this machine's measurement kept in `cache_dir`, see
    `pipeline.sweep.latency_cache`), a mapping {backbone: {...}}, or a callable(ref) -> that dict."""
    try:
        if source is None:
            cache = LatencyCache(cache_dir) if cache_dir is not None else None
            lat = cache.get(ref, device) if cache is not None else None
            if lat is None:
                lat = measure_backbone_latency(ref, device=device, repeats=repeats)
                if cache is not None:
                    cache.put(ref, device, lat)
        elif callable(source):
            lat = source(ref)
        else:
            lat = source.get(ref.backbone)
            if lat is None:
                return {}, f"no latency given for {ref.backbone}"
        return dict(lat or {}), None
    except Exception as exc:  # weights missing, engine unavailable, ...
        return {}, f"backbone latency not measured: {type(exc).__name__}: {exc}"
