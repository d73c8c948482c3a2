"""Where local weights live and what their content hashes to (stdlib only).

``file_sha256`` is cached by (path, size, mtime) in-process, and on disk for big files, so
fingerprinting a multi-GB checkpoint costs one read per machine. Nothing here knows about specs
or sources: ``weights.py`` builds a spec's weights identity on top of it.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path

from pipeline.settings import cache_dir as cache_root

__all__ = ["cache_root", "dir_sha256", "file_sha256", "is_local_path", "local_path"]



def is_local_path(weights: str) -> bool:
    """True for weights that name a path on this machine (absolute, ./, ../, ~, file:, or existing)."""
    if weights.startswith(("pypi:", "hf-hub:")):
        return False
    if weights.startswith(("/", "./", "../", "~", "file:")) or re.match(r"^[A-Za-z]:[\\/]", weights):
        return True
    return os.path.exists(weights)


def local_path(weights: str) -> Path:
    if weights.startswith("file:"):
        weights = weights[len("file:"):]
    return Path(weights).expanduser()


_HASH_LOCK = threading.Lock()
_HASH_CACHE: dict[tuple[str, int, int], str] = {}
# Files at least this big also get their digest remembered on disk (one tiny file per
# (path, size, mtime, inode)), so every worker process does not re-hash multi-GB checkpoints.
_PERSIST_MIN_BYTES = 64 << 20




def _persisted_hash_path(key: tuple[str, int, int], inode: int) -> Path:
    name = hashlib.sha1(f"{key[0]}|{key[1]}|{key[2]}|{inode}".encode()).hexdigest()
    return cache_root() / "hashes" / name


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's content, cached by (path, size, mtime_ns): in-process, and on disk for big files."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        hit = _HASH_CACHE.get(key)
    if hit is not None:
        return hit
    persisted = _persisted_hash_path(key, st.st_ino) if st.st_size >= _PERSIST_MIN_BYTES else None
    if persisted is not None:
        try:
            digest = persisted.read_text().strip()
            if re.fullmatch(r"[0-9a-f]{64}", digest):
                with _HASH_LOCK:
                    _HASH_CACHE[key] = digest
                return digest
        except OSError:
            pass
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _HASH_LOCK:
        _HASH_CACHE[key] = digest
    if persisted is not None:
        try:
            persisted.parent.mkdir(parents=True, exist_ok=True)
            tmp = persisted.with_name(f"{persisted.name}.{os.getpid()}.tmp")
            tmp.write_text(digest)
            os.replace(tmp, persisted)
        except OSError:  # a read-only home is fine: we just hash again next time
            pass
    return digest


def dir_sha256(path: Path) -> str:
    """Content hash of a weights directory: every non-hidden file, by relative name + sha256."""
    h = hashlib.sha256()
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    for p in files:
        h.update(str(p.relative_to(path).as_posix()).encode())
        h.update(b"\0")
        h.update(file_sha256(p).encode())
        h.update(b"\n")
    return h.hexdigest()
