"""Dataset archives (.tar.gz / .tgz / .tar / .zip) unpacked once into a cache directory.

Data never goes into the repository: archives are unpacked under `default_cache_dir()`
(`$TLPIPE_CACHE_DIR`, else `~/.cache/tlpipe`), keyed by the archive's name and size, behind a
marker file written last — an interrupted unpack is redone, a finished one is reused.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def default_cache_dir() -> Path:
    """The cache root, read from the environment at call time (never at import)."""
    return Path(os.environ.get("TLPIPE_CACHE_DIR") or Path.home() / ".cache" / "tlpipe")


def is_archive(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    return os.path.isfile(path) and name.endswith(ARCHIVE_SUFFIXES)


def unpack(archive: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Unpack `archive` into the cache once and return the dataset root inside it.

    The root is the single top-level folder when the archive has exactly one, else the
    unpack folder itself. Members that would land outside the target (absolute paths, `..`,
    links) are refused by tarfile's `data` filter.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"dataset archive not found: {archive}")
    stem = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    base = Path(cache_dir) if cache_dir else default_cache_dir() / "data"
    target = base / f"{stem}-{archive.stat().st_size}"
    marker = target / ".tlpipe-unpacked"
    if not marker.exists():
        base.mkdir(parents=True, exist_ok=True)
        with open(base / f".{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test runs / jobs unpack once
            try:
                if not marker.exists():
                    _unpack_into(archive, target, base)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    entries = [p for p in target.iterdir() if not p.name.startswith(".")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else target


def _unpack_into(archive: Path, target: Path, base: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=base))
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():
                    if not (tmp / member).resolve().is_relative_to(tmp.resolve()):
                        raise ValueError(f"{archive}: member {member!r} escapes the archive")
                zf.extractall(tmp)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(tmp, filter="data")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (target / ".tlpipe-unpacked").write_text(str(archive.resolve()))
