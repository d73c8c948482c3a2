"""Capture of uncertain production traffic: the images and embeddings of fallback and abstain
answers (and an optional random sample of the rest), for `tlpipe suggest` to mine.

Never in a request's way: `offer` puts a record on a bounded queue and returns (a full queue
drops the record and counts it); one background thread writes. Each record is three files
under the capture root (a local folder or any fsspec URL)::

    <id>.<ext>   the exact image bytes the client sent
    <id>.npy     its embedding (float32, what the predictor classified)
    <id>.json    metadata, written last: a record exists once its JSON does

Every file is written to a ``.tmp-`` name and renamed into place, so a killed replica leaves
no half record behind (only ``.tmp-`` leftovers, removed by the next writer that starts). The
capture is bounded by bytes and by age: the oldest records go first. A write that fails (a
full disk, a store that is down) drops that record, counts it, and serving goes on.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import random
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.images import file_extension
from pipeline.multilabel.predictor import answered_labels

log = logging.getLogger("tlpipe.serve")

CAPTURED_DECISIONS = ("fallback", "abstain")
TMP_PREFIX = ".tmp-"
_STALE_TMP_S = 300.0  # a .tmp- file this old belongs to no live writer


@dataclass(frozen=True)
class CaptureRecord:
    image: bytes
    embedding: np.ndarray
    meta: dict


def open_fs(url: str):
    """(fsspec filesystem, root path) for a folder or URL; the root is created if missing."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(url))
    fs.makedirs(root, exist_ok=True)
    return fs, root.rstrip("/")


class CaptureWriter:
    """A bounded, non-blocking writer of capture records (one background thread)."""

    def __init__(self, url: str, *, max_bytes: int, max_age_s: float, sample: float = 0.0,
                 queue_size: int = 256, clock=time.time):
        self.url = str(url)
        self.fs, self.root = open_fs(url)
        self.max_bytes, self.max_age_s, self.sample = int(max_bytes), float(max_age_s), float(sample)
        self.clock = clock
        self.counts: Counter = Counter()  # written, evicted, dropped_queue_full, dropped_write_error
        self._queue: queue.Queue = queue.Queue(maxsize=int(queue_size))
        self._on_disk: deque = deque()  # (time, id, bytes, [paths]) oldest first
        self._bytes = 0
        self._rng = random.Random()
        self._thread = threading.Thread(target=self._run, name="tlpipe-capture", daemon=True)
        self._scan()
        self._thread.start()

    # ------------------------------------------------------------------ request side
    def wants(self, decision: str) -> bool:
        return decision in CAPTURED_DECISIONS or (self.sample > 0 and self._rng.random() < self.sample)

    def offer(self, record: CaptureRecord) -> bool:
        """Queue a record; False (and counted) when the queue is full. Never blocks."""
        try:
            self._queue.put_nowait(record)
            return True
        except queue.Full:
            self.counts["dropped_queue_full"] += 1
            return False

    def offer_predictions(self, images: Sequence[bytes], embeddings: np.ndarray, preds, meta: dict,
                          filenames: Sequence[str | None] | None = None) -> int:
        """Offer the images of one request whose decision is captured; returns how many."""
        n = 0
        for i, p in enumerate(preds):
            if self.wants(p.decision):
                rec = {**meta, "decision": p.decision, "label": p.label, "labels": answered_labels(p),
                       "score": p.score, "top_k": p.top_k, "index": i, "filename": filenames[i] if filenames else None}
                n += self.offer(CaptureRecord(images[i], np.array(embeddings[i], np.float32), rec))
        return n

    def stats(self) -> dict:
        return {"url": self.url, "records": len(self._on_disk), "bytes": self._bytes,
                "max_bytes": self.max_bytes, "max_age_s": self.max_age_s, "queued": self._queue.qsize(),
                **{k: int(self.counts.get(k, 0)) for k in
                   ("written", "evicted", "dropped_queue_full", "dropped_write_error")}}

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to `timeout`), then stop the thread."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    # ------------------------------------------------------------------ writer thread
    def _scan(self) -> None:
        """Index the records already there (a restart keeps the bounds) and clear stale tmp files."""
        try:
            entries = self.fs.ls(self.root, detail=True)
        except (OSError, FileNotFoundError) as exc:
            log.warning("capture: cannot list %s (%s); starting with an empty index", self.url, exc)
            return
        now = self.clock()
        groups: dict[str, list] = {}
        for e in entries:
            name = e["name"].rsplit("/", 1)[-1]
            if name.startswith(TMP_PREFIX):
                if now - _mtime(e, now) > _STALE_TMP_S:
                    self._rm([e["name"]])
                continue
            groups.setdefault(name.split(".", 1)[0], []).append(e)
        for rid, files in sorted(groups.items()):
            names = [f["name"] for f in files]
            if not any(n.endswith(".json") for n in names):
                # an uncommitted record (killed between renames): nothing reads it; once no live
                # writer can be about to commit it, its files go
                if all(now - _mtime(f, now) > _STALE_TMP_S for f in files):
                    self._rm(names)
                continue
            size = sum(int(f.get("size") or 0) for f in files)
            self._on_disk.append((_id_time(rid), rid, size, names))
            self._bytes += size

    def _run(self) -> None:
        while True:
            rec = self._queue.get()
            if rec is None:
                return
            try:
                self._write(rec)
            except Exception as exc:  # noqa: BLE001 - a full disk / store down: drop, count, go on
                self.counts["dropped_write_error"] += 1
                if self.counts["dropped_write_error"] in (1, 10, 100) or self.counts["dropped_write_error"] % 1000 == 0:
                    log.warning("capture: a record was dropped (%d so far): %s: %s",
                                self.counts["dropped_write_error"], type(exc).__name__, exc)
            try:
                self._prune()
            except Exception as exc:  # noqa: BLE001 - pruning retries on the next record
                log.warning("capture: pruning failed: %s", exc)

    def _write(self, rec: CaptureRecord) -> None:
        now = self.clock()
        rid = f"{int(now * 1e6):017d}-{uuid.uuid4().hex[:10]}"
        ext = file_extension(rec.image).lstrip(".")
        buf = io.BytesIO()
        np.save(buf, rec.embedding.astype(np.float32), allow_pickle=False)
        meta = {**rec.meta, "id": rid, "time": now, "image": f"{rid}.{ext}", "embedding": f"{rid}.npy",
                "bytes": len(rec.image)}
        payloads = [(f"{rid}.{ext}", rec.image), (f"{rid}.npy", buf.getvalue()),
                    (f"{rid}.json", json.dumps(meta, default=_jsonable).encode())]  # JSON last: the commit
        written: list[str] = []
        try:
            for name, data in payloads:
                final = f"{self.root}/{name}"
                tmp = f"{self.root}/{TMP_PREFIX}{name}"
                try:
                    with self.fs.open(tmp, "wb") as f:
                        f.write(data)
                    self.fs.mv(tmp, final)
                except BaseException:
                    self._rm([tmp])
                    raise
                written.append(final)
        except BaseException:
            self._rm(written)
            raise
        size = sum(len(d) for _, d in payloads)
        self._on_disk.append((now, rid, size, written))
        self._bytes += size
        self.counts["written"] += 1

    def _prune(self) -> None:
        cutoff = self.clock() - self.max_age_s
        while self._on_disk and (self._bytes > self.max_bytes or self._on_disk[0][0] < cutoff):
            _, _, size, names = self._on_disk.popleft()
            # the JSON first: the record stops existing before its files go
            self._rm(sorted(names, key=lambda n: not n.endswith(".json")))
            self._bytes -= size
            self.counts["evicted"] += 1

    def _rm(self, paths: Sequence[str]) -> None:
        for p in paths:
            try:
                self.fs.rm_file(p)
            except (OSError, FileNotFoundError):
                pass


