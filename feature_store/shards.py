"""Immutable embedding shards: one Parquet file per `put` (or per compaction).

Layout of one feature set (``<root>/<fingerprint>/``)::

    meta.json                                   backbone name, dim, dtype, engine, created
    shard-20250101T120000123456Z-<uuid>.parquet committed shards (the set of them IS the manifest)
    .tmp-<rand>-shard-....parquet               a write in flight, or one a killed job left behind

A shard has two columns, ``key`` (string, sha256 hex of the image bytes) and ``embedding``
(``fixed_size_binary(4 * dim)``: one row of little-endian float32). The file's key-value metadata
records the format, the row count, the dim and sha256 checksums of the embedding bytes and of the
keys, so a shard proves its own integrity: no global manifest to update under concurrency.

Why ``fixed_size_binary`` rather than ``fixed_size_list<float32>``: Parquet stores a list column
with per-value repetition/definition levels, and reading 50k x 1280 floats back took 1.2-2.0 s;
the same data as fixed-size binary is one plain byte run per page and reads in ~0.07 s (and
hashes in ~0.17 s). The field metadata says ``dtype=float32, dim=D`` so the column stays
self-describing.

Writes are atomic: serialise to ``.tmp-<name>`` in the same directory, fsync (local), rename.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

FORMAT_VERSION = 1
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".parquet"
TEMP_PREFIX = ".tmp-"
META_NAME = "meta.json"
DTYPE = np.dtype("<f4")

_MD = "tlpipe."  # prefix of our keys in the Parquet key-value metadata


class ShardCorruptError(ValueError):
    """A committed shard that does not read back as it was written (truncated, bit rot, edited)."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class ShardHeader:
    """What a shard says about itself (from the Parquet footer, without reading the data)."""

    path: str
    rows: int
    dim: int
    embedding_sha256: str
    keys_sha256: str
    fingerprint: str
    created: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


