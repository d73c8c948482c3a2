"""The serving core, without Ray or HTTP: model state, hot reload, decoding, support examples.

`ServingService` holds one immutable `ServingState` (predictor + version + added-examples index).
Every request reads ``service.state`` once and uses that object to the end, so a reload or an
added example — which build a new state and swap one attribute — never changes a request in
flight. Mutations of the support examples and model swaps are serialised by one asyncio lock.

The backbone is reached through an *embedder*: ``await embedder(spec_key, uint8 pixels) ->
EmbedResult`` — the Serve backbone deployment's handle in production, `LocalEmbedder` elsewhere.
A predictor over several backbones (`Predictor.specs`) is served the same way: each image is
decoded once per distinct preprocessing, the embedder is called once per backbone, and the
embeddings are concatenated in spec order (`Backbones`).

A multi-label predictor (`pipeline.multilabel.predictor.MultiLabelPredictor`, ``task`` multilabel)
is served the same way: its support index holds label-set keys (``"cat|dog"``), so per-class
support counts split them; an added example is a set of one label, which its fallback vote
answers like any other.

Every answered request is also handed to the production monitor (`deploy.monitor`: decision
windows, drift against the predictor's reference, capture of uncertain images), which never
blocks or fails the request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import hashlib
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Awaitable, Callable, Sequence

import numpy as np

from deploy.backbone import EmbedResult, spec_key
from deploy.errors import ApiError, decode_error
from deploy.metrics import ServeMetrics
from deploy.model_source import ModelSource, ModelSourceError, ResolvedModel
from deploy.settings import ServeSettings
from deploy.support_store import CombinedSupport, Example, SupportStore, check_class_name
from pipeline.images import ImageValidationError
from pipeline.multilabel.labelsets import per_label
from pipeline.multilabel.predictor import MULTILABEL_TASK, task_of

log = logging.getLogger("tlpipe.serve")

Embedder = Callable[[str, np.ndarray], Awaitable[EmbedResult]]
_EMBED_CHUNK = 8  # images per embed call for added examples: no bigger than a traffic batch, so
# ONNX Runtime's memory arena (sized by the largest forward pass it has run) does not grow for them


class NotReady(RuntimeError):
    """No model is loaded yet (or loading failed)."""


@dataclass(frozen=True)
class ImageInput:
    data: bytes
    filename: str | None = None


@dataclass(frozen=True)
class Backbones:
    """How a predictor's embedding is made: one embedder call per spec, concatenated in order."""

    specs: tuple
    keys: tuple[str, ...]  # spec JSON per spec: what the backbone deployment loads
    groups: tuple[tuple[object, tuple[int, ...]], ...]  # (spec to decode with, specs sharing it)

    @classmethod
    def of(cls, specs: Sequence) -> "Backbones":
        from pipeline.predictor import preprocessing_groups

        return cls(tuple(specs), tuple(spec_key(s) for s in specs),
                   tuple((g, tuple(idx)) for g, idx in preprocessing_groups(specs)))

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]


@dataclass(frozen=True)
class ServingState:
    resolved: ResolvedModel
    base: object  # the Predictor as loaded (its own support index untouched)
    predictor: object  # shallow copy of `base` searching base support + added examples
    added: object | None  # SupportIndex of the added examples' embeddings (or None)
    key: str  # the first spec's JSON (the only one of a single-backbone model)
    fingerprint: str  # names the added-examples index on disk
    engine: str
    loaded_at: str
    store_token: tuple
    backbones: Backbones  # the specs, their keys and decode groups
    dims: tuple[int, ...]  # each backbone's embedding width, in spec order
    base_counts: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.resolved.label

    @property
    def task(self) -> str:
        """``multiclass`` (one label per image) or ``multilabel`` (a list of labels)."""
        return task_of(self.base)

    @property
    def added_counts(self) -> dict:
        if self.added is None or not len(self.added):
            return {}
        return dict(Counter(map(str, self.added.labels)))


def _fingerprint(spec, key: str) -> str:
    try:
        return spec.fingerprint[:32]
    except Exception:  # noqa: BLE001 - weights identity unavailable: key on the spec itself
        return hashlib.sha256(key.encode()).hexdigest()[:32]


def support_counts(predictor) -> dict[str, int]:
    """Support vectors per class of the predictor's own index; a multi-label index's label-set
    keys (``"cat|dog"``) count once for each label they hold."""
    by_key = predictor.support_class_sizes()
    return by_key if task_of(predictor) != MULTILABEL_TASK else per_label(by_key)


