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

from pipeline.data.imagefolder import is_hidden
from pipeline.settings import cache_dir as default_cache_dir

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


class ArchiveError(ValueError):
    """An archive that cannot be unpacked safely: corrupt, or a member escaping the target."""


def is_archive(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    return os.path.isfile(path) and name.endswith(ARCHIVE_SUFFIXES)


def unpack(archive: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Unpack `archive` into the cache once and return the dataset root inside it.

    The root is the single top-level folder when the archive has exactly one (hidden entries
    and tools' folders such as `__MACOSX` aside: `is_hidden`), else the
    unpack folder itself. Members that would land outside the target (absolute paths, `..`,
    links out of it) are refused (tarfile's `data` filter; a check of every zip member name):
    `ArchiveError`, as for a corrupt archive. Zip members are always written as plain files.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"dataset archive not found: {archive}")
    if archive.stat().st_size == 0:
        raise ArchiveError(f"dataset archive {archive} is empty (0 bytes); copy it again")
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
    entries = [p for p in target.iterdir() if not is_hidden(p.name)]  # a macOS zip's __MACOSX beside it
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else target


def _unpack_into(archive: Path, target: Path, base: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=base))
    try:
        try:
            if archive.name.lower().endswith(".zip"):
                with zipfile.ZipFile(archive) as zf:
                    for info in zf.infolist():
                        member = info.filename
                        if os.path.isabs(member) or not (tmp / member).resolve().is_relative_to(tmp.resolve()):
                            raise ArchiveError(f"{archive}: member {member!r} escapes the archive; "
                                               "refusing to unpack it (re-create the archive with relative paths)")
                    zf.extractall(tmp)
            else:
                with tarfile.open(archive) as tf:
                    tf.extractall(tmp, filter="data")
        except tarfile.FilterError as exc:
            raise ArchiveError(f"{archive}: {exc}; refusing to unpack it (re-create the archive "
                               "with relative paths and no links out of it)") from exc
        except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
            raise ArchiveError(f"{archive} is not a readable archive ({exc}); copy it again or "
                               "pass the unpacked folder") from exc
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (target / ".tlpipe-unpacked").write_text(str(archive.resolve()))
