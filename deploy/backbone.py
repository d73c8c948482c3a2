"""Backbones for serving: a small pool keyed by spec, and one forward pass per batch of requests.

`BackbonePool.embed_many` is the body of the Serve backbone deployment's `@serve.batch` method:
each request brings ready uint8 pixels (n_i, 3, S, S) and the JSON of the spec they were prepared
for; requests for the same spec are concatenated into ONE `embed` call and the result is split
back. A model over several backbones sends one request per backbone, each with its own key, so
they load side by side. During a hot reload to a model with other backbones both models' specs
can be in flight, so the pool keeps the `capacity` most recently used backbones.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

log = logging.getLogger("tlpipe.serve")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # torch's names, as pipeline.backbones takes them
# enough for two models of two backbones each (a hot reload between multi-backbone models)
# without evicting one that is still in use
DEFAULT_CAPACITY = 4


@dataclass(frozen=True)
class EmbedResult:
    embeddings: np.ndarray  # (n, D) float32 for this request's images
    batch_images: int  # images in the forward pass this request rode in
    batch_requests: int  # requests merged into that forward pass
    first: bool  # this request was the first of its batch (count each batch once)
    engine: str = ""


def spec_key(spec) -> str:
    """The canonical JSON of a BackboneSpec: what requests carry to name their backbone."""
    return json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"))


class DeviceError(ValueError):
    """The device asked for is not on this machine; the message names the fix."""


def resolve_backbone_device(device: str, *, require: bool = True) -> str:
    """'cpu' or 'cuda' for a serving `device` (one of `DEVICE_CHOICES`), decided on THIS machine:
    'auto' is `pipeline.devices.resolve_device('auto')`; 'cuda' without a visible CUDA GPU is a
    `DeviceError`, unless `require` is False (an application built for a cluster whose GPUs are
    on other nodes: Ray places the replicas there)."""
    from pipeline.devices import resolve_device

    if device != "cuda" or not require:
        return "cuda" if device == "cuda" else resolve_device(device)
    try:
        return resolve_device("cuda")
    except ValueError:
        raise DeviceError("device cuda asked for but no CUDA GPU is visible on this machine "
                          "(torch.cuda.is_available() is False): use --device cpu or auto") from None


def backbone_dtype(device: str, dtype: str = "auto") -> str:
    """The precision a serving backbone runs in: float32 on CPU; on CUDA `dtype`, where 'auto' is
    bfloat16 on GPUs that support it (Ampere and later) and float16 otherwise (both as autocast:
    pipeline.backbones.torch_base). Ask on the machine that holds the GPU (the replica)."""
    if not str(device).startswith("cuda"):
        return "float32"
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


@functools.lru_cache(maxsize=256)
def backbone_identity(key: str) -> str:
    """Which backbone a spec key names: its fingerprint, so keys that differ only in fields that do
    not change the numbers (e.g. ``params_m``, filled in when the weights load) share one loaded
    backbone and one forward pass; the key itself if the weights identity cannot be read."""
    from pipeline.backbones.spec import BackboneSpec

    try:
        return BackboneSpec.from_dict(json.loads(key)).fingerprint
    except Exception:  # noqa: BLE001 - no weights identity: the spec itself names the backbone
        return key


class BackbonePool:
    """Loaded backbones by spec JSON (LRU, thread-safe loading).

    `device` 'cuda' runs the torch engine in `dtype` (`backbone_dtype`: bfloat16
    where the GPU supports it, else float16, as autocast; embeddings come back float32).

    ONNX Runtime sessions come with intra-op thread spinning off (pipeline's default): on a
    small CPU shared with the proxy, the ingress and JPEG decoding, spinning threads steal the
    cores the rest of the request path needs.
    """

    def __init__(self, engine: str = "auto", *, device: str = "cpu", dtype: str = "auto",
                 capacity: int = DEFAULT_CAPACITY, intra_op_num_threads: int | None = None):
        self.engine = engine
        self.device = resolve_backbone_device(device)  # 'auto' -> cuda / cpu on this replica
        self.dtype = backbone_dtype(self.device, dtype)  # float32 on CPU; bf16 / fp16 autocast on CUDA
        self.capacity = max(1, int(capacity))
        self.intra_op_num_threads = intra_op_num_threads
        self._models: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str):
        ident = backbone_identity(key)
        with self._lock:
            if ident in self._models:
                self._models.move_to_end(ident)
                return self._models[ident]
            from pipeline.backbones import load_backbone
            from pipeline.backbones.spec import BackboneSpec

            spec = BackboneSpec.from_dict(json.loads(key))
            kwargs = {}
            if self.intra_op_num_threads:
                kwargs["intra_op_num_threads"] = int(self.intra_op_num_threads)
            engine, device, dtype = self.engine, self.device, self.dtype
            if device != "cpu" and spec.precision != "fp32":
                # an INT8 variant runs only on a CPU graph engine (pipeline.backbones.registry):
                # on a GPU replica it still runs, on this replica's CPU
                engine, device, dtype = "auto", "cpu", "float32"
            log.info("loading backbone %s (engine=%s, device=%s, dtype=%s)", spec.name, engine, device, dtype)
            model = load_backbone(spec, engine=engine, device=device, dtype=dtype, **kwargs)
            self._models[ident] = model
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return model

    def loaded(self) -> list[dict]:
        with self._lock:
            return [{"backbone": m.spec.name, "engine": m.engine} for m in self._models.values()]

    def embed_many(self, keys: Sequence[str], pixels: Sequence[np.ndarray]) -> list[EmbedResult]:
        """One forward pass per distinct backbone (`backbone_identity`) over all requests' pixels,
        whichever models sent them; results in request order."""
        if len(keys) != len(pixels):
            raise ValueError(f"got {len(keys)} spec keys for {len(pixels)} pixel arrays")
        groups: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(backbone_identity(k), []).append(i)
        out: list[EmbedResult | None] = [None] * len(keys)
        for idx in groups.values():
            model = self.get(keys[idx[0]])
            arrays = [pixels[i] for i in idx]
            batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
            emb = model.embed(batch)
            start = 0
            for j, i in enumerate(idx):
                n = len(arrays[j])
                out[i] = EmbedResult(emb[start:start + n], int(len(batch)), len(idx), j == 0,
                                     getattr(model, "engine", ""))
                start += n
        return out  # type: ignore[return-value]


class LocalEmbedder:
    """The embedder interface (`await embedder(key, pixels) -> EmbedResult`) without Ray Serve:
    every call is its own forward pass, run in a worker thread. For tests and benchmarks."""

    def __init__(self, pool: BackbonePool):
        self.pool = pool

    async def __call__(self, key: str, pixels: np.ndarray) -> EmbedResult:
        import asyncio

        return (await asyncio.to_thread(self.pool.embed_many, [key], [pixels]))[0]
