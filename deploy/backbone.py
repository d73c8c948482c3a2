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

    ONNX Runtime sessions come with intra-op thread spinning off (pipeline's default): on a
    small CPU shared with the proxy, the ingress and JPEG decoding, spinning threads steal the
    cores the rest of the request path needs.
    """

    def __init__(self, engine: str = "auto", *, device: str = "cpu", capacity: int = DEFAULT_CAPACITY,
                 intra_op_num_threads: int | None = None):
        self.engine = engine
        self.device = device
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
            log.info("loading backbone %s (engine=%s)", spec.name, self.engine)
            model = load_backbone(spec, engine=self.engine, device=self.device, **kwargs)
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
