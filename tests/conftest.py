"""Shared real-data fixtures.

The archives in the shared data folder (`$TLPIPE_SHARED_DATA`, default `<repo>/../shared/data`)
are unpacked once by `pipeline.archives.unpack` into `$TLPIPE_CACHE_DIR/data` (default
`~/.cache/tlpipe/data`) and reused across sessions.

Missing data skips the tests that need it on a workstation, but fails them under CI (`CI=true`),
so a green CI run always means the real-data tests ran.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.archives import unpack

REPO = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    return Path(os.environ.get("TLPIPE_SHARED_DATA") or REPO.parent / "shared" / "data").expanduser()


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _missing(reason: str):
    """Skip locally; fail under CI, where missing shared data must not turn into a green run."""
    if _in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def _unpacked(archive: Path, name: str) -> Path:
    """The archive unpacked once into the tlpipe cache (shared with `tlpipe run ARCHIVE`)."""
    root = unpack(archive)
    if root.name != name:
        raise RuntimeError(f"{archive} does not contain a top-level folder {name!r}")
    return root


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    path = _shared_data_dir()
    if not path.is_dir():
        _missing(f"shared data folder {path} not found; set TLPIPE_SHARED_DATA to the folder "
                 "holding clothing-small.tar.gz and cifar10.tar.gz")
    return path


def _archive(shared: Path, filename: str) -> Path:
    archive = shared / filename
    if not archive.is_file():
        _missing(f"{archive} not found; set TLPIPE_SHARED_DATA to the folder that holds it")
    return archive


@pytest.fixture(scope="session")
def clothing_small_dir(shared_data_dir: Path) -> Path:
    """ImageFolder `clothing-small/{train,validation,test}/<class>/*.jpg` (10 classes)."""
    return _unpacked(_archive(shared_data_dir, "clothing-small.tar.gz"), "clothing-small")


@pytest.fixture(scope="session")
def cifar10_dir(shared_data_dir: Path) -> Path:
    """ImageFolder `cifar10/{train,test}/<class>/*.jpg` (10 classes, 32x32)."""
    return _unpacked(_archive(shared_data_dir, "cifar10.tar.gz"), "cifar10")