def is_shard_name(name: str) -> bool:
    return name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX)


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_shard_name() -> str:
    """Sortable by creation time (older shards win key ties), unique across writers."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{SHARD_PREFIX}{stamp}-{uuid.uuid4().hex[:16]}{SHARD_SUFFIX}"


def embedding_checksum(emb: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(emb, dtype=DTYPE)).cast("B")).hexdigest()


def keys_checksum(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


# ------------------------------------------------------------------------------------ writing


def atomic_write(fs, final_path: str, write) -> None:
    """Call ``write(fileobj)`` on a temp file beside `final_path`, then rename it into place.

    A reader never sees a partial file under `final_path`: it exists complete or not at all.
    """
    directory, name = final_path.rsplit("/", 1)
    tmp = f"{directory}/{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}"  # unique: writers may race
    try:
        if isinstance(fs, LocalFileSystem):
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final_path)  # same directory: atomic on POSIX
        else:
            with fs.open(tmp, "wb") as f:
                write(f)
            fs.mv(tmp, final_path)
    except BaseException:
        try:
            fs.rm(tmp)
        except (FileNotFoundError, OSError):
            pass
        raise


def write_json_atomic(fs, path: str, obj: dict) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    atomic_write(fs, path, lambda f: f.write(data))


def write_shard(fs, directory: str, keys: list[str], emb: np.ndarray, *, fingerprint: str,
                meta: dict[str, Any] | None = None) -> str:
    """Write one committed shard of ``len(keys)`` rows into `directory`; returns its path."""
    emb = np.ascontiguousarray(emb, dtype=DTYPE)
    n, dim = emb.shape
    if n != len(keys) or n == 0:
        raise ValueError(f"write_shard needs matching, non-empty keys and rows; "
                         f"got {len(keys)} keys, {n} rows")
    created = utc_now()
    file_md = {
        "format": str(FORMAT_VERSION),
        "rows": str(n),
        "dim": str(dim),
        "dtype": "float32",
        "embedding_sha256": embedding_checksum(emb),
        "keys_sha256": keys_checksum(keys),
        "fingerprint": fingerprint,
        "created": created,
        "meta": json.dumps(meta or {}, sort_keys=True, default=str),
    }
    schema = pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("embedding", pa.binary(4 * dim), nullable=False,
                     metadata={"dtype": "float32", "byte_order": "little", "dim": str(dim)}),
        ],
        metadata={_MD + k: v for k, v in file_md.items()},
    )
    emb_col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(4 * dim), n, [None, pa.py_buffer(emb)])
    table = pa.Table.from_arrays([pa.array(keys, pa.string()), emb_col], schema=schema)
    path = f"{directory}/{new_shard_name()}"
    atomic_write(fs, path, lambda f: pq.write_table(
        table, f, compression="none", use_dictionary=False, write_statistics=False,
        row_group_size=max(n, 1)))
    return path


# ------------------------------------------------------------------------------------ reading


@contextmanager
def _parquet(fs, path: str) -> Iterator[pq.ParquetFile]:
    try:
        if isinstance(fs, LocalFileSystem):
            with pq.ParquetFile(path, memory_map=True) as pf:
                yield pf
        else:
            with fs.open(path, "rb") as f, pq.ParquetFile(f) as pf:
                yield pf
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as e:
        if not fs.exists(path):
            raise FileNotFoundError(path) from e
        raise ShardCorruptError(path, f"not a readable Parquet shard ({e})") from e


def read_header(fs, path: str) -> ShardHeader:
    """Footer-only read: the row count and checksums the shard claims. Raises ShardCorruptError."""
    with _parquet(fs, path) as pf:
        md = {k.decode(): v.decode() for k, v in (pf.schema_arrow.metadata or {}).items()}
        num_rows = pf.metadata.num_rows
        schema = pf.schema_arrow
    try:
        get = lambda k: md[_MD + k]  # noqa: E731
        if int(get("format")) != FORMAT_VERSION:
            raise ShardCorruptError(path, f"shard format {get('format')} is not {FORMAT_VERSION}; "
                                    "it was written by another tlpipe version — re-extract or gc it")
        header = ShardHeader(path=path, rows=int(get("rows")), dim=int(get("dim")),
                             embedding_sha256=get("embedding_sha256"), keys_sha256=get("keys_sha256"),
                             fingerprint=get("fingerprint"), created=get("created"),
                             meta=json.loads(get("meta")))
    except (KeyError, ValueError) as e:
        if isinstance(e, ShardCorruptError):
            raise
        raise ShardCorruptError(path, f"shard metadata missing or unreadable ({e!r})") from e
    if header.rows != num_rows:
        raise ShardCorruptError(path, f"footer has {num_rows} rows but the shard recorded {header.rows}")
    expected = [("key", pa.string()), ("embedding", pa.binary(4 * header.dim))]
    if [(f.name, f.type) for f in schema] != expected:
        raise ShardCorruptError(path, f"unexpected schema {schema} (want key: string, "
                                f"embedding: fixed_size_binary[{4 * header.dim}])")
    return header


def read_keys(fs, header: ShardHeader) -> list[str]:
    """The shard's keys, checked against its row count and keys checksum."""
    with _parquet(fs, header.path) as pf:
        try:
            col = pf.read(columns=["key"]).column(0)
        except (OSError, pa.ArrowException) as e:
            raise ShardCorruptError(header.path, f"keys column unreadable ({e})") from e
    keys = col.to_pylist()
    if len(keys) != header.rows or col.null_count:
        raise ShardCorruptError(header.path, f"{len(keys)} keys read, {header.rows} recorded")
    if keys_checksum(keys) != header.keys_sha256:
        raise ShardCorruptError(header.path, "keys checksum mismatch (corrupted file)")
    return keys


def read_embeddings(fs, header: ShardHeader, *, verify: bool = True) -> np.ndarray:
    """(rows, dim) read-only float32, checked against the recorded checksum when `verify`."""
    with _parquet(fs, header.path) as pf:
        try:
            col = pf.read(columns=["embedding"]).column(0)
        except (OSError, pa.ArrowException) as e:
            raise ShardCorruptError(header.path, f"embedding column unreadable ({e})") from e
    if len(col) != header.rows or col.null_count:
        raise ShardCorruptError(header.path, f"{len(col)} embeddings read, {header.rows} recorded")
    width = 4 * header.dim
    parts = [np.frombuffer(c.buffers()[1], dtype=DTYPE, count=len(c) * header.dim,
                           offset=c.offset * width) for c in col.chunks if len(c)]
    flat = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, DTYPE)
    emb = flat.reshape(header.rows, header.dim)
    if verify and embedding_checksum(emb) != header.embedding_sha256:
        raise ShardCorruptError(header.path, "embedding checksum mismatch (corrupted file)")
    return emb
