"""Support examples added through the API: images on disk, an append-only log, a persisted index.

Layout under ``<state root>/serve/<model>/support/``::

    examples.jsonl                  append-only log, one JSON object a line:
                                    {"op": "add", "id", "class", "sha256", "path", "bytes", "time", "model"}
                                    {"op": "delete", "id", "class", "time"}
    images/<class>/<id>-<sha12>.<ext>   the exact uploaded bytes (an ImageFolder the next
                                    `tlpipe run` can train on)
    index/<fingerprint>/CURRENT     name of the live index generation (replaced atomically)
    index/<fingerprint>/<gen>/      SupportIndex.save() of the added examples' embeddings for
                                    the backbone with that fingerprint (written copy-on-write)
    .lock                           fcntl lock serialising writers (several replicas, one disk)

The log is the source of truth; an index generation is a cache of the embeddings of the live
examples for one backbone. A server reconciles the two (embeds what is missing, drops what was
deleted), so a new backbone, a crash between the two writes, or another replica's write all
converge. `CombinedSupport` lets the predictor search the artifact's (large, immutable) support
index and the (small, copy-on-write) added-examples index as one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipeline.images import file_extension, sha256_bytes

CLASS_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+\-]{0,99}$")
_KEEP_GENERATIONS = 2


def check_class_name(name: str) -> str:
    """The class name, or ValueError: it becomes a folder name, so it must be a safe one."""
    if not isinstance(name, str) or not CLASS_NAME_RE.match(name) or name.strip() != name:
        raise ValueError(
            f"invalid class name {name!r}: use 1-100 characters, letters/digits first, then letters, "
            "digits, space, '_', '.', '+' or '-' (no slashes)")
    return name


@dataclass(frozen=True)
class Example:
    id: int
    label: str
    sha256: str
    path: str  # relative to the store root
    bytes: int
    time: str
    model: str = ""

    def to_log(self) -> dict:
        d = asdict(self)
        d["class"] = d.pop("label")
        return {"op": "add", **d}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _fsync_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class SupportStore:
    """The on-disk store of one served model's added support examples."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.log_path = self.root / "examples.jsonl"
        self._cache: tuple[tuple[int, int], list[Example]] | None = None
        self._tlock = threading.Lock()

    # ------------------------------------------------------------------ reading
    def token(self) -> tuple[int, int]:
        """Changes whenever the log changes (size, mtime): cheap change detection for pollers."""
        try:
            st = self.log_path.stat()
        except FileNotFoundError:
            return (0, 0)
        return (st.st_size, st.st_mtime_ns)

    def examples(self) -> list[Example]:
        """The live examples (added and not deleted), oldest first."""
        tok = self.token()
        cached = self._cache
        if cached is not None and cached[0] == tok:
            return list(cached[1])
        live: dict[int, Example] = {}
        if self.log_path.is_file():
            with open(self.log_path, "rb") as f:
                for raw in f:
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        continue  # a torn last line (crash mid-append): ignore it
                    if rec.get("op") == "add":
                        live[int(rec["id"])] = Example(
                            id=int(rec["id"]), label=str(rec["class"]), sha256=rec["sha256"],
                            path=rec["path"], bytes=int(rec.get("bytes", 0)), time=rec.get("time", ""),
                            model=rec.get("model", ""))
                    elif rec.get("op") == "delete":
                        live.pop(int(rec["id"]), None)
        out = list(live.values())
        self._cache = (tok, out)
        return list(out)

    def image_path(self, example: Example) -> Path:
        return self.root / example.path

    def _next_id(self) -> int:
        top = 0
        if self.log_path.is_file():
            with open(self.log_path, "rb") as f:
                for raw in f:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        top = max(top, int(json.loads(raw)["id"]))
        return top + 1

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive writer lock: this process's threads and other processes on the same disk."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._tlock, open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _append(self, records: Sequence[dict]) -> None:
        data = b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in records)
        fd = os.open(self.log_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # a torn last line (crash mid-append) stays a line of its own
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def add(self, label: str, images: Sequence[bytes], *, model: str = "") -> list[tuple[Example, bool]]:
        """Keep the images of class `label` on disk and log them. Returns (example, duplicate) per
        image; an image this class already has (same sha256) is not stored twice."""
        check_class_name(label)
        with self.locked():
            existing = {(e.label, e.sha256): e for e in self.examples()}
            next_id = self._next_id()
            out: list[tuple[Example, bool]] = []
            records = []
            for data in images:
                digest = sha256_bytes(data)
                if (label, digest) in existing:
                    out.append((existing[(label, digest)], True))
                    continue
                ext = file_extension(data).lstrip(".")
                rel = f"images/{label}/{next_id}-{digest[:12]}.{ext}"
                dest = self.root / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                _fsync_write(dest, data)
                ex = Example(next_id, label, digest, rel, len(data), _now(), model)
                existing[(label, digest)] = ex
                records.append(ex.to_log())
                out.append((ex, False))
                next_id += 1
            if records:
                self._append(records)
            return out

    def remove(self, ids: Sequence[int]) -> list[Example]:
        """Delete these examples (log + image files). Returns what was removed."""
        want = {int(i) for i in ids}
        with self.locked():
            gone = [e for e in self.examples() if e.id in want]
            if gone:
                self._append([{"op": "delete", "id": e.id, "class": e.label, "time": _now()} for e in gone])
                for e in gone:
                    with contextlib.suppress(FileNotFoundError):
                        self.image_path(e).unlink()
            return gone

    # ------------------------------------------------------------------ embeddings index
    def _index_dir(self, fingerprint: str) -> Path:
        return self.root / "index" / fingerprint

    def load_index(self, fingerprint: str):
        """The last saved index of added-example embeddings for this backbone, or None."""
        from feature_store.index import SupportIndex

        d = self._index_dir(fingerprint)
        try:
            gen = (d / "CURRENT").read_text().strip()
        except FileNotFoundError:
            return None
        try:
            return SupportIndex.load(d / gen)
        except (FileNotFoundError, ValueError):
            return None  # a damaged generation: the caller re-embeds from the images

    def save_index(self, fingerprint: str, index) -> Path:
        """Write `index` as a new generation and point CURRENT at it (atomic swap)."""
        d = self._index_dir(fingerprint)
        d.mkdir(parents=True, exist_ok=True)
        gen = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        index.save(d / gen)
        _fsync_write(d / "CURRENT", gen.encode())
        keep = sorted(p.name for p in d.iterdir() if p.is_dir())[-_KEEP_GENERATIONS:]
        for p in d.iterdir():
            if p.is_dir() and p.name not in keep and p.name != gen:
                shutil.rmtree(p, ignore_errors=True)
        return d / gen


class CombinedSupport:
    """Read-only view searching a base SupportIndex and an added-examples index as one.

    Implements what `Predictor` uses of a support index: ``len``, ``labels``, ``label_counts``,
    ``search``.
    """

    def __init__(self, base=None, added=None):
        self.base = base if base is not None and len(base) else None
        self.added = added if added is not None and len(added) else None

    def __len__(self) -> int:
        return (len(self.base) if self.base is not None else 0) + (len(self.added) if self.added is not None else 0)

    @property
    def parts(self) -> list:
        return [p for p in (self.base, self.added) if p is not None]

    @property
    def labels(self) -> np.ndarray:
        parts = [p.labels for p in self.parts]
        return np.concatenate(parts) if parts else np.empty(0, dtype=str)

    def label_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for part in self.parts:
            for label, n in part.label_counts().items():
                out[label] = out.get(label, 0) + n
        return out

    def search(self, vectors, k: int):
        parts = self.parts
        if len(parts) == 1:
            return parts[0].search(vectors, k)
        if not parts:
            q = np.atleast_2d(np.asarray(vectors))
            return (np.empty((len(q), 0), np.float32), np.empty((len(q), 0), dtype=str),
                    np.empty((len(q), 0), np.int64))
        results = [p.search(vectors, k) for p in parts]
        scores = np.concatenate([r[0] for r in results], axis=1)
        labels = np.concatenate([r[1] for r in results], axis=1)
        ids = np.concatenate([r[2] for r in results], axis=1)
        k = min(int(k), scores.shape[1])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        take = np.take_along_axis
        return take(scores, order, 1), take(labels, order, 1), take(ids, order, 1)
