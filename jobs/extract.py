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
from pipeline.backbones.registry import ENGINE_CHOICES
from pipeline.devices import default_dtype
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.settings import DEFAULT_STATE_ROOT, features_root

# Images per forward pass when the caller does not say. OpenVINO's CPU plugin is fastest on small
# batches on 2 cores (see BENCHMARKS.md, extraction), and small batches let decoding of the next
# one overlap sooner; torch on a GPU wants big ones.
DEFAULT_MICRO_BATCH = {"openvino": 8, "onnx": 16, "torch": 32}
# "auto": a plain Ray actor pool for the fused layout on one CPU node, Ray Data everywhere else
RAY_EXECUTORS = ("auto", "data", "actors")


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
    # "ray-data" (Ray Data), "ray-actors" (a Ray actor pool fed directly: one CPU node, fused
    # layout) or "inline" (a small delta, in process)
    executor: str = "ray-data"

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

    Returns (engine, backbone loaded here or None). `auto` on CPU is the fastest installed graph
    runtime (OpenVINO, else ONNX Runtime) when the backbone exports (the export is cached on disk
    by fingerprint, so workers find it ready), eager torch otherwise and on GPUs. Workers get the
    resolved engine explicitly, so a worker can never silently compute different numbers.
    """
    if engine != "auto":
        return engine, None
    if device != "cpu":
        return "torch", None
    import logging

    from pipeline.backbones import WeightsUnavailableError, load_backbone
    from pipeline.backbones.registry import default_cpu_engine

    cpu_engine = default_cpu_engine()
    if cpu_engine == "torch":
        return "torch", None
    try:
        return cpu_engine, load_backbone(spec, engine=cpu_engine)
    except WeightsUnavailableError:
        raise
    except Exception as exc:  # noqa: BLE001 - any export failure means eager torch
        logging.getLogger(__name__).warning("%s: no %s graph (%s); extracting with eager torch",
                                            spec.name, cpu_engine, exc)
        return "torch", None


def prepare_int8(spec: BackboneSpec, calibration: Sequence[tuple[str, str]] | None, *, device: str,
                 engine: str = "auto", seed: int = 0):
    """An INT8 variant's calibrated spec, engine and loaded backbone: the seeded calibration sample
    names the spec (its fingerprint), the quantized model is made (or found in the cache), and
    the spec is remembered so the sweep's `get_spec(name)` finds this calibration."""
    import logging

    from pipeline.backbones.quantize import calibration_id, calibration_sample, ensure_int8
    from pipeline.backbones.registry import GRAPH_ENGINES, default_cpu_engine
    from pipeline.backbones.variants import remember

    if device != "cpu":
        raise ValueError(f"{spec.name}: INT8 variants run on CPU (openvino/onnx); this cluster extracts "
                         f"on {device}: use --precision fp32 there")
    eng = default_cpu_engine() if engine == "auto" else engine
    if eng not in GRAPH_ENGINES:
        raise ValueError(f"{spec.name}: INT8 runs on engine openvino or onnx, not {eng!r}")
    if not calibration:
        raise ValueError(f"{spec.name}: INT8 needs calibration images: pass calibration=[(sha256, path), ...] "
                         "of the training split")
    sample = calibration_sample(calibration, seed=seed)
    spec = spec.replace(calibration=calibration_id([k for k, _ in sample]))
    spec, path = ensure_int8(spec, eng, calibration_paths=[p for _, p in sample])
    remember(spec)
    logging.getLogger(__name__).info("%s: %s INT8 model %s (calibrated on %d training images)",
                                     spec.name, eng, path.name, len(sample))
    return spec, eng, load_backbone(spec, device="cpu", engine=eng)


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
    micro_batch: int | None = None,
    chunk_size: int = 256,
    num_workers: int | None = None,
    cpus_per_worker: int | None = None,
    shard_rows: int = 2048,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    inline_max: int = 256,
    on_progress: Callable[[str, int, int], None] | None = None,
    max_attempts: int = 3,
    ray_executor: str = "auto",
    calibration: Sequence[tuple[str, str]] | None = None,
    calibration_seed: int = 0,
) -> list[ExtractStats]:
    """Embed `files` — (sha256 key, path) pairs — with each backbone; returns one stats row each.

    Only keys missing from `store` for the backbone's fingerprint are computed. Results are written
    in shards of about `shard_rows` as they stream back, so a killed job keeps what it finished.
    On a single CPU node, a delta of at most `inline_max` images (a new dataset version) is
    embedded in this process with the model already loaded to resolve the engine: starting an
    actor would cost more than the work. Everything else runs on Ray (Ray starts only then): the
    fused layout on one CPU node on a plain Ray actor pool (`ray_executor="auto"`, see
    `_run_actor_pool`), the rest on Ray Data (`ray_executor="data"` forces it). A Ray system
    failure that Ray's own retries did not absorb (a node lost mid-job) reruns the images not
    stored yet, up to `max_attempts` times in all.

    INT8 variants (``NAME@int8``, see `pipeline.backbones.variants`) are quantized first, on a
    seeded sample of at most 300 of `calibration` -- (sha256, path) of the training images --
    and their stats row carries the calibrated spec's fingerprint.
    """
    if layout not in ("fused", "tasks"):
        raise ValueError(f"layout must be 'fused' or 'tasks', got {layout!r}")
    if ray_executor not in RAY_EXECUTORS:
        raise ValueError(f"ray_executor must be one of {RAY_EXECUTORS}, got {ray_executor!r}")
    if ray_executor == "actors" and layout != "fused":
        raise ValueError("ray_executor='actors' runs the fused layout (decode + model in one actor); "
                         "use layout='fused' or ray_executor='data'")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    cluster = _Cluster()
    by_key: dict[str, str] = {}
    for key, path in files:
        by_key.setdefault(key, str(path))
    stats: list[ExtractStats] = []
    for item in backbones:
        spec = get_spec(item) if isinstance(item, str) else item
        t0 = time.perf_counter()
        device = cluster.device
        if spec.precision == "int8":
            spec, eng, local_backbone = prepare_int8(spec, calibration, device=device, engine=engine,
                                                     seed=calibration_seed)
        else:
            eng, local_backbone = resolve_engine(spec, device=device, engine=engine)
        fp = spec.fingerprint_for(eng, default_dtype(device) if eng == "torch" else "float32")
        mb = micro_batch or DEFAULT_MICRO_BATCH.get(eng, 32)
        missing = store.missing(fp, list(by_key))
        row = ExtractStats(backbone=spec.name, fingerprint=fp, engine=eng, requested=len(by_key),
                           cached=len(by_key) - len(missing), extracted=0)
        stats.append(row)
        if on_progress:
            on_progress(spec.name, 0, len(missing))
        if not missing:
            row.seconds = time.perf_counter() - t0
            continue
        sink = _ShardSink(store, fp, row, by_key, shard_rows=shard_rows, total=len(missing),
                          on_progress=on_progress,
                          meta={"backbone": spec.name, "engine": eng, "dim": int(spec.embed_dim),
                                "dtype": "float32", "device": device})
        if cluster.single_cpu_node and len(missing) <= inline_max:
            row.executor = "inline"
            backbone = local_backbone or load_backbone(spec, device=device, engine=eng)
            sink.consume(_inline_batches(backbone, [(k, by_key[k]) for k in missing],
                                         micro_batch=mb, chunk_size=chunk_size,
                                         max_pixels=max_pixels))
        else:
            del local_backbone  # workers load their own copy
            _extract_on_ray(spec, eng, missing, sink, cluster, layout=layout, ray_executor=ray_executor,
                            micro_batch=mb, chunk_size=chunk_size,
                            num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                            max_pixels=max_pixels, max_attempts=max_attempts)
        row.seconds = time.perf_counter() - t0
    return stats


