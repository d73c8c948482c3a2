"""The Ray Serve application: a FastAPI ingress and a batched backbone deployment.

::

    HTTP ──► Ingress (FastAPI, N replicas)                    ──► Backbone (@serve.batch, M replicas)
             decode + prepare in a thread pool (uint8 pixels)      concatenate requests → one embed
             head + k-NN fallback (Predictor), support store        forward → split per request
             registry alias poll → hot swap

On one CPU-only machine `run` (``tlpipe serve``) colocates the backbone in the ingress and turns on
Ray Serve's direct ingress (the ingress replica is the HTTP server: no proxy hop), which halves the
CPU spent per request on 2 cores (bench/serve.py reports it per configuration).

Several models on one endpoint (``tlpipe serve --model A@champion --model B@champion``; ``models:``
in serve.yaml): the ingress serves each under ``/v1/models/{name}/...`` (`deploy.models.ModelSet`:
own state, alias poll, support store, monitor), and requests of models on the same backbone meet
in the same `@serve.batch` queue: one forward pass for all of them, each model's head on its rows.

Start it with ``tlpipe serve --model NAME@champion`` (`run`), from Python with `build_app`, or with
``serve run deploy/serve.yaml`` (`app_builder`, arguments under ``args:``). ``deploy.app:app`` is the
same graph with every setting read from ``TLPIPE_SERVE_*`` environment variables when the replicas
start (``TLPIPE_SERVE_MODEL`` names the model).

On a GPU (``device`` setting, ``tlpipe serve --device``; auto when one is visible) the Backbone
deployment reserves ``num_gpus``, batches wider (``gpu_max_batch_size`` / ``gpu_batch_wait_timeout_s``)
and runs the torch engine in bfloat16 / float16 (`build_app`; deploy/serve-gpu.yaml).

Live-tunable ``user_config`` (YAML ``deployments[].user_config``, applied by ``reconfigure``):
``Backbone``: ``max_batch_size``, ``batch_wait_timeout_s``, ``concurrent_batches``; ``Ingress``:
``poll_interval_s`` (and the batch keys when the backbone is colocated in the ingress,
``colocate_backbone=True``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from deploy.backbone import DEFAULT_CAPACITY, BackbonePool, EmbedResult, backbone_identity
from deploy.preflight import ServeStartError, check_models, distinct_backbones, replica_failure
from pipeline.settings import state_root as resolve_state_root

BACKBONE_DEPLOYMENT = "Backbone"
INGRESS_DEPLOYMENT = "Ingress"
DEFAULT_APP_NAME = "tlpipe"
log = logging.getLogger("tlpipe.serve")
# Ray system config (environment of every Ray process, set before Ray starts): call arguments up to
# 2 MiB travel inline with the call rather than through the object store. Set by `run` for a local
# Ray; set it in the pod environment on a cluster (deploy/kuberay/rayservice.yaml).
INLINE_ARGS_ENV = {"RAY_max_direct_call_object_size": str(2 * 1024 * 1024)}
# Environment of a local Ray that `run` starts itself (never touched when joining a cluster): no
# usage-stats reporting (there is no network). Measured and NOT kept (no difference in CPU per
# request within the noise, BENCHMARKS.md serve section): Serve's "throughput optimized" replica
# flags (user code / router on the main loop, GC frozen) and turning Serve's access log off.
LOCAL_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


def direct_ingress_env(port: int, ingress_replicas: int = 1) -> dict[str, str]:
    """Environment (set before Ray starts) for Ray Serve's direct ingress on one node.

    The ingress replicas then run their own HTTP server on ``port`` (``port + i`` for replica i)
    and answer clients without the Serve proxy: one process hop, and the proxy's CPU per request
    (about as much as the rest of the request path besides the forward pass), less. Serve still
    starts a proxy on the head node (on ``http_options.port``) as a fallback route.
    """
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(int(port)),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(int(port) + max(1, int(ingress_replicas))),  # exclusive
        # no load balancer in front of a local server: nothing to drain, ports reusable at once
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


MAX_CONCURRENT_BATCHES = 4  # Serve's cap per process; `concurrent_batches` gates below it


class BackboneConfig(BaseModel):
    """``user_config`` of the Backbone deployment (live-tunable)."""

    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(16, ge=1, le=256, description="requests merged into one forward pass")
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=1.0,
                                        description="longest wait for more requests, only while a pass runs")
    # 2: while one pass runs, the next batch starts instead of queueing behind it, so one pass at a
    # time does not fall behind in bursts (BENCHMARKS.md, serving: both settings side by side).
    concurrent_batches: int = Field(2, ge=1, le=MAX_CONCURRENT_BATCHES,
                                    description="forward passes at once (each on its own engine request)")


class IngressConfig(BaseModel):
    """``user_config`` of the Ingress deployment (live-tunable). The batch keys apply when the
    backbone is colocated in the ingress (`build_app(..., colocate_backbone=True)`)."""

    model_config = ConfigDict(extra="forbid")
    poll_interval_s: float | None = Field(None, ge=0.0, description="registry alias poll period (0: off)")
    max_batch_size: int | None = Field(None, ge=1, le=256, description="colocated backbone only")
    batch_wait_timeout_s: float | None = Field(None, ge=0.0, le=1.0, description="colocated backbone only")
    concurrent_batches: int | None = Field(None, ge=1, le=MAX_CONCURRENT_BATCHES, description="colocated backbone only")


class BatchedEmbedder:
    """`@serve.batch` over a `BackbonePool`: concurrent calls -> one forward pass per batch.

    The body of the Backbone deployment, and of an ingress that hosts its backbone itself. One
    instance per process (Serve keeps one batch queue per decorated method and process).

    Busy-aware batch window: Serve forms the next batch while the current one is still running
    (it collects for ``batch_wait_timeout_s`` after the first request, then waits its turn), so a
    fixed 5 ms window gives batches of one under a steady load. Here the window is 0 while the
    backbone is idle — a lone request starts at once — and, while a forward pass is running,
    min(``batch_wait_timeout_s``, the running average forward time): requests that would wait
    anyway ride together in the next pass. ``batch_wait_timeout_s`` is thus the longest a
    request ever waits for company, and only when it could not have started sooner.

    ``concurrent_batches`` forward passes may run at once (each in its own worker thread; ORT
    sessions, OpenVINO's per-call infer requests and torch inference are thread-safe): on a CPU, two
    passes keep both cores busy through the single-threaded parts of a pass and let a burst start
    its batch without waiting for the running one.
    "Busy" above then means every slot is taken.
    """

    def __init__(self, pool: BackbonePool):
        self.pool = pool
        self.max_wait_s = 0.01
        self.forward_s = 0.0  # running average of one forward pass
        self.busy = 0
        self.concurrency = 1
        self._slots: asyncio.Semaphore | None = None  # made in the replica's event loop

    def configure(self, max_batch_size: int | None = None, batch_wait_timeout_s: float | None = None,
                  concurrent_batches: int | None = None) -> None:
        if concurrent_batches is not None and int(concurrent_batches) != self.concurrency:
            self.concurrency = int(concurrent_batches)
            self._slots = None  # passes running or waiting keep the old gate; new ones use the new size
        if max_batch_size is not None:
            self._batch.set_max_batch_size(int(max_batch_size))
        if batch_wait_timeout_s is not None:
            self.max_wait_s = float(batch_wait_timeout_s)
        self._batch.set_batch_wait_timeout_s(self._window())

    def _window(self) -> float:
        return min(self.max_wait_s, self.forward_s) if self.busy >= self.concurrency else 0.0

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0, max_concurrent_batches=MAX_CONCURRENT_BATCHES)
    async def _batch(self, keys: list[str], pixels: list[np.ndarray]) -> list[EmbedResult]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        async with self._slots:
            self.busy += 1
            self._batch.set_batch_wait_timeout_s(self._window())
            t0 = time.perf_counter()
            try:
                # the forward pass runs in a worker thread, so requests keep queueing meanwhile
                return await asyncio.to_thread(self.pool.embed_many, keys, pixels)
            finally:
                took = time.perf_counter() - t0
                self.forward_s = took if self.forward_s == 0 else 0.8 * self.forward_s + 0.2 * took
                self.busy -= 1
                self._batch.set_batch_wait_timeout_s(self._window())

    async def __call__(self, key: str, pixels: np.ndarray) -> EmbedResult:
        return await self._batch(key, pixels)

    def batching(self) -> dict:
        return {"max_batch_size": self._batch._get_max_batch_size(), "batch_wait_timeout_s": self.max_wait_s,
                "forward_ms": round(self.forward_s * 1000, 3), "loaded": self.pool.loaded(),
                "device": self.pool.device, "dtype": self.pool.dtype}


@serve.deployment(name=BACKBONE_DEPLOYMENT, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1},
                  user_config=BackboneConfig().model_dump())
class Backbone:
    """Frozen backbone(s) behind `@serve.batch`: uint8 pixels in, embeddings out.

    `device` / `dtype` as `build_app` resolved them ('cuda': Ray reserved this replica's GPU,
    ``num_gpus``); None: the ``TLPIPE_SERVE_*`` environment, read at replica start."""

    def __init__(self, engine: str | None = None, intra_op_num_threads: int | None = None,
                 capacity: int = DEFAULT_CAPACITY, device: str | None = None, dtype: str | None = None):
        if engine is None or device is None or dtype is None:
            from deploy.settings import load_settings

            env = load_settings()  # environment, read at replica start
            engine, device, dtype = engine or env.engine, device or env.device, dtype or env.dtype
        self.embedder = BatchedEmbedder(BackbonePool(engine, device=device, dtype=dtype, capacity=capacity,
                                                     intra_op_num_threads=intra_op_num_threads))

    async def reconfigure(self, config: dict | None) -> None:
        cfg = BackboneConfig.model_validate(config or {})
        self.embedder.configure(cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.concurrent_batches)

    async def embed(self, key: str, pixels: np.ndarray) -> EmbedResult:
        """One request's pixels (n, 3, S, S) for the spec whose JSON is `key`."""
        return await self.embedder(key, pixels)

    def batching(self) -> dict:
        return self.embedder.batching()


class BackboneRoutes:
    """The embedder over Backbone deployments: each spec key goes to the deployment built for it.

    One deployment per distinct backbone (`build_app`), so every model whose backbone has that
    spec sends its requests into the same `@serve.batch` queue: one forward pass per batch for
    all of them. A key no deployment was built for (a model hot-reloaded to another backbone) goes
    to the deployment holding the fewest backbones, whose pool loads it next to its own, and stays
    there; redeploying the application gives it its own deployment.
    """

    def __init__(self, handles: Sequence[DeploymentHandle], keys: Sequence[str] | None = None):
        if not handles:
            raise ValueError("no Backbone deployment handle given")
        self.handles = list(handles)
        keys = list(keys or [])
        if keys and len(keys) != len(self.handles):
            raise ValueError(f"{len(keys)} backbone keys for {len(self.handles)} Backbone deployments")
        self.route = {backbone_identity(k): i for i, k in enumerate(keys)}  # by fingerprint
        self.load = [1 if keys else 0] * len(self.handles)

    def handle_for(self, key: str) -> DeploymentHandle:
        ident = backbone_identity(key)
        i = self.route.get(ident)
        if i is None:
            i = self.route[ident] = min(range(len(self.handles)), key=self.load.__getitem__)
            self.load[i] += 1
            if len(self.route) > len(self.handles):
                log.info("backbone %s has no deployment of its own: served by deployment %d",
                         json.loads(key).get("name"), i + 1)
        return self.handles[i]

    async def __call__(self, key: str, pixels: np.ndarray) -> EmbedResult:
        return await self.handle_for(key).embed.remote(key, pixels)


@serve.deployment(name=INGRESS_DEPLOYMENT, max_ongoing_requests=128, ray_actor_options={"num_cpus": 1},
                  health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress()
class Ingress:
    """HTTP front: parsing, decoding, the heads and fallback, support examples, hot reload.

    Serves `model`, or each of `models` (``/v1/models/{name}/...``; `deploy.models.ModelSet`).
    `backbone` is the Backbone deployment's handle (or a list of them, one per distinct backbone:
    `backbone_keys` names the spec each holds), or None to host the backbone in this replica
    (`colocated`: BackbonePool arguments) — one process hop less per request, for small machines.
    Models whose backbones have the same spec share that backbone's batches either way.
    """

    async def __init__(self, backbone: DeploymentHandle | Sequence[DeploymentHandle] | None = None,
                       model: str | None = None, settings: dict[str, Any] | None = None,
                       colocated: dict[str, Any] | None = None, models: Sequence[str] | None = None,
                       backbone_keys: Sequence[str] | None = None):
        from deploy.models import ModelSet, per_model_settings
        from deploy.settings import load_settings

        overrides = dict(settings or {})
        refs = list(models or ([model] if model else []))
        if not refs:  # the argument(s), else TLPIPE_SERVE_MODEL (read here, at replica start)
            env_model = load_settings(overrides).model
            if env_model is None:
                raise ValueError("no model to serve: pass model=NAME@champion (or set TLPIPE_SERVE_MODEL)")
            refs = env_model.split()  # several, whitespace-separated, as `tlpipe serve` reads it
        overrides.pop("model", None)
        per_model = per_model_settings(refs, overrides)  # defaults < TLPIPE_SERVE_* env < arguments
        self.settings = per_model[0]
        self.local = None
        if backbone is None:
            opts = dict(colocated or {})
            batch = BackboneConfig.model_validate(opts.pop("batching", {}))
            opts.setdefault("capacity", DEFAULT_CAPACITY * len(refs))  # room for every model's backbones
            self.local = BatchedEmbedder(BackbonePool(opts.pop("engine", None) or self.settings.engine, **opts))
            self.local.configure(batch.max_batch_size, batch.batch_wait_timeout_s, batch.concurrent_batches)
            embedder = self.local
        else:
            handles = list(backbone) if isinstance(backbone, (list, tuple)) else [backbone]
            embedder = BackboneRoutes(handles, backbone_keys)
        self.models = ModelSet.build(per_model, embedder)
        await self.models.start()

    @property
    def service(self):
        """The model of a one-model app (None when several are served)."""
        return self.models.only() if self.models.single else None

    def __serve_build_asgi_app__(self):
        from deploy.api import create_api

        return create_api(self.models)

    async def reconfigure(self, config: dict | None) -> None:
        cfg = IngressConfig.model_validate(config or {})
        if cfg.poll_interval_s is not None:
            self.models.set_poll_interval(cfg.poll_interval_s)
        if self.local is not None:
            self.local.configure(cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.concurrent_batches)

    def batching(self) -> dict | None:
        return self.local.batching() if self.local is not None else None

    async def check_health(self) -> None:
        if not self.models.ready:
            raise RuntimeError("no model loaded")

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown: write the captured records still queued
        models = getattr(self, "models", None)
        if models is not None:
            models.close_captures(timeout=5.0)


# ---------------------------------------------------------------------------- builders
class AppArgs(BaseModel):
    """Arguments of `app_builder` (the ``args:`` of an application in a Serve config)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="NAME@alias, NAME/version or a predictor dir")
    models: list[str] | None = Field(None, description="several models on one endpoint (/v1/models/{name}/...), "
                                     "instead of `model`")
    tracking_uri: str | None = None
    state_root: str | None = Field(None, description="default: $TLPIPE_HOME, else ./.tlpipe")
    engine: str | None = None
    intra_op_num_threads: int | None = None
    colocate_backbone: bool = Field(False, description="run the backbone inside the ingress replicas")
    settings: dict[str, Any] = Field(default_factory=dict, description="more ServeSettings fields")


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def model_list(model: str | Sequence[str] | None) -> list[str]:
    """`model` as a list: one reference, several, or none (TLPIPE_SERVE_MODEL, read by the replica)."""
    if model is None:
        return []
    return [model] if isinstance(model, str) else [str(m) for m in model]


def build_app(model: str | Sequence[str] | None, *, tracking_uri: str | None = None, state_root: str | None = None,
              engine: str | None = None, max_batch_size: int | None = None,
              batch_wait_timeout_s: float | None = None, poll_interval_s: float | None = None,
              ingress_replicas: int | None = None, backbone_replicas: int | None = None,
              ingress_options: dict | None = None, backbone_options: dict | None = None,
              intra_op_num_threads: int | None = None, colocate_backbone: bool = False,
              concurrent_batches: int | None = None, backbone_keys: Sequence[str] | None = None,
              **settings: Any) -> Application:
    """The Serve application for `model` (see module docstring): one reference, or a list of them
    (several models on one endpoint, ``/v1/models/{name}/...``; `deploy.models`).

    Several models with a separate backbone and `backbone_keys` (the distinct backbone specs,
    `deploy.preflight.distinct_backbones`, which `run` finds when it resolves the models) get one
    Backbone deployment per distinct backbone (``Backbone``, ``Backbone-2``, ...), each batching
    the requests of every model on that backbone. Without `backbone_keys` (a Serve config: the
    builder does not reach the registry) one ``Backbone`` deployment holds every backbone and
    makes one forward pass per distinct backbone per batch. Colocated, each ingress replica's
    pool holds them all. Either way, models on the same backbone share its forward passes.

    ``colocate_backbone=True`` drops the Backbone deployment and runs the backbone (same
    `@serve.batch` batching) inside each ingress replica: one Ray call and one copy of the pixels
    less per request, which pays off on a small CPU-only machine; the batch settings then live in
    the Ingress ``user_config``.

    `settings` are more `deploy.settings.ServeSettings` fields (admin_token, max_request_bytes,
    max_images_per_request, max_pixels, decode_threads, top_k, ...). Unset ones come from the
    ``TLPIPE_SERVE_*`` environment of the replicas. `*_options` go to `Deployment.options`
    (e.g. ``{"ray_actor_options": {"num_cpus": 0.5}}``).

    The backbone's device is decided here (`device` setting, environment < argument): 'auto' is
    this machine's (`deploy.backbone.resolve_backbone_device`), 'cuda' is taken as asked (the GPUs
    may be on other nodes of the cluster). On cuda the deployment that runs the backbone (Backbone,
    or Ingress when colocated) asks Ray for ``num_gpus=gpus_per_replica``, its `@serve.batch`
    defaults are ``gpu_max_batch_size`` / ``gpu_batch_wait_timeout_s`` (explicit `max_batch_size` /
    `batch_wait_timeout_s` still win) and the backbone runs the torch engine in `dtype`.
    """
    from deploy.model_source import parse_model_ref
    from deploy.settings import ServeSettings, load_settings

    overrides: dict[str, Any] = {k: v for k, v in settings.items() if v is not None}
    if state_root is not None:
        overrides["state_root"] = _absolute(state_root)
    capture = overrides.get("capture")
    if isinstance(capture, str) and capture != "auto" and "://" not in capture:
        overrides["capture"] = _absolute(capture)  # replicas do not share the caller's cwd
    if tracking_uri is not None:
        overrides["tracking_uri"] = tracking_uri
    if engine is not None:
        overrides["engine"] = engine
    if poll_interval_s is not None:
        overrides["poll_interval_s"] = poll_interval_s
    models = []
    for text in model_list(model):
        ref = parse_model_ref(text)  # fail early, in the caller, on a malformed reference
        models.append(ref.path if ref.kind == "path" else text)
    for text in models or [None]:
        ServeSettings(model=text, **overrides)  # validate here too: errors before any replica starts
    if len(models) > 1:
        from deploy.models import model_names

        model_names(models)  # one reference per name
    many = {"models": models} if len(models) > 1 else {"model": models[0] if models else None}
    hw = load_settings({**overrides, "model": None})  # device settings: environment < arguments
    device = hw.backbone_device(require=False)
    hardware = {"device": device, "dtype": hw.dtype if device == "cuda" else "float32"}
    b_opts = dict(backbone_options or {})
    i_opts = dict(ingress_options or {})
    if backbone_replicas is not None:
        b_opts["num_replicas"] = backbone_replicas
    if ingress_replicas is not None:
        i_opts["num_replicas"] = ingress_replicas
    if device == "cuda":  # GPU batch defaults; explicit arguments still win
        max_batch_size = hw.gpu_max_batch_size if max_batch_size is None else max_batch_size
        batch_wait_timeout_s = hw.gpu_batch_wait_timeout_s if batch_wait_timeout_s is None else batch_wait_timeout_s
    batching = BackboneConfig(**{k: v for k, v in {"max_batch_size": max_batch_size,
                                                   "batch_wait_timeout_s": batch_wait_timeout_s,
                                                   "concurrent_batches": concurrent_batches}.items()
                                 if v is not None})
    ingress_config = IngressConfig(poll_interval_s=poll_interval_s)
    if colocate_backbone:
        ingress_config = ingress_config.model_copy(update=batching.model_dump())
        colocated = {"engine": engine, "intra_op_num_threads": intra_op_num_threads,
                     "batching": batching.model_dump(), **hardware}
        i_opts.setdefault("user_config", ingress_config.model_dump(exclude_none=True))
        if device == "cuda":
            i_opts = gpu_options(Ingress, i_opts, hw.gpus_per_replica, batching.max_batch_size)
        return Ingress.options(**i_opts).bind(None, settings=overrides, colocated=colocated, **many)
    b_opts.setdefault("user_config", batching.model_dump())
    if device == "cuda":
        b_opts = gpu_options(Backbone, b_opts, hw.gpus_per_replica, batching.max_batch_size)
    if poll_interval_s is not None:
        i_opts.setdefault("user_config", ingress_config.model_dump(exclude_none=True))
    if len(models) <= 1:  # one model: one Backbone deployment, whatever its backbones
        backbone = Backbone.options(**b_opts).bind(engine=engine, intra_op_num_threads=intra_op_num_threads,
                                                   **hardware)
        return Ingress.options(**i_opts).bind(backbone, settings=overrides, **many)
    if not backbone_keys:  # not resolved (a Serve config): one deployment batching every backbone
        backbone = Backbone.options(**b_opts).bind(engine=engine, intra_op_num_threads=intra_op_num_threads,
                                                   capacity=DEFAULT_CAPACITY * len(models), **hardware)
        return Ingress.options(**i_opts).bind(backbone, settings=overrides, **many)
    backbones = [Backbone.options(name=backbone_deployment_name(i), **b_opts).bind(
        engine=engine, intra_op_num_threads=intra_op_num_threads, **hardware) for i in range(len(backbone_keys))]
    return Ingress.options(**i_opts).bind(backbones, settings=overrides, backbone_keys=list(backbone_keys), **many)


def gpu_options(deployment, opts: dict, gpus: float, max_batch_size: int) -> dict:
    """`opts` for a deployment that runs the backbone on a GPU: ``num_gpus`` added to its
    ray_actor_options (the given ones, else the deployment's own; Ray then sets the replica's
    CUDA_VISIBLE_DEVICES), and room for two full batches in flight (``concurrent_batches``)."""
    actor = dict(opts.get("ray_actor_options") or deployment.ray_actor_options or {})
    actor.setdefault("num_gpus", gpus)
    ongoing = max(int(opts.get("max_ongoing_requests") or deployment.max_ongoing_requests), 2 * int(max_batch_size))
    return {**opts, "ray_actor_options": actor, "max_ongoing_requests": ongoing}


def backbone_deployment_name(i: int) -> str:
    """``Backbone`` for the first distinct backbone (a one-backbone app looks as before), then
    ``Backbone-2``, ... in the order the models name them."""
    return BACKBONE_DEPLOYMENT if i == 0 else f"{BACKBONE_DEPLOYMENT}-{i + 1}"


def app_builder(args: AppArgs) -> Application:
    """``serve run deploy.app:app_builder model=NAME@champion`` / ``import_path`` in serve.yaml."""
    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    # resolved here (the driver / Serve controller), so relative paths never depend on a replica's cwd
    state_root = str(resolve_state_root(args.state_root))
    if args.model and args.models:
        raise ValueError("give `model` or `models` in the application's args, not both")
    return build_app(args.models or args.model, tracking_uri=args.tracking_uri, state_root=state_root,
                     engine=args.engine, intra_op_num_threads=args.intra_op_num_threads,
                     colocate_backbone=args.colocate_backbone, **args.settings)


def run(model: str | Sequence[str], *, host: str = "127.0.0.1", port: int = 8000, name: str = DEFAULT_APP_NAME,
        route_prefix: str = "/", blocking: bool = True, ray_address: str | None = None,
        direct_ingress: bool | None = None, colocate_backbone: bool | None = None,
        proxy_port: int | None = None, **kwargs: Any):
    """Start (or join) Ray and Serve on host:port and deploy the app; `tlpipe serve` calls this.

    On a local Ray started here (no `ray_address` / RAY_ADDRESS, Ray not initialised yet) the
    defaults are the fast single-node ones (see BENCHMARKS.md, serve section):

    - ``direct_ingress`` (default: True for a local Ray and one ingress replica): the ingress
      replica itself listens on host:port (replica i of several on port + i; `direct_ingress_env`);
      Serve's proxy listens on `proxy_port` (default: a free port) as a fallback. Joining a
      cluster, the proxy listens on host:port as usual.
    - ``colocate_backbone`` (default: True for a local Ray whose backbone runs on the CPU): the
      backbone runs in the ingress replica (`build_app`).
    - ``device`` (a `ServeSettings` field in `kwargs`; default auto): on a local Ray, 'cuda'
      without a visible CUDA GPU is a `SettingsError` here, before Ray starts.

    `model` may be a list: several models on one endpoint (`build_app`). Every reference is
    resolved and opened here first (`deploy.preflight.check_models`): any wrong one is one error
    naming it, before Ray starts.

    Returns the ingress `DeploymentHandle` when `blocking` is False; otherwise serves until
    interrupted (Ctrl-C shuts the application down).
    """
    import ray

    from deploy.settings import load_settings
    from jobs.ray_runtime import ensure_ray

    local = not ray.is_initialized() and not (ray_address or os.environ.get("RAY_ADDRESS"))
    hw = load_settings({k: kwargs.get(k) for k in ("device", "dtype", "engine")})  # environment < arguments
    # a local Ray has this machine's devices: check them here; a cluster's GPUs may be on other nodes
    kwargs["device"] = hw.backbone_device(require=local)
    if colocate_backbone is None:
        colocate_backbone = local and kwargs["device"] == "cpu"
    models = model_list(model)
    preflight = dict(tracking_uri=kwargs.get("tracking_uri"), state_root=kwargs.get("state_root"),
                     engine=kwargs.get("engine"))
    if len(models) > 1 and not colocate_backbone:  # the deployments follow the models' backbones
        kwargs["backbone_keys"] = distinct_backbones(check_models(models, **preflight))
    application = build_app(models if len(models) > 1 else (models or [None])[0],
                            colocate_backbone=colocate_backbone, **kwargs)  # argument errors first
    replicas = int((kwargs.get("ingress_options") or {}).get("num_replicas") or kwargs.get("ingress_replicas") or 1)
    if direct_ingress is None:
        direct_ingress = local and replicas == 1  # replica i listens on port + i: one URL needs one replica
    if direct_ingress and not local:
        raise ValueError("direct_ingress=True needs the local Ray that run() starts itself (its environment "
                         "must be set before Ray starts): call run() before ray.init(), or export "
                         "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 before starting the cluster and pass direct_ingress=False")
    if models and "backbone_keys" not in kwargs:  # a wrong reference is one error here, before Ray starts
        check_models(models, **preflight)
    if local:
        # a local Ray started here: pass one request's pixels (a 224 px image is 150 KB) inline
        # in the actor call instead of through the object store (3x cheaper per request)
        for key, value in {**INLINE_ARGS_ENV, **LOCAL_RAY_ENV}.items():
            os.environ.setdefault(key, value)
        if direct_ingress:
            os.environ.update(direct_ingress_env(int(port), replicas))  # the ports must be these
    ensure_ray("local" if local else ray_address)  # never a `ray start` cluster that ignores `env`
    if direct_ingress:
        proxy_port = proxy_port or free_port(host)
        log.info("direct ingress: the app answers on http://%s:%s, Serve's proxy on port %s", host, port, proxy_port)
    serve.start(http_options={"host": host, "port": int(proxy_port if direct_ingress else port)})
    try:
        handle = serve.run(application, name=name, route_prefix=route_prefix, blocking=False)
    except Exception:
        cause = replica_failure(name)  # Serve's exception only says "Failed to update the deployments"
        if cause is None:
            raise
        try:
            serve.delete(name)
        except Exception:  # the replica's cause is what matters; a failing cleanup adds nothing
            pass
        raise ServeStartError(f"the model server did not start: {cause}") from None
    if not blocking:
        return handle
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(name)
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now."""
    import socket

    with socket.socket() as s:
        s.bind((host if host not in ("0.0.0.0", "::") else "", 0))
        return s.getsockname()[1]


app = Ingress.bind(Backbone.bind())
