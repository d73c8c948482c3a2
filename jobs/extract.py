"""Feature extraction on Ray Data: only images not yet in the feature store are computed.

Flow per backbone: content keys (sha256) → feature store lookup → Ray Data over the missing files →
an actor pool of `pipeline.extraction.ChunkEmbedder` (decode in threads, overlapped with the
forward pass; ONNX Runtime for CNNs on CPU, bf16 on GPU) → shards written atomically by the
driver as results stream back. Runs on the embedded local Ray, or on a cluster through
RAY_ADDRESS / `ray job submit -- python -m jobs.extract ...` unchanged.

Two worker layouts:
- `fused` (default): each actor decodes its own chunk in threads and runs the model — one Ray
  hop per chunk of files, the layout that wins on small nodes where decode and model share cores.
- `tasks`: decoding runs in separate Ray tasks feeding uint8 tensors to the model actors — the
  textbook layout, better when model actors sit on GPUs and decode scales over CPU-only nodes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from feature_store import FeatureStore
from pipeline.backbones import BackboneSpec, get_spec, load_backbone
from pipeline.devices import default_dtype
from pipeline.images import DEFAULT_MAX_PIXELS


@dataclass
class ExtractStats:
    """What one backbone's extraction did; plain data for the CLI, MLflow and benchmarks."""

    backbone: str
    fingerprint: str
    engine: str
    requested: int
    cached: int
    extracted: int
    failed: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    executor: str = "ray"  # "ray" (Ray Data actor pool) or "inline" (small delta, in process)

    @property
    def images_per_s(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["images_per_s"] = round(self.images_per_s, 2)
        return d


class _EmbedFilesActor:
    """Ray Data callable class: a chunk of file paths → embeddings (decode + model in one actor)."""

    def __init__(self, spec: BackboneSpec, engine: str, device: str, micro_batch: int,
                 threads: int, max_pixels: int) -> None:
        from pipeline.backbones import load_backbone
        from pipeline.extraction import ChunkEmbedder

        backbone = load_backbone(spec, device=device, engine=engine, intra_op_num_threads=threads)
        self.embedder = ChunkEmbedder(
            backbone, micro_batch=micro_batch, decode_threads=threads, max_pixels=max_pixels
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self.embedder([str(p) for p in batch["path"]])
        errors = np.array([""] * len(batch["path"]), dtype=object)
        for i, code, msg in result.failed:
            errors[i] = f"{code}: {msg}"
        return {"key": batch["key"], "embedding": result.embeddings, "ok": result.ok,
                "error": errors}


def _decode_batch(batch: dict[str, np.ndarray], spec: BackboneSpec, max_pixels: int):
    """Ray Data task for the `tasks` layout: files → uint8 (N,3,S,S) pixels."""
    from pipeline.images import ImageValidationError
    from pipeline.preprocess import load_pixels

    size = int(spec.input_size)
    pixels = np.zeros((len(batch["path"]), 3, size, size), dtype=np.uint8)
    errors = np.array([""] * len(batch["path"]), dtype=object)
    for i, p in enumerate(batch["path"]):
        try:
            pixels[i] = load_pixels(str(p), spec, max_pixels=max_pixels)
        except (ImageValidationError, OSError) as exc:
            errors[i] = f"{getattr(exc, 'code', 'unreadable')}: {exc}"
    return {"key": batch["key"], "pixels": pixels, "error": errors}


class _EmbedPixelsActor:
    """Ray Data callable class for the `tasks` layout: uint8 pixels → embeddings."""

    def __init__(self, spec: BackboneSpec, engine: str, device: str, threads: int) -> None:
        from pipeline.backbones import load_backbone

        self.backbone = load_backbone(spec, device=device, engine=engine, intra_op_num_threads=threads)
        self.dim = int(spec.embed_dim)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        emb = np.zeros((len(ok), self.dim), dtype=np.float32)
        if ok.any():
            emb[ok] = self.backbone.embed(batch["pixels"][ok])
        return {"key": batch["key"], "embedding": emb, "ok": ok, "error": batch["error"]}


def resolve_engine(spec: BackboneSpec, *, device: str, engine: str = "auto"):
    """The engine workers will run, decided before the fingerprint is computed.

    Returns (engine, backbone loaded here or None). `auto` is ONNX Runtime on CPU when the
    backbone exports (the export is cached on disk by fingerprint, so workers find it ready),
    eager torch otherwise and on GPUs. Workers get the resolved engine explicitly, so a worker can
    never silently compute different numbers.
    """
    if engine != "auto":
        return engine, None
    if device != "cpu":
        return "torch", None
    import logging

    from pipeline.backbones import WeightsUnavailableError, load_backbone

    try:
        return "onnx", load_backbone(spec, engine="onnx")
    except WeightsUnavailableError:
        raise
    except Exception as exc:  # noqa: BLE001 - any export failure means eager torch
        logging.getLogger(__name__).warning("%s: no ONNX export (%s); extracting with eager torch",
                                            spec.name, exc)
        return "torch", None


def _inline_batches(backbone, items, *, micro_batch: int, chunk_size: int, max_pixels: int):
    """The same stream `_run_pipeline` yields, computed in this process (small deltas)."""
    from pipeline.extraction import ChunkEmbedder

    embedder = ChunkEmbedder(backbone, micro_batch=micro_batch, max_pixels=max_pixels)
    try:
        for i in range(0, len(items), chunk_size):
            chunk = items[i:i + chunk_size]
            res = embedder([p for _, p in chunk])
            errors = np.array([""] * len(chunk), dtype=object)
            for j, code, msg in res.failed:
                errors[j] = f"{code}: {msg}"
            yield {"key": np.array([k for k, _ in chunk], dtype=object), "embedding": res.embeddings,
                   "ok": res.ok, "error": errors}
    finally:
        embedder.close()


def extract_features(
    files: Sequence[tuple[str, str]],
    backbones: Iterable[str | BackboneSpec],
    *,
    store: FeatureStore,
    engine: str = "auto",
    layout: str = "fused",
    micro_batch: int = 32,
    chunk_size: int = 256,
    num_workers: int | None = None,
    cpus_per_worker: int | None = None,
    shard_rows: int = 2048,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    inline_max: int = 256,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> list[ExtractStats]:
    """Embed `files` — (sha256 key, path) pairs — with each backbone; returns one stats row each.

    Only keys missing from `store` for the backbone's fingerprint are computed. Results are written
    in shards of about `shard_rows` as they stream back, so a killed job keeps what it finished.
    On a single CPU node, a delta of at most `inline_max` images (a new dataset version) is
    embedded in this process with the model already loaded to resolve the engine: starting an
    actor would cost more than the work. Everything else goes through Ray Data.
    """
    from jobs.ray_runtime import cluster_has_gpu, ensure_ray

    if layout not in ("fused", "tasks"):
        raise ValueError(f"layout must be 'fused' or 'tasks', got {layout!r}")
    import ray

    resources = ensure_ray()
    use_gpu = cluster_has_gpu()
    device = "cuda" if use_gpu else "cpu"
    single_node = len(_alive_nodes()) == 1
    by_key: dict[str, str] = {}
    for key, path in files:
        by_key.setdefault(key, str(path))
    stats: list[ExtractStats] = []
    for item in backbones:
        spec = get_spec(item) if isinstance(item, str) else item
        t0 = time.perf_counter()
        eng, local_backbone = resolve_engine(spec, device=device, engine=engine)
        fp = spec.fingerprint_for(eng, default_dtype(device) if eng == "torch" else "float32")
        missing = store.missing(fp, list(by_key))
        row = ExtractStats(backbone=spec.name, fingerprint=fp, engine=eng, requested=len(by_key),
                           cached=len(by_key) - len(missing), extracted=0)
        stats.append(row)
        if on_progress:
            on_progress(spec.name, 0, len(missing))
        if not missing:
            row.seconds = time.perf_counter() - t0
            continue
        items = [(k, by_key[k]) for k in missing]
        if single_node and not use_gpu and len(missing) <= inline_max:
            row.executor = "inline"
            backbone = local_backbone or load_backbone(spec, device=device, engine=eng)
            results = _inline_batches(backbone, items, micro_batch=micro_batch,
                                      chunk_size=chunk_size, max_pixels=max_pixels)
        else:
            total_cpus = int(resources.get("CPU", 1))
            # an actor must fit on ONE node: size workers by the biggest node, not the cluster
            cpw = cpus_per_worker or max(1, min(_largest_node_cpus(), 8))
            workers = num_workers or (int(resources.get("GPU", 1)) if use_gpu
                                      else max(1, total_cpus // cpw))
            results = _run_pipeline(
                spec, eng, device, items, layout=layout, micro_batch=micro_batch,
                chunk_size=chunk_size, workers=workers, cpus=cpw, use_gpu=use_gpu,
                max_pixels=max_pixels,
            )
        meta = {"backbone": spec.name, "engine": eng, "dim": int(spec.embed_dim),
                "dtype": "float32", "device": device}
        keys_buf: list[str] = []
        emb_buf: list[np.ndarray] = []
        n_buf = 0
        for batch in results:
            ok = np.asarray(batch["ok"], dtype=bool)
            for key, err in zip(batch["key"][~ok], batch["error"][~ok]):
                row.failed.append({"key": str(key), "path": by_key[str(key)], "reason": str(err)})
            if ok.any():
                keys_buf.extend(str(k) for k in batch["key"][ok])
                emb_buf.append(np.asarray(batch["embedding"], dtype=np.float32)[ok])
                n_buf += int(ok.sum())
            if n_buf >= shard_rows:
                store.put(fp, keys_buf, np.concatenate(emb_buf), meta=meta)
                row.extracted += n_buf
                keys_buf, emb_buf, n_buf = [], [], 0
            if on_progress:
                on_progress(spec.name, row.extracted + n_buf + len(row.failed), len(missing))
        if n_buf:
            store.put(fp, keys_buf, np.concatenate(emb_buf), meta=meta)
            row.extracted += n_buf
        row.seconds = time.perf_counter() - t0
    return stats


def _alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _largest_node_cpus() -> int:
    """CPUs of the biggest alive node (an actor's CPUs must all come from one node)."""
    return max((int(n.get("Resources", {}).get("CPU", 0)) for n in _alive_nodes()), default=1) or 1


def _run_pipeline(spec, engine, device, items, *, layout, micro_batch, chunk_size, workers,
                  cpus, use_gpu, max_pixels):
    import ray.data

    rows = [{"key": k, "path": p} for k, p in items]
    chunk = max(micro_batch, min(chunk_size, math.ceil(len(rows) / workers)))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / chunk)))
    gpu = {"num_gpus": 1} if use_gpu else {}
    if layout == "fused":
        ds = ds.map_batches(
            _EmbedFilesActor,
            fn_constructor_kwargs=dict(spec=spec, engine=engine, device=device,
                                       micro_batch=micro_batch, threads=cpus,
                                       max_pixels=max_pixels),
            batch_size=chunk, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus,
            batch_format="numpy",
            zero_copy_batch=True, **gpu,
        )
    else:
        ds = ds.map_batches(
            _decode_batch, fn_kwargs=dict(spec=spec, max_pixels=max_pixels),
            batch_size=micro_batch, num_cpus=0.5, batch_format="numpy",
        ).map_batches(
            _EmbedPixelsActor,
            fn_constructor_kwargs=dict(spec=spec, engine=engine, device=device,
                                       threads=max(1, cpus - 1)),
            batch_size=micro_batch, compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=max(0.5, cpus - 1) if not use_gpu else 1,
            batch_format="numpy", **gpu,
        )
    return ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
