"""SupportIndex: cosine k-NN over labelled support vectors, backed by FAISS.

Vectors are L2-normalised on the way in (and queries at search time), so inner product is cosine
similarity. Below `hnsw_threshold` vectors the index is exact (`IndexFlatIP`); at or above it,
approximate (`IndexHNSWFlat`, inner-product metric). Labels and ids live beside the FAISS index
in row order: row i of the FAISS index is ``labels[i]`` / ``ids[i]``.

FAISS indexes are not safe for a search running while another thread adds or removes. `add` and
`remove` mutate in place — use them while building. A server holding an index should use
`with_added` / `without`, which return a new SupportIndex and leave the original untouched, and
then swap its reference (a single attribute assignment is atomic in Python).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import faiss
import numpy as np

FORMAT_VERSION = 1
_FILES = ("index.faiss", "ids.npy", "labels.json", "config.json")


class SupportIndex:
    def __init__(self, dim: int, *, hnsw_threshold: int | None = None, hnsw_m: int = 32,
                 ef_construction: int = 200, ef_search: int = 128):
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.hnsw_threshold = None if hnsw_threshold is None else int(hnsw_threshold)
        self.hnsw_m, self.ef_construction, self.ef_search = int(hnsw_m), int(ef_construction), int(ef_search)
        self._index = self._new_index(0)
        self._labels = np.empty(0, dtype=str)
        self._ids = np.empty(0, dtype=np.int64)
        self._counts: dict[str, int] | None = None  # label_counts, until the rows change

    # ---------------------------------------------------------------------------- properties

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __repr__(self) -> str:
        return f"SupportIndex(dim={self.dim}, n={len(self)}, kind={self.kind!r})"

    @property
    def kind(self) -> str:
        return "hnsw" if isinstance(self._index, faiss.IndexHNSWFlat) else "flat"

    @property
    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def label_counts(self) -> dict[str, int]:
        """{label: rows}, counted once per change of the index (the fallback reads it per batch)."""
        if self._counts is None:
            names, counts = np.unique(self._labels, return_counts=True)
            self._counts = dict(zip(names.tolist(), counts.tolist()))
        return dict(self._counts)

    @property
    def ids(self) -> np.ndarray:
        ids = self._ids.view()
        ids.flags.writeable = False
        return ids

    @property
    def vectors(self) -> np.ndarray:
        """The stored (L2-normalised) vectors, in row order."""
        n = len(self)
        return self._index.reconstruct_n(0, n) if n else np.empty((0, self.dim), np.float32)

    def vectors_at(self, rows: Sequence[int]) -> np.ndarray:
        """The stored vectors at these row positions (without materialising the others)."""
        if not len(rows):
            return np.empty((0, self.dim), np.float32)
        return np.stack([self._index.reconstruct(int(r)) for r in rows])

    # ---------------------------------------------------------------------------- mutation

    def add(self, vectors, labels: Sequence[str], ids: Iterable[int] | None = None) -> None:
        """Append vectors with their labels (and unique int ids; default: next free integers)."""
        x = self._normalise(vectors, "vectors")
        labels = [str(label) for label in labels]
        if len(labels) != len(x):
            raise ValueError(f"got {len(x)} vectors but {len(labels)} labels")
        if ids is None:
            start = int(self._ids.max()) + 1 if len(self._ids) else 0
            new_ids = np.arange(start, start + len(x), dtype=np.int64)
        else:
            new_ids = np.asarray(list(ids), dtype=np.int64).reshape(-1)
            if len(new_ids) != len(x):
                raise ValueError(f"got {len(x)} vectors but {len(new_ids)} ids")
            clash = np.intersect1d(new_ids, self._ids)
            if len(np.unique(new_ids)) != len(new_ids) or clash.size:
                raise ValueError("ids must be unique within the index"
                                 + (f"; already present: {clash[:5].tolist()}" if clash.size else
                                    "; the batch repeats an id"))
        if not len(x):
            return
        if self._kind_for(len(self) + len(x)) != self.kind:
            self._rebuild(np.concatenate([self.vectors, x]))  # crossed the HNSW threshold
        else:
            self._index.add(x)
        self._labels = np.concatenate([self._labels, np.asarray(labels, dtype=str)])
        self._ids = np.concatenate([self._ids, new_ids])
        self._counts = None

    def remove(self, ids: Iterable[int]) -> int:
        """Drop the rows with these ids (unknown ids are ignored); returns how many were removed."""
        drop = np.isin(self._ids, np.asarray(list(ids), dtype=np.int64))
        if not drop.any():
            return 0
        keep = ~drop
        self._rebuild(self.vectors[keep])
        self._labels = self._labels[keep]
        self._ids = self._ids[keep]
        self._counts = None
        return int(drop.sum())

    def copy(self) -> "SupportIndex":
        new = SupportIndex.__new__(SupportIndex)
        new.__dict__.update(self.__dict__)
        new._index = faiss.clone_index(self._index)
        new._labels = self._labels.copy()
        new._ids = self._ids.copy()
        return new

    def with_added(self, vectors, labels: Sequence[str], ids: Iterable[int] | None = None) -> "SupportIndex":
        """A new index = this one + the given rows; this one is left unchanged (copy-on-write)."""
        new = self.copy()
        new.add(vectors, labels, ids)
        return new

    def without(self, ids: Iterable[int]) -> "SupportIndex":
        """A new index without the given ids; this one is left unchanged (copy-on-write)."""
        new = self.copy()
        new.remove(ids)
        return new

    # ---------------------------------------------------------------------------- search

    def search(self, vectors, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k cosine neighbours of each query: (scores, labels, ids), each (Q, min(k, len)).

        Rows are best first. Scores are cosine similarities (float32).
        """
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = self._normalise(vectors, "queries")
        k = min(int(k), len(self))
        if k == 0 or not len(q):
            return (np.empty((len(q), k), np.float32), np.empty((len(q), k), dtype=str),
                    np.empty((len(q), k), np.int64))
        params = (faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
                  if self.kind == "hnsw" else None)
        scores, rows = self._index.search(q, k, params=params)
        labels, ids = self._labels[rows], self._ids[rows]
        found = rows >= 0  # HNSW returns -1 where it found fewer than k neighbours
        if not found.all():
            scores[~found], labels[~found], ids[~found] = -np.inf, "", -1
        return scores, labels, ids

    # ---------------------------------------------------------------------------- persistence

    def save(self, directory: str | os.PathLike) -> Path:
        """Write index.faiss, ids.npy, labels.json and config.json into `directory`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._index, str(d / "index.faiss"))
        np.save(d / "ids.npy", self._ids, allow_pickle=False)
        (d / "labels.json").write_text(json.dumps(self._labels.tolist()))
        (d / "config.json").write_text(json.dumps({
            "format": FORMAT_VERSION, "dim": self.dim, "kind": self.kind, "count": len(self),
            "hnsw_threshold": self.hnsw_threshold, "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction, "ef_search": self.ef_search}, indent=2))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "SupportIndex":
        d = Path(directory)
        absent = [f for f in _FILES if not (d / f).is_file()]
        if absent:
            raise FileNotFoundError(f"{d} is not a saved SupportIndex (missing {absent}); "
                                    "create one with SupportIndex.save(dir)")
        cfg = json.loads((d / "config.json").read_text())
        if cfg.get("format") != FORMAT_VERSION:
            raise ValueError(f"{d}: SupportIndex format {cfg.get('format')} is not {FORMAT_VERSION}")
        new = cls(cfg["dim"], hnsw_threshold=cfg["hnsw_threshold"], hnsw_m=cfg["hnsw_m"],
                  ef_construction=cfg["ef_construction"], ef_search=cfg["ef_search"])
        new._index = faiss.read_index(str(d / "index.faiss"))
        new._ids = np.load(d / "ids.npy", allow_pickle=False).astype(np.int64)
        new._labels = np.asarray([str(x) for x in json.loads((d / "labels.json").read_text())], dtype=str)
        new._counts = None
        counts = {"index": len(new), "ids": len(new._ids), "labels": len(new._labels),
                  "config": cfg["count"]}
        if len(set(counts.values())) != 1 or new._index.d != new.dim:
            raise ValueError(f"{d}: inconsistent SupportIndex files {counts} (dim {new._index.d} vs "
                             f"{new.dim}); re-save it")
        return new

    # ---------------------------------------------------------------------------- internals

    def _kind_for(self, n: int) -> str:
        return "hnsw" if self.hnsw_threshold is not None and n >= self.hnsw_threshold else "flat"

    def _new_index(self, n: int):
        if self._kind_for(n) == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
            index.hnsw.efSearch = self.ef_search
            return index
        return faiss.IndexFlatIP(self.dim)

    def _rebuild(self, x: np.ndarray) -> None:
        index = self._new_index(len(x))
        if len(x):
            index.add(np.ascontiguousarray(x, dtype=np.float32))
        self._index = index

    def _normalise(self, vectors, what: str) -> np.ndarray:
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim == 1 and x.size == self.dim:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{what} must have shape (N, {self.dim}), got {np.shape(vectors)}")
        if not np.isfinite(x).all():
            raise ValueError(f"{what} contain NaN/inf")
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if (norms == 0).any():
            raise ValueError(f"{what} contain an all-zero row, which has no cosine direction")
        return np.ascontiguousarray(x / norms, dtype=np.float32)
