"""Pipelined image → embedding computation for one chunk of files (no Ray here).

`ChunkEmbedder` is what every extraction worker runs: it decodes a chunk of image files in a
thread pool (PIL releases the GIL while decoding) and feeds micro-batches to the backbone as soon
as they are ready, so decoding of batch k+1 overlaps the forward pass of batch k. On two CPU cores
this overlap is worth more than any other trick. The Ray job (`jobs.extract`) wraps it in an actor
pool; GPU benchmarks drive it directly.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from pipeline.images import DEFAULT_MAX_PIXELS, ImageValidationError


@dataclass
class ChunkResult:
    """Embeddings for the files that decoded; `failed` lists (index, code, message) for the rest."""

    embeddings: np.ndarray
    ok: np.ndarray
    failed: list[tuple[int, str, str]] = field(default_factory=list)


class ChunkEmbedder:
    """Decode + embed a list of image files with decode/compute overlap.

    Args:
        backbone: an object with `spec` and `embed(uint8 (N,3,S,S)) -> (N,D) float32`.
        micro_batch: images per forward pass.
        decode_threads: decoder threads (default: CPU count).
        max_pixels: decompression-bomb limit passed to `open_image`.
    """

    def __init__(
        self,
        backbone,
        *,
        micro_batch: int = 32,
        decode_threads: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.backbone = backbone
        self.spec = backbone.spec
        self.micro_batch = micro_batch
        self.max_pixels = max_pixels
        self._pool = ThreadPoolExecutor(
            max_workers=decode_threads or os.cpu_count() or 2, thread_name_prefix="tlpipe-decode"
        )

    def _decode(self, path: str):
        from pipeline.preprocess import load_pixels

        try:
            return load_pixels(path, self.spec, max_pixels=self.max_pixels)
        except ImageValidationError as exc:
            return exc
        except OSError as exc:  # vanished / unreadable since validation
            return ImageValidationError("unreadable", f"{path}: {exc}")

    def __call__(self, paths: Sequence[str]) -> ChunkResult:
        n = len(paths)
        dim = int(self.spec.embed_dim)
        out = np.zeros((n, dim), dtype=np.float32)
        ok = np.zeros(n, dtype=bool)
        failed: list[tuple[int, str, str]] = []
        decoded = self._pool.map(self._decode, paths)  # submits everything; yields in order
        batch: list[np.ndarray] = []
        batch_idx: list[int] = []

        def flush() -> None:
            if not batch:
                return
            emb = self.backbone.embed(np.stack(batch))
            if emb.shape[1] != dim:
                raise RuntimeError(
                    f"backbone {self.spec.name} returned dim {emb.shape[1]}, spec says {dim}"
                )
            out[batch_idx] = emb
            ok[batch_idx] = True
            batch.clear()
            batch_idx.clear()

        for i, item in enumerate(decoded):
            if isinstance(item, ImageValidationError):
                failed.append((i, item.code, str(item)))
                continue
            batch.append(item)
            batch_idx.append(i)
            if len(batch) == self.micro_batch:
                flush()
        flush()
        return ChunkResult(embeddings=out, ok=ok, failed=failed)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