class _Cluster:
    """Where extraction runs, asked lazily: Ray starts only when a job needs it.

    Without RAY_ADDRESS (or with "local") and with no Ray running in this process, the machine is the
    cluster (a local Ray would see the same CPUs and GPUs), so a small delta embeds in process
    without paying Ray's start-up.
    """

    def __init__(self) -> None:
        import os

        import ray

        address = os.environ.get("RAY_ADDRESS") or ""
        self.joined = ray.is_initialized() or address not in ("", "local")
        self._gpu: bool | None = None

    def start(self) -> dict:
        from jobs.ray_runtime import ensure_ray

        resources = ensure_ray()
        self.joined = True
        return resources

    @property
    def use_gpu(self) -> bool:
        if self._gpu is None:
            if self.joined:
                from jobs.ray_runtime import cluster_has_gpu

                self.start()
                self._gpu = cluster_has_gpu()
            else:
                from pipeline.devices import resolve_device

                self._gpu = resolve_device("auto") != "cpu"
        return self._gpu

    @property
    def device(self) -> str:
        return "cuda" if self.use_gpu else "cpu"

    @property
    def single_cpu_node(self) -> bool:
        if self.use_gpu:
            return False
        return not self.joined or len(_alive_nodes()) == 1


class _ShardSink:
    """Streams result batches into the store, one atomic shard every `shard_rows` good rows."""

    def __init__(self, store, fp, row, by_key, *, shard_rows, total, on_progress, meta):
        self.store, self.fp, self.row, self.by_key = store, fp, row, by_key
        self.shard_rows, self.total, self.on_progress, self.meta = shard_rows, total, on_progress, meta
        self.failed_keys: set[str] = set()
        self.keys: list[str] = []
        self.emb: list[np.ndarray] = []
        self.n = 0

    def consume(self, results) -> None:
        """Store every good row of `results`; rows computed before the stream broke are kept."""
        try:
            self._consume(results)
        except BaseException:
            try:
                self.flush()
            except Exception as exc:  # never mask why the stream broke
                import logging

                logging.getLogger(__name__).warning(
                    "%s: could not store %d computed rows after a failure: %s",
                    self.row.backbone, self.n, exc)
            raise
        self.flush()

    def _consume(self, results) -> None:
        for batch in results:
            ok = np.asarray(batch["ok"], dtype=bool)
            for key, err in zip(batch["key"][~ok], batch["error"][~ok]):
                if str(key) not in self.failed_keys:
                    self.failed_keys.add(str(key))
                    self.row.failed.append({"key": str(key), "path": self.by_key[str(key)],
                                            "reason": str(err)})
            if ok.any():
                self.keys.extend(str(k) for k in batch["key"][ok])
                self.emb.append(np.asarray(batch["embedding"], dtype=np.float32)[ok])
                self.n += int(ok.sum())
            if self.n >= self.shard_rows:
                self.flush()
            if self.on_progress:
                self.on_progress(self.row.backbone,
                                 self.row.extracted + self.n + len(self.row.failed), self.total)

    def flush(self) -> None:
        if self.n:
            keys, emb = self.keys, np.concatenate(self.emb)
            self.keys, self.emb, self.n = [], [], 0
            new = self.store.missing(self.fp, keys)  # a retried chunk may repeat stored rows
            self.store.put(self.fp, keys, emb, meta=self.meta)
            self.row.extracted += len(set(new))