def backbones_fingerprint(backbones: Backbones) -> str:
    """Names the added-examples index: a single backbone keeps its own fingerprint (so serving
    state written before multi-backbone models stays valid); several hash theirs in order."""
    if len(backbones.specs) == 1:
        return _fingerprint(backbones.specs[0], backbones.keys[0])
    parts = [_fingerprint(s, k) for s, k in zip(backbones.specs, backbones.keys)]
    return hashlib.sha256(("multi:" + "|".join(parts)).encode()).hexdigest()[:32]




def decode_base64(text: str, index: int) -> bytes:
    """One base64 image (a ``data:...;base64,`` prefix allowed) or ApiError 400 bad_base64."""
    s = text.strip()
    if s.startswith("data:"):
        head, sep, s = s.partition(",")
        if not sep or ";base64" not in head:
            raise ApiError(400, "bad_base64", f"image {index}: a data: URL must be ';base64,' encoded",
                           [{"index": index}])
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "bad_base64", f"image {index} is not valid base64 ({exc}); send the file's "
                       "bytes base64-encoded (standard alphabet, with padding)", [{"index": index}]) from None


class ServingService:
    def __init__(self, settings: ServeSettings, embedder: Embedder, *, metrics: ServeMetrics | None = None,
                 decode_pool: ThreadPoolExecutor | None = None):
        if not settings.model:
            raise ValueError("no model to serve: pass model=NAME@champion (or set TLPIPE_SERVE_MODEL)")
        self.settings = settings
        self.embedder = embedder
        self.metrics = metrics or ServeMetrics()
        self.source = ModelSource.for_settings(settings)
        self.ref = self.source.ref
        self.root = settings.serve_dir(self.ref.key)
        self.store = SupportStore(self.root / "support")
        self.poll_interval_s = float(settings.poll_interval_s)
        self.last_poll_error: str | None = None
        self._state: ServingState | None = None
        # several models in one replica (deploy.models.ModelSet) share one decode pool
        self._pool = decode_pool or ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="tlpipe-decode")
        self._lock: asyncio.Lock | None = None
        self._reload_lock: asyncio.Lock | None = None
        self._poll_task: asyncio.Task | None = None
        self.monitor = self._monitor(settings)

    def _monitor(self, settings: ServeSettings):
        """The production monitor and capture writer this replica feeds (None when both are off)."""
        from deploy.capture import CaptureWriter
        from deploy.monitor import ServingMonitor

        capture = None
        url = settings.capture_url(self.ref.key)
        if url is not None:
            try:
                capture = CaptureWriter(url, max_bytes=settings.capture_max_bytes,
                                        max_age_s=settings.capture_max_age_s, sample=settings.capture_sample,
                                        queue_size=settings.capture_queue)
            except (OSError, ValueError, ImportError) as exc:
                raise ValueError(f"capture {url!r} cannot be opened ({type(exc).__name__}: {exc}); pass a "
                                 "writable folder or fsspec URL to --capture") from None
        if not settings.monitor and capture is None:
            return None
        return ServingMonitor(settings.monitor_windows_s, last=settings.monitor_last, capture=capture,
                              track=settings.monitor)

    def monitor_snapshot(self) -> dict:
        current = self._state.label if self._state is not None else None
        if self.monitor is None:
            return {"current": current, "enabled": False, "models": {}, "capture": None}
        return {"enabled": self.monitor.track, **self.monitor.snapshot(current)}

    def export_monitoring(self) -> None:
        """Set this model's monitoring gauges (the caller clears them once for all models)."""
        if self.monitor is not None:
            self.monitor.export(self.metrics, self._state.label if self._state is not None else None,
                                capture_model=self.ref.key)

    def render_metrics(self) -> bytes:
        self.metrics.monitor_clear()
        self.export_monitoring()
        return self.metrics.render()

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> ServingState:
        state = self._state
        if state is None:
            raise NotReady("no model loaded yet")
        return state

    @property
    def ready(self) -> bool:
        return self._state is not None

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _swap(self, state: ServingState) -> None:
        self._state = state  # one attribute assignment: atomic for every reader
        self.metrics.set_model(state.resolved.name, state.resolved.version)
        self.metrics.support_added.labels(model=self.ref.key).set(len(state.added) if state.added is not None else 0)

    def _with_added(self, state: ServingState, added, token: tuple) -> ServingState:
        predictor = copy.copy(state.base)
        predictor.support = CombinedSupport(state.base.support, added)
        return replace(state, predictor=predictor, added=added, store_token=token)

    async def start(self) -> ServingState:
        """Load the model (raises if it cannot) and start polling the registry."""
        resolved = await asyncio.to_thread(self.source.resolve)
        await self._load_and_swap(resolved)
        self.set_poll_interval(self.poll_interval_s)
        return self.state

    async def _load_and_swap(self, resolved: ResolvedModel) -> ServingState:
        t0 = time.perf_counter()
        predictor = await asyncio.to_thread(self.source.load, resolved, engine=self.settings.engine)
        bb = Backbones.of(getattr(predictor, "specs", None) or [predictor.spec])
        probes = await asyncio.gather(*(
            self.embedder(key, np.zeros((1, 3, s.input_size, s.input_size), np.uint8))
            for key, s in zip(bb.keys, bb.specs)))
        dims = tuple(int(p.embeddings.shape[1]) for p in probes)
        want = getattr(predictor.head, "n_features_in_", None)
        if want is not None and int(want) != sum(dims):
            gives = " + ".join(f"{n} ({d}-d)" for n, d in zip(bb.names, dims))
            raise ModelSourceError(f"{resolved.label}: the backbone{'s' if len(dims) > 1 else ''} {gives} "
                                   f"give{'' if len(dims) > 1 else 's'} {sum(dims)}-d embeddings but the head "
                                   f"expects {want}; the artifact is inconsistent, re-save the predictor")
        probe = probes[0]
        base_counts = support_counts(predictor)
        async with self.lock:
            fp = backbones_fingerprint(bb)
            added, token = await self._reconcile(bb, fp, None)
            state = ServingState(resolved=resolved, base=predictor, predictor=predictor, added=None, key=bb.keys[0],
                                 fingerprint=fp, engine=probe.engine or self.settings.engine,
                                 loaded_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 store_token=token, base_counts=base_counts, backbones=bb, dims=dims)
            state = self._with_added(state, added, token)
            self._swap(state)
        log.info("serving %s (%s) loaded in %.1fs", resolved.label, " + ".join(bb.names), time.perf_counter() - t0)
        return state

    async def refresh(self, *, force: bool = False) -> tuple[bool, str | None]:
        """Re-resolve the reference; load and swap if the version moved (or `force`).
        Also picks up support examples another replica added. Returns (changed, previous label)."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            return await self._refresh(force)

    async def _refresh(self, force: bool) -> tuple[bool, str | None]:
        resolved = await asyncio.to_thread(self.source.resolve)
        current = self._state
        if force or current is None or resolved.version != current.resolved.version:
            previous = current.label if current is not None else None
            try:
                await self._load_and_swap(resolved)
            except Exception:
                self.metrics.reloads.labels(result="error").inc()
                raise
            self.metrics.reloads.labels(result="ok").inc()
            return True, previous
        if self.store.token() != current.store_token:
            async with self.lock:
                cur = self.state
                added, token = await self._reconcile(cur.backbones, cur.fingerprint, cur.added)
                self._swap(self._with_added(cur, added, token))
        return False, current.label

    # ------------------------------------------------------------------ polling
    def set_poll_interval(self, seconds: float) -> None:
        """Change the alias poll period (0 stops polling); used by `reconfigure`."""
        self.poll_interval_s = max(0.0, float(seconds))
        if self.poll_interval_s > 0 and (self._poll_task is None or self._poll_task.done()):
            self._poll_task = asyncio.get_running_loop().create_task(self._poll_loop())

    async def _poll_loop(self) -> None:
        while self.poll_interval_s > 0:
            await asyncio.sleep(self.poll_interval_s)
            if self.poll_interval_s <= 0:
                break
            try:
                changed, previous = await self.refresh()
                self.last_poll_error = None
                if changed:
                    log.info("hot reload: %s -> %s", previous, self.state.label)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep serving the current model
                self.last_poll_error = f"{type(exc).__name__}: {exc}"
                log.warning("registry poll failed (still serving %s): %s",
                            self._state.label if self._state else None, self.last_poll_error)

    async def close(self) -> None:
        self.poll_interval_s = 0.0
        if self._poll_task is not None:
            self._poll_task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.monitor is not None and self.monitor.capture is not None:
            await asyncio.to_thread(self.monitor.capture.close)

    # ------------------------------------------------------------------ decoding
    def _prepare(self, data: bytes, spec) -> np.ndarray:
        from pipeline.preprocess import load_pixels

        return load_pixels(data, spec, max_pixels=self.settings.max_pixels)

    async def decode(self, items: Sequence[ImageInput], spec) -> np.ndarray:
        """Bytes -> uint8 (N, 3, S, S) in the decode thread pool. Undecodable -> ApiError."""
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._pool, self._prepare, it.data, spec) for it in items]
        results = await asyncio.gather(*futures, return_exceptions=True)
        for i, r in enumerate(results):
            if isinstance(r, Exception):  # whatever the decoder raised on these bytes: a 4xx
                raise decode_error(r, i, items[i].filename)
            if isinstance(r, BaseException):
                raise r
        return results[0][None] if len(results) == 1 else np.stack(results)

    async def decode_all(self, items: Sequence[ImageInput], bb: Backbones) -> list[np.ndarray]:
        """Pixels per preprocessing group of `bb` (each image decoded once per group)."""
        if len(bb.groups) == 1:
            return [await self.decode(items, bb.groups[0][0])]
        return list(await asyncio.gather(*(self.decode(items, spec) for spec, _ in bb.groups)))

    async def embed(self, bb: Backbones, pixels: Sequence[np.ndarray]) -> tuple[np.ndarray, list[EmbedResult]]:
        """(N, D) embeddings for pixels from `decode_all`: one embedder call per backbone, all at
        once, concatenated in spec order; and the embedder's results."""
        if len(bb.keys) == 1:  # the common case: no gather, no copy
            res = await self.embedder(bb.keys[0], pixels[0])
            return res.embeddings, [res]
        calls = [(i, px) for (_, idx), px in zip(bb.groups, pixels) for i in idx]
        results = await asyncio.gather(*(self.embedder(bb.keys[i], px) for i, px in calls))
        by_spec: list[EmbedResult] = [None] * len(bb.keys)  # type: ignore[list-item]
        for (i, _), res in zip(calls, results):
            by_spec[i] = res
        return np.concatenate([r.embeddings for r in by_spec], axis=1), by_spec

    # ------------------------------------------------------------------ predict
    async def predict(self, items: Sequence[ImageInput], *, top_k: int | None = None):
        """(state, predictions, timings) for the images, with the model that answered."""
        state = self.state  # read once: a concurrent swap does not affect this request
        t0 = time.perf_counter()
        pixels = await self.decode_all(items, state.backbones)
        t1 = time.perf_counter()
        embeddings, results = await self.embed(state.backbones, pixels)
        t2 = time.perf_counter()
        preds = state.predictor.predict_embeddings(embeddings, top_k=top_k or self.settings.top_k)
        t3 = time.perf_counter()
        m = self.metrics
        m.stage.labels(stage="decode").observe(t1 - t0)
        m.stage.labels(stage="embed").observe(t2 - t1)
        m.stage.labels(stage="head").observe(t3 - t2)
        m.images_per_request.observe(len(items))
        for res in results:
            if res.first:
                m.batch_size.observe(res.batch_images)
                m.batch_requests.observe(res.batch_requests)
        for p in preds:
            m.decisions.labels(decision=p.decision).inc()
        if self.monitor is not None:
            self.monitor.observe(state, items, embeddings, preds)
        return state, preds

    # ------------------------------------------------------------------ support examples
    async def _embed_chunks(self, bb: Backbones, pixels: Sequence[np.ndarray]) -> np.ndarray:
        n = len(pixels[0])
        parts = [(await self.embed(bb, [px[i:i + _EMBED_CHUNK] for px in pixels]))[0]
                 for i in range(0, n, _EMBED_CHUNK)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    async def _reconcile(self, bb: Backbones, fingerprint: str, current):
        """Bring the added-examples index in line with the log: embed what is missing, drop what
        was deleted; save a new generation if anything changed. Call with the lock held."""
        from feature_store.index import SupportIndex

        token = self.store.token()  # before reading: a later write changes it again
        live = await asyncio.to_thread(self.store.examples)
        index = current if current is not None else await asyncio.to_thread(self.store.load_index, fingerprint)
        have = set(index.ids.tolist()) if index is not None else set()
        live_ids = {e.id for e in live}
        stale = sorted(have - live_ids)
        missing = [e for e in live if e.id not in have]
        changed = False
        if stale:
            index = index.without(stale)
            changed = True
        if missing:
            loop = asyncio.get_running_loop()
            usable: list[Example] = []
            arrays: list[list[np.ndarray]] = [[] for _ in bb.groups]
            for e in missing:
                try:
                    data = self.store.image_path(e).read_bytes()
                    px = [await loop.run_in_executor(self._pool, self._prepare, data, spec) for spec, _ in bb.groups]
                except (OSError, ImageValidationError) as exc:
                    log.warning("support example %s (%s) skipped: %s", e.id, e.path, exc)
                    continue
                for group, p in zip(arrays, px):
                    group.append(p)
                usable.append(e)
            if usable:
                emb = await self._embed_chunks(bb, [np.stack(group) for group in arrays])
                if index is None:
                    index = SupportIndex(emb.shape[1])
                index = index.with_added(emb, [e.label for e in usable], [e.id for e in usable])
                changed = True
        if changed:
            await asyncio.to_thread(self.store.save_index, fingerprint, index)
        return (index if index is not None and len(index) else None), token

    async def add_examples(self, label: str, items: Sequence[ImageInput]):
        """Store, embed and add support examples of `label`; answerable at once (fallback)."""
        from feature_store.index import SupportIndex

        try:
            check_class_name(label)
        except ValueError as exc:
            raise ApiError(422, "bad_class_name", str(exc)) from None
        async with self.lock:
            cur = self.state
            pixels = await self.decode_all(items, cur.backbones)  # validate before keeping anything
            emb = await self._embed_chunks(cur.backbones, pixels)
            results = await asyncio.to_thread(self.store.add, label, [it.data for it in items], model=cur.label)
            have = set(cur.added.ids.tolist()) if cur.added is not None else set()
            rows = [i for i, (ex, dup) in enumerate(results) if not dup and ex.id not in have]
            index = cur.added
            if rows:
                index = (index if index is not None else SupportIndex(emb.shape[1])).with_added(
                    emb[rows], [label] * len(rows), [results[i][0].id for i in rows])
                await asyncio.to_thread(self.store.save_index, cur.fingerprint, index)
            index, token = await self._reconcile(cur.backbones, cur.fingerprint, index)
            state = self._with_added(cur, index, token)
            self._swap(state)
        return state, results

    async def remove_examples(self, label: str, example_id: int | None = None):
        """Remove one added example (or all of `label`'s). 404 when there is nothing to remove."""
        async with self.lock:
            cur = self.state
            mine = [e for e in await asyncio.to_thread(self.store.examples) if e.label == label]
            if example_id is not None:
                mine = [e for e in mine if e.id == int(example_id)]
            if not mine:
                what = f"example {example_id} of class {label!r}" if example_id is not None else f"class {label!r}"
                trained = " (trained classes can only change by retraining)" if label in cur.base.classes else ""
                raise ApiError(404, "not_found", f"no added {what}: only examples added through the API "
                               f"can be removed{trained}; GET /v1/classes lists them")
            gone = await asyncio.to_thread(self.store.remove, [e.id for e in mine])
            index = cur.added.without([e.id for e in gone]) if cur.added is not None else None
            if index is not None:
                await asyncio.to_thread(self.store.save_index, cur.fingerprint, index)
            index, token = await self._reconcile(cur.backbones, cur.fingerprint, index)
            state = self._with_added(cur, index, token)
            self._swap(state)
        return state, [e.id for e in gone]

    # ------------------------------------------------------------------ descriptions
    def classes(self) -> tuple[ServingState, list[dict]]:
        state = self.state
        head = state.base.classes
        added = state.added_counts
        names = list(head) + sorted((set(state.base_counts) | set(added)) - set(head))
        out = []
        for name in names:
            in_head = name in head
            support = state.base_counts.get(name, 0) + added.get(name, 0)
            out.append({"name": name, "in_head": in_head, "support_examples": support,
                        "added_examples": added.get(name, 0), "needs_retraining": not in_head and support > 0})
        return state, out

    def model_info(self) -> dict:
        s = self.state
        p = s.base
        return {
            "model": s.label, "name": s.resolved.name, "version": s.resolved.version, "served_as": self.ref.key,
            "reference": str(self.ref), "alias": self.ref.alias, "source": s.resolved.source,
            "loaded_at": s.loaded_at, "fingerprint": s.fingerprint,
            "backbone": p.spec.name, "backbones": s.backbones.names, "engine": s.engine,
            "input_size": p.spec.input_size, "embed_dim": int(sum(s.dims)),
            "head": type(p.head).__name__, "classes": p.classes, "task": s.task,
            "threshold": None if s.task == MULTILABEL_TASK else p.threshold,
            "thresholds": p.thresholds if s.task == MULTILABEL_TASK else None,
            "knn_threshold": p.knn_threshold, "knn_k": p.knn_k, "top_k": p.top_k,
            "support_size": len(p.support) if p.support is not None else 0,
            "added_examples": len(s.added) if s.added is not None else 0,
            "poll_interval_s": self.poll_interval_s, "info": p.info,
        }
