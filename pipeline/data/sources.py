"""Find candidate images in a source: ImageFolder tree, CSV/JSONL manifest, Hugging Face datasets.

Sources only list files (path, label, split); decoding and hashing happen in `validate`.
Nothing here raises for a bad file: it becomes an `ExcludedFile` with a code and a reason.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.data.hf import load_hf_disk, load_hf_hub, scan_hf
from pipeline.data.imagefolder import scan_imagefolder
from pipeline.data.manifest import MANIFEST_SUFFIXES, scan_manifest
from pipeline.data.records import DatasetError, SourceListing, display_path
from pipeline.multilabel.labelsets import KEY_SEPARATOR
from pipeline.settings import cache_dir as default_cache_dir

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")

__all__ = ["SourceListing", "default_cache_dir", "discover", "scan_hf", "scan_imagefolder", "scan_manifest"]


# ----------------------------------------------------------------------------- dispatch




def _is_hf_object(source: Any) -> bool:
    mod = type(source).__module__ or ""
    return mod.startswith("datasets.") and hasattr(source, "column_names")


def _is_hf_disk_folder(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def discover(source: Any, *, cache_dir: str | os.PathLike | None = None, multi_label: bool | None = None,
             separator: str = KEY_SEPARATOR) -> SourceListing:
    """List the candidates of `source` (folder, manifest file, HF folder / hub id / object).

    `multi_label`: None detects label sets (manifests, HF sequence columns), True forces them (an
    ImageFolder image then has the one-label set of its folder), False refuses them."""
    listing = _discover(source, cache_dir=cache_dir, multi_label=multi_label, separator=separator)
    if multi_label and not listing.multi_label:
        listing.multi_label = True
        listing.candidates = [replace(c, labels=(c.label,)) for c in listing.candidates]
    return listing


def _discover(source: Any, *, cache_dir: str | os.PathLike | None, multi_label: bool | None,
              separator: str) -> SourceListing:
    image_cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir() / "hf-images"
    if _is_hf_object(source):
        return scan_hf(source, cache_dir=image_cache, name="in-memory", source="<datasets object>",
                       kind="hf_memory", multi_label=multi_label)
    if not isinstance(source, (str, os.PathLike)):
        raise DatasetError(
            f"unsupported dataset source {source!r}: pass a folder, a CSV/JSONL manifest, a folder "
            "saved with datasets' save_to_disk, or a Hugging Face hub id"
        )
    text = os.fspath(source)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    for prefix in ("hf://datasets/", "hf://", "hf:"):
        if text.startswith(prefix):
            return load_hf_hub(text[len(prefix):], cache_dir=image_cache, multi_label=multi_label)
    path = Path(text).expanduser()
    if path.is_dir():
        if _is_hf_disk_folder(path):
            return load_hf_disk(path, cache_dir=image_cache, multi_label=multi_label)
        return scan_imagefolder(path)
    if path.is_file():
        if path.suffix.lower() in MANIFEST_SUFFIXES:
            return scan_manifest(path, multi_label=multi_label, separator=separator)
        raise DatasetError(
            f"{display_path(path)} is a file but not a manifest: pass an image folder, or a "
            f"manifest ending in {', '.join(sorted(MANIFEST_SUFFIXES))} with path,label columns"
        )
    if os.path.lexists(path):
        raise DatasetError(_not_a_dataset(path))
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        try:
            return load_hf_hub(text, cache_dir=image_cache, multi_label=multi_label)
        except DatasetError as exc:
            raise DatasetError(
                f"no such file or folder {text!r} (relative to {os.getcwd()}), and as a Hugging "
                f"Face hub id: {exc}"
            ) from exc
    raise DatasetError(f"dataset path {display_path(path)} does not exist; check the path")


def _not_a_dataset(path: Path) -> str:
    """Why an existing path is neither a folder nor a file: a link loop, a broken link, ..."""
    shown = display_path(path)
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return (f"{shown} is a symbolic link loop (it resolves back to itself); point it at the "
                    "dataset folder or pass the real folder")
        if path.is_symlink():
            return (f"{shown} is a broken symbolic link (to {display_path(os.readlink(path))}); "
                    "fix the link or pass the real folder")
        return f"{shown} cannot be opened ({exc.strerror or exc}); check the path and its permissions"
    return (f"{shown} is neither a folder nor a regular file (a device, socket or pipe?); pass an "
            "image folder or a manifest")