def _retryable(exc: BaseException) -> bool:
    """Ray system failures (a node or worker lost, an object lost) — not errors in our code."""
    import ray.exceptions as rex

    return isinstance(exc, rex.RayError) and not isinstance(exc, rex.RayTaskError)


def _extract_on_ray(spec, eng, missing, sink, cluster, *, layout, micro_batch, chunk_size,
                    num_workers, cpus_per_worker, max_pixels, max_attempts, ray_executor="auto"):
    """The missing images on Ray (actor pool or Ray Data, see `extract_features`); after a Ray
    system failure that Ray's own retries did not absorb (e.g. a node lost mid-job), rerun on what
    is still missing, `max_attempts` in all."""
    import logging

    log = logging.getLogger(__name__)
    todo = list(missing)
    for attempt in range(1, max_attempts + 1):
        resources = cluster.start()
        use_gpu = cluster.use_gpu
        total_cpus = int(resources.get("CPU", 1))
        # an actor must fit on ONE node: size workers by the biggest node, not the cluster
        cpw = cpus_per_worker or max(1, min(_largest_node_cpus(), 8))
        workers = num_workers or (int(resources.get("GPU", 1)) if use_gpu
                                  else max(1, total_cpus // cpw))
        actors = ray_executor == "actors" or (
            ray_executor == "auto" and layout == "fused" and not use_gpu and len(_alive_nodes()) == 1)
        sink.row.executor = "ray-actors" if actors else "ray-data"
        run = _run_actor_pool if actors else _run_pipeline
        try:
            sink.consume(run(
                spec, eng, "cuda" if use_gpu else "cpu", [(k, sink.by_key[k]) for k in todo],
                layout=layout, micro_batch=micro_batch, chunk_size=chunk_size, workers=workers,
                cpus=cpw, use_gpu=use_gpu, max_pixels=max_pixels))
            return
        except Exception as exc:
            if not _retryable(exc):
                raise
            todo = [k for k in sink.store.missing(sink.fp, todo) if k not in sink.failed_keys]
            if attempt == max_attempts:
                raise RuntimeError(
                    f"{spec.name}: extraction failed {max_attempts} times on Ray "
                    f"({type(exc).__name__}: {exc}); {len(todo)} image(s) are still missing. "
                    "What finished is stored: rerun the same command to compute only the rest, "
                    "and check the cluster's nodes (`ray status`)") from exc
            log.warning("%s: Ray lost work (%s: %s); attempt %d/%d: re-running the %d image(s) "
                        "not stored yet", spec.name, type(exc).__name__, exc, attempt + 1,
                        max_attempts, len(todo))
            if not todo:
                return


def _alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _largest_node_cpus() -> int:
    """CPUs of the biggest alive node (an actor's CPUs must all come from one node)."""
    return max((int(n.get("Resources", {}).get("CPU", 0)) for n in _alive_nodes()), default=1) or 1


def _rows_per_chunk(n: int, micro_batch: int, chunk_size: int, workers: int) -> int:
    """Rows per actor call: at most `chunk_size`, fewer so every worker gets work, >= a micro-batch."""
    return max(micro_batch, min(chunk_size, math.ceil(n / workers)))


def _run_actor_pool(spec, engine, device, items, *, layout, micro_batch, chunk_size, workers,
                    cpus, use_gpu, max_pixels, in_flight: int = 2):
    """The fused layout on a Ray actor pool fed directly: same actor class, same result stream
    as `_run_pipeline`, without Ray Data's executor.

    Why: on one CPU node Ray Data adds nothing the job needs (no shuffle, no cross-node
    locality) but costs ~1.7 s per job before the first image (its executor, a stats actor, and a
    MapWorker process that imports ray.data: measured here 1.9-2.3 s to the actor's __init__ vs
    0.3 s for a plain actor), a sixth of a 1000-image job on two cores. Each actor keeps
    `in_flight` chunks queued so it never waits for the driver. A killed actor is restarted and
    its chunks retried by Ray (max_restarts / max_task_retries); what Ray cannot absorb surfaces
    as a Ray error that `_extract_on_ray` retries on the images still missing.
    """
    import ray

    del layout, use_gpu  # fused, CPU: decided by the caller
    chunk = _rows_per_chunk(len(items), micro_batch, chunk_size, workers)
    remote = ray.remote(_EmbedFilesActor).options(num_cpus=cpus, max_restarts=3, max_task_retries=3)
    actors = [remote.remote(spec, engine, device, micro_batch, cpus, max_pixels) for _ in range(workers)]
    chunks = iter(range(0, len(items), chunk))
    pending: dict = {}

    def submit(actor) -> None:
        start = next(chunks, None)
        if start is not None:
            part = items[start:start + chunk]
            batch = {"key": np.array([k for k, _ in part], dtype=object),
                     "path": np.array([p for _, p in part], dtype=object)}
            pending[actor.__call__.remote(batch)] = actor

    try:
        for _ in range(in_flight):
            for actor in actors:
                submit(actor)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ref)
            yield ray.get(ref)
            submit(actor)
    finally:
        for ref in pending:
            ray.cancel(ref, force=False)
        for actor in actors:
            ray.kill(actor, no_restart=True)


def _run_pipeline(spec, engine, device, items, *, layout, micro_batch, chunk_size, workers,
                  cpus, use_gpu, max_pixels):
    import ray.data

    from jobs.ray_runtime import quiet_ray_data

    quiet_ray_data()

    rows = [{"key": k, "path": p} for k, p in items]
    chunk = _rows_per_chunk(len(rows), micro_batch, chunk_size, workers)
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


# ----------------------------------------------------------------------------- `python -m jobs.extract`

def _spec_arg(value: str) -> BackboneSpec:
    """A registry name, or a JSON file holding a BackboneSpec (`BackboneSpec.to_dict()`)."""
    import json
    import os

    if value.endswith(".json") and os.path.isfile(value):
        with open(value) as f:
            return BackboneSpec.from_dict(json.load(f))
    return get_spec(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Extract a dataset's features into a feature store (what `ray job submit -- python -m
    jobs.extract DATA ...` runs on a cluster). Prints one JSON line of stats per backbone."""
    import argparse
    import json

    from pipeline.archives import is_archive, unpack
    from pipeline.data import load_dataset

    ap = argparse.ArgumentParser(prog="python -m jobs.extract", description=main.__doc__)
    ap.add_argument("data", help="dataset folder, manifest or archive (as for `tlpipe validate`)")
    ap.add_argument("--backbone", "-b", action="append", required=True,
                    help="registry name, or a .json file with a BackboneSpec (repeat)")
    ap.add_argument("--root", default=DEFAULT_STATE_ROOT,
                    help="state root; features go to ROOT/features (default .tlpipe)")
    ap.add_argument("--store", default=None, help="feature store path or fsspec URL "
                    "(default $TLPIPE_FEATURES, else ROOT/features)")
    ap.add_argument("--engine", default="auto", choices=ENGINE_CHOICES)
    ap.add_argument("--layout", default="fused", choices=("fused", "tasks"))
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="images per forward pass (default: per engine, see DEFAULT_MICRO_BATCH)")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--shard-rows", type=int, default=2048,
                    help="rows per shard: a killed job loses at most this many finished rows")
    ap.add_argument("--inline-max", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    data = str(unpack(args.data)) if is_archive(args.data) else args.data
    ds = load_dataset(data, seed=args.seed)
    store = FeatureStore(args.store or features_root(args.root))
    from rich.console import Console

    from jobs.progress import StageProgress

    # progress on stderr (plain lines in a job log), the JSON stats alone on stdout
    with StageProgress(Console(stderr=True)) as progress:
        stats = extract_features([(r.sha256, r.path) for r in ds.records],
                                 [_spec_arg(b) for b in args.backbone], store=store,
                                 calibration=[(r.sha256, r.path) for r in ds.split("train")],
                                 engine=args.engine, layout=args.layout,
                                 micro_batch=args.micro_batch, chunk_size=args.chunk_size,
                                 shard_rows=args.shard_rows, inline_max=args.inline_max,
                                 on_progress=progress.extract)
    for s in stats:
        print(json.dumps(s.to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
