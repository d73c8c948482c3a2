"""FeatureStore: embeddings keyed by (image sha256, backbone fingerprint), on any fsspec filesystem.

``<root>/<fingerprint>/`` holds a ``meta.json`` and immutable Parquet shards (see shards.py).
There is no manifest to read-modify-write: the committed shards in the directory ARE the
manifest, so any number of processes may `put` into the same feature set at once. Duplicated
keys across shards are tolerated (the oldest shard wins; the values are the same embedding).

Readers keep an in-process index (key -> shard, row), rebuilt — incrementally when shards were
only added — whenever the directory listing changes. Shards that fail their row-count or
checksum checks are skipped with a warning (`problems`, `verify`) and removed by `gc`.
Embedding checksums are checked the first time this process reads a shard's embeddings.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from fsspec.core import url_to_fs

from feature_store.reports import FeatureSetInfo, GcReport, VerifyReport
from feature_store.shards import (
    META_NAME,
    ShardCorruptError,
    ShardHeader,
    basename,
    is_shard_name,
    is_temp_name,
    read_embeddings,
    read_header,
    read_keys,
    utc_now,
    write_json_atomic,
    write_shard,
)

logger = logging.getLogger(__name__)

DEFAULT_ROOT = ".tlpipe/features"
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_FP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_RETRIES = 5


@dataclass(frozen=True)
class _File:
    path: str
    size: int
    mtime: float | None


@dataclass
class _Listing:
    shards: dict[str, _File] = field(default_factory=dict)  # name -> committed shard file
    temps: list[_File] = field(default_factory=list)
    meta: _File | None = None
    exists: bool = False

    @property
    def signature(self) -> frozenset[tuple[str, int]]:
        return frozenset((name, f.size) for name, f in self.shards.items())

    @property
    def is_feature_set(self) -> bool:
        return bool(self.shards or self.temps or self.meta)


@dataclass
class _SetIndex:
    """key -> global row; shard s holds global rows starts[s] .. starts[s] + rows - 1."""

    signature: frozenset[tuple[str, int]]
    dim: int | None
    listing: _Listing
    shards: list[ShardHeader] = field(default_factory=list)
    files: list[_File] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    total: int = 0
    key_pos: dict[str, int] = field(default_factory=dict)

    def positions(self, keys: Sequence[str]) -> np.ndarray:
        get = self.key_pos.get
        return np.fromiter((get(k, -1) for k in keys), dtype=np.int64, count=len(keys))


class FeatureStore:
    """Embeddings per (backbone fingerprint, image sha256) under `root` (a path or fsspec URL).

    `cache_bytes` bounds the embeddings this process keeps in memory between `get` calls;
    `temp_grace_s` is how old a temp file must be before `gc` treats it as abandoned (younger
    ones may belong to a write in flight).
    """

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT, *, cache_bytes: int = 2 << 30,
                 temp_grace_s: float = 3600.0):
        self.url = os.fspath(root)
        self.fs, path = url_to_fs(self.url)
        self.root = path.rstrip("/")
        self.cache_bytes = int(cache_bytes)
        self.temp_grace_s = float(temp_grace_s)
        self._lock = threading.RLock()
        self._sets: dict[str, _SetIndex] = {}
        self._headers: dict[tuple[str, int], ShardHeader] = {}
        self._bad: dict[tuple[str, int], str] = {}
        self._verified: set[tuple[str, int]] = set()
        self._emb: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._emb_bytes = 0

    def __repr__(self) -> str:
        return f"FeatureStore({self.url!r})"

    # ------------------------------------------------------------------------- lookups

    def contains(self, fingerprint: str, keys: Iterable[str]) -> np.ndarray:
        """Boolean mask: which `keys` have an embedding for `fingerprint`."""
        keys = _key_list(keys)
        with self._lock:
            return self._index(fingerprint).positions(keys) >= 0

    def missing(self, fingerprint: str, keys: Iterable[str]) -> list[str]:
        """The distinct `keys` (in first-seen order) not yet stored for `fingerprint`."""
        keys = list(dict.fromkeys(_key_list(keys)))
        mask = self.contains(fingerprint, keys)
        return [k for k, present in zip(keys, mask) if not present]

    def get(self, fingerprint: str, keys: Iterable[str]) -> np.ndarray:
        """(len(keys), dim) float32 embeddings, in the order of `keys` (repeats allowed).

        Raises KeyError naming how many keys are missing and the first few.
        """
        keys = _key_list(keys)
        with self._lock:
            for _ in range(_RETRIES):
                idx = self._index(fingerprint)
                if idx.dim is None:
                    raise KeyError(self._no_set_message(fingerprint))
                pos = idx.positions(keys)
                absent = np.flatnonzero(pos < 0)
                if absent.size:
                    lost = list(dict.fromkeys(keys[i] for i in absent))
                    first = ", ".join(lost[:3])
                    raise KeyError(
                        f"{len(lost)} distinct key(s) ({absent.size} of {len(keys)} requested) "
                        f"have no embedding in feature set "
                        f"{fingerprint} under {self.url} (first missing: {first}); extract them "
                        f"first — FeatureStore.missing() lists them"
                        + self._problem_hint(fingerprint))
                try:
                    return self._gather(idx, pos)
                except (FileNotFoundError, ShardCorruptError):
                    # a shard was removed after we listed it (compaction / gc), or failed its
                    # checksum (now marked bad): rebuild the index and look again
                    self._sets.pop(fingerprint, None)
            raise RuntimeError(f"feature set {fingerprint}: shards kept changing while reading; retry")

    def problems(self, fingerprint: str) -> dict[str, str]:
        """Files of this set that readers skip: path -> reason (temp files, failed shards)."""
        with self._lock:
            idx = self._index(fingerprint)
            out = {f.path: "temp file: a write in flight, or left by a killed job (gc removes it)"
                   for f in idx.listing.temps}
            for f in idx.listing.shards.values():
                if (f.path, f.size) in self._bad:
                    out[f.path] = self._bad[(f.path, f.size)]
            return out

    # ------------------------------------------------------------------------- writing

    def put(self, fingerprint: str, keys: Iterable[str], embeddings: Any,
            meta: dict[str, Any] | None = None) -> str | None:
        """Store the rows whose keys are not stored yet as ONE atomic shard; returns its path.

        Returns None when every key was already present. `meta` (JSON-serialisable; e.g.
        ``{"backbone": spec.name, "engine": "onnx"}``) goes into meta.json on the set's first put
        and into every shard's metadata.
        """
        _check_fingerprint(fingerprint)
        keys = _check_put_keys(keys)
        emb = _check_embeddings(embeddings, keys)
        keys, emb = _dedupe_batch(keys, emb)
        meta = _check_meta(meta, emb.shape[1])
        with self._lock:
            idx = self._index(fingerprint)
            if idx.dim is not None and idx.dim != emb.shape[1]:
                raise ValueError(f"feature set {fingerprint} holds dim {idx.dim} embeddings, got dim "
                                 f"{emb.shape[1]}; a fingerprint names one backbone — check which "
                                 "spec produced these")
            new = idx.positions(keys) < 0
        if not new.any():
            return None
        if not new.all():
            keys = [k for k, n in zip(keys, new) if n]
            emb = emb[new]
        directory = self._dir(fingerprint)
        self.fs.makedirs(directory, exist_ok=True)
        self._ensure_meta(fingerprint, emb.shape[1], meta)
        return write_shard(self.fs, directory, keys, emb, fingerprint=fingerprint, meta=meta)

    def compact(self, fingerprint: str, *, keep_keys: Iterable[str] | None = None) -> str | None:
        """Merge the set's good shards into one (dropping duplicates, and keys not in `keep_keys`).

        Writes the new shard first, then deletes the old ones, so readers always find every key
        (a reader may briefly see both: duplicates are harmless). Shards written meanwhile are
        left alone. Returns the resulting shard path; None when the set has no readable rows, or
        when `keep_keys` drops them all (the set is then removed).
        """
        keep = None if keep_keys is None else set(keep_keys)
        with self._lock:
            for _ in range(_RETRIES):
                idx = self._index(fingerprint)
                if not idx.shards:
                    return None
                keys = list(idx.key_pos)
                if keep is not None:
                    keys = [k for k in keys if k in keep]
                if len(idx.shards) == 1 and len(keys) == idx.total:
                    return idx.shards[0].path  # already one shard with nothing to drop
                try:
                    emb = self._gather(idx, idx.positions(keys)) if keys else None
                    break
                except (FileNotFoundError, ShardCorruptError):
                    self._sets.pop(fingerprint, None)
            else:
                raise RuntimeError(f"feature set {fingerprint}: shards kept changing during compaction")
            directory = self._dir(fingerprint)
            new = None
            if keys:
                new = write_shard(self.fs, directory, keys, emb, fingerprint=fingerprint,
                                  meta=idx.shards[0].meta)
            for f in idx.files:
                _rm(self.fs, f.path)
            self._sets.pop(fingerprint, None)
            if new is None:
                left = self._list(fingerprint)
                if not left.shards and not left.temps:
                    self._forget(fingerprint)
                    _rm(self.fs, directory, recursive=True)
            return new

    # ------------------------------------------------------------------------- maintenance

    def ls(self) -> list[FeatureSetInfo]:
        """One record per feature set under the root, sorted by backbone name then fingerprint."""
        out = []
        for fp in self._fingerprints():
            with self._lock:
                idx = self._index(fp)
            meta, _ = self._read_meta(fp)
            meta = meta or (idx.shards[0].meta if idx.shards else {})
            mtimes = [f.mtime for f in idx.files if f.mtime is not None]
            created = meta.get("created") or min((h.created for h in idx.shards), default=None)
            out.append(FeatureSetInfo(
                fingerprint=fp, backbone=meta.get("backbone"), engine=meta.get("engine"),
                dim=idx.dim, rows=len(idx.key_pos), shards=len(idx.shards),
                bytes=sum(f.size for f in idx.files), created=created,
                updated=_iso(max(mtimes)) if mtimes else None,
                problems=len(self.problems(fp))))
        return sorted(out, key=lambda i: (i.backbone or "", i.fingerprint))

    def verify(self, fingerprint: str) -> VerifyReport:
        """Read every committed shard back (bypassing caches) and check it against its checksums."""
        listing = self._list(fingerprint)
        rep = VerifyReport(fingerprint=fingerprint, temp_files=[f.path for f in listing.temps])
        meta, rep.meta_problem = self._read_meta(fingerprint)
        dim = meta.get("dim") if meta else None
        seen: set[str] = set()
        total = 0
        for name in sorted(listing.shards):
            f = listing.shards[name]
            try:
                h = read_header(self.fs, f.path)
                self._check_belongs(h, fingerprint, dim)
                keys = read_keys(self.fs, h)
                read_embeddings(self.fs, h, verify=True)
            except FileNotFoundError:
                continue  # removed by a concurrent compaction / gc
            except ShardCorruptError as e:
                rep.corrupt[f.path] = e.problem
                self._mark_bad(f, e)
                continue
            with self._lock:
                self._headers[(f.path, f.size)] = h
                self._verified.add((f.path, f.size))
            dim = dim or h.dim
            rep.ok_shards.append(f.path)
            total += h.rows
            seen.update(keys)
        if meta is None and rep.meta_problem is None and rep.ok_shards:
            rep.meta_problem = f"{META_NAME} missing (gc rewrites it from the shards' metadata)"
        rep.dim, rep.rows, rep.duplicate_rows = dim, len(seen), total - len(seen)
        return rep

    def gc(self, keep_fingerprints: Iterable[str] | None = None,
           keep_keys: Iterable[str] | None = None, dry_run: bool = False, *,
           temp_grace_s: float | None = None) -> GcReport:
        """Clean the store.

        - feature sets whose fingerprint is not in `keep_fingerprints` (None keeps all) are removed;
        - temp files older than `temp_grace_s` (default: the store's) and shards failing their
          checks are removed from the kept sets; a missing meta.json is rewritten;
        - with `keep_keys`, kept sets are compacted to those keys (a set left empty is removed).
        With `dry_run` nothing is touched; the report says what would go.
        """
        grace = self.temp_grace_s if temp_grace_s is None else float(temp_grace_s)
        keep_fps = None if keep_fingerprints is None else set(keep_fingerprints)
        keep = None if keep_keys is None else set(keep_keys)
        rep = GcReport(dry_run=dry_run)
        now = time.time()
        for fp in self._fingerprints():
            listing = self._list(fp)
            if keep_fps is not None and fp not in keep_fps:
                rep.removed_sets.append(fp)
                rep.bytes_freed += self.fs.du(self._dir(fp))
                if not dry_run:
                    self._forget(fp)
                    _rm(self.fs, self._dir(fp), recursive=True)
                continue
            for f in listing.temps:
                age = None if f.mtime is None else now - f.mtime
                if (age is None and grace <= 0) or (age is not None and age >= grace):
                    rep.removed_temp.append(f.path)
                    rep.bytes_freed += f.size
                    if not dry_run:
                        _rm(self.fs, f.path)
            vr = self.verify(fp)
            sizes = {f.path: f.size for f in listing.shards.values()}
            for path in vr.corrupt:
                rep.removed_corrupt.append(path)
                rep.bytes_freed += sizes.get(path, 0)
                if not dry_run:
                    _rm(self.fs, path)
            if not dry_run and vr.ok_shards and vr.meta_problem and vr.meta_problem.startswith(META_NAME):
                self._restore_meta(fp)
            if keep is not None:
                with self._lock:
                    idx = self._index(fp)
                drop = sum(1 for k in idx.key_pos if k not in keep)
                if not drop:
                    continue
                rep.removed_keys += drop
                if dry_run:
                    if drop == len(idx.key_pos):
                        rep.removed_sets.append(fp)
                    continue
                before = sum(f.size for f in idx.files)
                new = self.compact(fp, keep_keys=keep)
                if new is None:
                    rep.removed_sets.append(fp)
                    rep.bytes_freed += before
                else:
                    rep.compacted[fp] = new
                    rep.bytes_freed += max(0, before - self.fs.size(new))
        return rep

    # ------------------------------------------------------------------------- internals

    def _dir(self, fingerprint: str) -> str:
        _check_fingerprint(fingerprint)
        return f"{self.root}/{fingerprint}"

    def _fingerprints(self) -> list[str]:
        try:
            self.fs.invalidate_cache(self.root or "/")
            entries = self.fs.ls(self.root or "/", detail=True)
        except FileNotFoundError:
            return []
        names = sorted(basename(e["name"]) for e in entries if e.get("type") == "directory")
        return [n for n in names if _FP_RE.match(n) and self._list(n).is_feature_set]

    def _list(self, fingerprint: str) -> _Listing:
        d = self._dir(fingerprint)
        try:
            self.fs.invalidate_cache(d)
            entries = self.fs.ls(d, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return _Listing()
        out = _Listing(exists=True)
        for e in entries:
            if e.get("type") != "file":
                continue
            name = basename(e["name"])
            f = _File(path=f"{d}/{name}", size=int(e.get("size") or 0), mtime=_mtime(e))
            if is_temp_name(name):
                out.temps.append(f)
            elif is_shard_name(name):
                out.shards[name] = f
            elif name == META_NAME:
                out.meta = f
        return out

    def _read_meta(self, fingerprint: str) -> tuple[dict | None, str | None]:
        path = f"{self._dir(fingerprint)}/{META_NAME}"
        try:
            with self.fs.open(path, "rb") as f:
                meta = json.loads(f.read())
            if not isinstance(meta, dict) or not isinstance(meta.get("dim"), int):
                raise ValueError("not an object with an integer 'dim'")
            return meta, None
        except FileNotFoundError:
            return None, None
        except (ValueError, OSError) as e:
            return None, f"{path} unreadable ({e}); delete it and gc rewrites it from the shards"

    def _ensure_meta(self, fingerprint: str, dim: int, meta: dict[str, Any]) -> None:
        existing, _ = self._read_meta(fingerprint)
        if existing is not None:
            if existing["dim"] != dim:
                raise ValueError(f"feature set {fingerprint}: meta.json says dim {existing['dim']}, "
                                 f"got dim {dim} embeddings")
            return
        record = {**meta, "format": 1, "fingerprint": fingerprint, "dim": dim,
                  "dtype": "float32", "created": utc_now()}
        write_json_atomic(self.fs, f"{self._dir(fingerprint)}/{META_NAME}", record)

    def _restore_meta(self, fingerprint: str) -> None:
        with self._lock:
            idx = self._index(fingerprint)
        if idx.shards:
            h = idx.shards[0]
            meta = {k: v for k, v in h.meta.items() if k not in ("dim", "dtype")}
            self._ensure_meta(fingerprint, h.dim, {**meta, "created": h.created})

    def _no_set_message(self, fingerprint: str) -> str:
        known = [fp[:16] for fp in self._fingerprints()]
        return (f"no feature set {fingerprint} under {self.url} (sets there: {known or 'none'}); "
                "extract features for that backbone first")

    def _problem_hint(self, fingerprint: str) -> str:
        probs = [p for p, why in self.problems(fingerprint).items() if not why.startswith("temp")]
        return (f"; note {len(probs)} shard(s) were skipped as corrupt (e.g. {probs[0]}) — run "
                "FeatureStore.verify / gc and re-extract") if probs else ""

    @staticmethod
    def _check_belongs(h: ShardHeader, fingerprint: str, dim: int | None) -> None:
        if h.fingerprint != fingerprint:
            raise ShardCorruptError(f"{h.path}: written for fingerprint {h.fingerprint}, "
                                    f"found under {fingerprint}")
        if dim is not None and h.dim != dim:
            raise ShardCorruptError(f"{h.path}: dim {h.dim} differs from the set's dim {dim}")

    def _mark_bad(self, f: _File, err: ShardCorruptError) -> None:
        key = (f.path, f.size)
        with self._lock:
            if key not in self._bad:
                logger.warning("feature store: skipping shard %s (FeatureStore.gc removes it)", err)
            self._bad[key] = err.problem
            self._drop_cached(lambda k: k == key)

    def _forget(self, fingerprint: str) -> None:
        prefix = self._dir(fingerprint) + "/"
        with self._lock:
            self._sets.pop(fingerprint, None)
            self._drop_cached(lambda k: k[0].startswith(prefix))

    def _drop_cached(self, pred) -> None:
        for k in [k for k in self._emb if pred(k)]:
            self._emb_bytes -= self._emb.pop(k).nbytes
        for k in [k for k in self._headers if pred(k)]:
            del self._headers[k]

    def _index(self, fingerprint: str) -> _SetIndex:
        """The (cached) key index of a set; call with the lock held."""
        for _ in range(_RETRIES):
            listing = self._list(fingerprint)
            sig = listing.signature
            cur = self._sets.get(fingerprint)
            if cur is not None and cur.signature == sig:
                cur.listing = listing
                return cur
            base = cur if cur is not None and cur.signature <= sig else None
            try:
                idx = self._build(fingerprint, listing, base)
            except FileNotFoundError:  # a shard vanished (compaction / gc) after listing: relist
                self._sets.pop(fingerprint, None)
                continue
            except BaseException:
                self._sets.pop(fingerprint, None)  # `base` may be half updated
                raise
            self._sets[fingerprint] = idx
            live = {(f.path, f.size) for f in listing.shards.values()}
            prefix = self._dir(fingerprint) + "/"
            self._drop_cached(lambda k: k[0].startswith(prefix) and k not in live)
            return idx
        raise RuntimeError(f"feature set {fingerprint}: shard listing kept changing; retry")

    def _build(self, fingerprint: str, listing: _Listing, base: _SetIndex | None) -> _SetIndex:
        if base is None:
            meta, _ = self._read_meta(fingerprint)
            idx = _SetIndex(signature=frozenset(), dim=meta["dim"] if meta else None, listing=listing)
        else:  # shards were only added: extend in place (the caller drops it if this fails)
            idx = base
            idx.listing = listing
        new_names = sorted(name for name, f in listing.shards.items()
                           if (name, f.size) not in idx.signature)
        kp = idx.key_pos
        for name in new_names:
            f = listing.shards[name]
            if (f.path, f.size) in self._bad:
                continue
            try:
                h = self._headers.get((f.path, f.size)) or read_header(self.fs, f.path)
                self._check_belongs(h, fingerprint, idx.dim)
                keys = read_keys(self.fs, h)
            except ShardCorruptError as e:
                self._mark_bad(f, e)
                continue
            self._headers[(f.path, f.size)] = h
            idx.dim = idx.dim or h.dim
            start = idx.total
            kp.update((k, g) for k, g in zip(keys, range(start, start + h.rows)) if k not in kp)
            idx.shards.append(h)
            idx.files.append(f)
            idx.starts.append(start)
            idx.total += h.rows
        idx.signature = listing.signature
        return idx

    def _gather(self, idx: _SetIndex, pos: np.ndarray) -> np.ndarray:
        if not len(pos):
            return np.empty((0, idx.dim), dtype=np.float32)
        starts = np.asarray(idx.starts, dtype=np.int64)
        shard_of = np.searchsorted(starts, pos, side="right") - 1
        used = np.flatnonzero(np.bincount(shard_of, minlength=len(starts)))
        if len(used) == 1:  # fancy indexing is the fastest copy (np.take(out=) is several x slower)
            s = used[0]
            return self._embeddings(idx.shards[s], idx.files[s])[pos - starts[s]]
        out = np.empty((len(pos), idx.dim), dtype=np.float32)
        for s in used:
            m = shard_of == s
            out[m] = self._embeddings(idx.shards[s], idx.files[s])[pos[m] - starts[s]]
        return out

    def _embeddings(self, h: ShardHeader, f: _File) -> np.ndarray:
        key = (f.path, f.size)
        if key in self._emb:
            self._emb.move_to_end(key)
            return self._emb[key]
        try:
            emb = read_embeddings(self.fs, h, verify=key not in self._verified)
        except ShardCorruptError as e:
            self._mark_bad(f, e)
            raise
        self._verified.add(key)
        self._emb[key] = emb
        self._emb_bytes += emb.nbytes
        while self._emb_bytes > self.cache_bytes and len(self._emb) > 1:
            self._emb_bytes -= self._emb.popitem(last=False)[1].nbytes
        return emb


# ----------------------------------------------------------------------------- validation


def _key_list(keys: Iterable[str]) -> list[str]:
    if isinstance(keys, (str, bytes)):
        raise TypeError("keys must be a sequence of sha256 hex strings, not a single string; "
                        "wrap it in a list")
    return keys if isinstance(keys, list) else list(keys)


def _check_fingerprint(fingerprint: str) -> None:
    if not isinstance(fingerprint, str) or not _FP_RE.match(fingerprint):
        raise ValueError(f"fingerprint must be a plain directory name (letters, digits, '._-'), "
                         f"got {fingerprint!r}; pass BackboneSpec.fingerprint")


def _check_put_keys(keys: Iterable[str]) -> list[str]:
    keys = [str(k) if isinstance(k, str) else k for k in _key_list(keys)]  # np.str_ -> str
    for i, k in enumerate(keys):
        if not isinstance(k, str) or not _KEY_RE.match(k):
            raise ValueError(f"keys must be sha256 hex digests of the image bytes (64 lowercase hex "
                             f"chars); key {i} is {k!r}")
    return keys


def _check_embeddings(embeddings: Any, keys: list[str]) -> np.ndarray:
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] != len(keys) or emb.shape[1] < 1:
        raise ValueError(f"embeddings must have shape (len(keys), dim) = ({len(keys)}, D); "
                         f"got {emb.shape}")
    if emb.dtype.kind != "f":
        raise TypeError(f"embeddings must be floating point (stored as float32), got {emb.dtype}")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{bad.size} embedding row(s) contain NaN/inf (first: row {bad[0]}, key "
                         f"{keys[bad[0]]}); the backbone produced invalid output — check its "
                         "dtype and input")
    return emb


def _dedupe_batch(keys: list[str], emb: np.ndarray) -> tuple[list[str], np.ndarray]:
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    if len(first) == len(keys):
        return keys, emb
    for i, k in enumerate(keys):
        if first[k] != i and not np.array_equal(emb[i], emb[first[k]]):
            raise ValueError(f"key {k} appears twice in one put with different embeddings "
                             f"(rows {first[k]} and {i}); one image must map to one embedding")
    rows = np.fromiter(first.values(), dtype=np.int64, count=len(first))
    return list(first), emb[rows]


def _check_meta(meta: dict[str, Any] | None, dim: int) -> dict[str, Any]:
    meta = dict(meta or {})
    if "dim" in meta and int(meta["dim"]) != dim:
        raise ValueError(f"meta says dim {meta['dim']} but the embeddings have dim {dim}")
    if meta.get("dtype", "float32") != "float32":
        meta["compute_dtype"] = meta.pop("dtype")
    meta.pop("dtype", None)
    meta.pop("dim", None)
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise TypeError(f"meta must be JSON-serialisable: {e}") from e
    return meta


def _rm(fs, path: str, recursive: bool = False) -> None:
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass


def _mtime(info: dict) -> float | None:
    for k in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(k)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, _dt.datetime):
            return v.timestamp()
        if isinstance(v, str):
            try:
                return _dt.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")