def _mtime(entry: dict, default: float) -> float:
    """A listing entry's modification time in epoch seconds (fsspec backends differ)."""
    value = entry.get("mtime") or entry.get("LastModified") or entry.get("created")
    if value is None:
        return default
    return float(value.timestamp()) if hasattr(value, "timestamp") else float(value)


def _id_time(rid: str) -> float:
    try:
        return int(rid.split("-", 1)[0]) / 1e6
    except ValueError:
        return 0.0


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


@dataclass(frozen=True)
class Captured:
    """One complete capture record, as `read_captures` returns it."""

    id: str
    meta: dict
    embedding: np.ndarray
    image_path: str


def read_captures(url: str, *, fingerprint: str | None = None) -> tuple[list[Captured], object]:
    """The complete records under `url` (oldest first), optionally only those embedded by the
    backbone(s) with `fingerprint`; and the fsspec filesystem to read their images with."""
    fs, root = open_fs(url)
    out: list[Captured] = []
    for path in sorted(fs.glob(f"{root}/*.json")):
        name = path.rsplit("/", 1)[-1]
        if name.startswith(TMP_PREFIX):
            continue
        try:
            meta = json.loads(fs.cat_file(path))
            if fingerprint is not None and meta.get("fingerprint") != fingerprint:
                continue
            emb = np.load(io.BytesIO(fs.cat_file(f"{root}/{meta['embedding']}")), allow_pickle=False)
        except (OSError, ValueError, KeyError, FileNotFoundError):
            continue  # evicted between the listing and the read, or damaged: not a record
        out.append(Captured(meta["id"], meta, emb, f"{root}/{meta['image']}"))
    return out, fs
