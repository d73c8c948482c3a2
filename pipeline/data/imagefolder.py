"""ImageFolder trees: `<class>/...` or `<split>/<class>/...`.

Hidden entries (dot-prefixed, `__MACOSX`, a NAS's `@eaDir` thumbnails) are skipped, non-image extensions are listed as
ignored, symlinked folders are followed unless they loop or revisit a scanned folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.data.records import (
    SPLIT_ALIASES,
    Candidate,
    DatasetError,
    ExcludedFile,
    SourceListing,
    display_path,
    is_within,
    normalise_split,
)
from pipeline.images import IMAGE_EXTENSIONS

# folders that tools add beside the data: a macOS zip's resource forks, a Synology NAS's
# thumbnails (JPEGs of the photos beside them: read as data they would leak test images into train)
IGNORED_DIR_NAMES = frozenset({"__MACOSX", "@eaDir"})


def is_hidden(name: str) -> bool:
    """A folder entry that is never data: dot-prefixed (AppleDouble `._x.jpg`, `.DS_Store`) or a
    tool's folder (`IGNORED_DIR_NAMES`)."""
    return name.startswith(".") or name in IGNORED_DIR_NAMES


def _scandir_sorted(path: str) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def scan_imagefolder(root: Path) -> SourceListing:
    """`root/<class>/...` or `root/<split>/<class>/...` (split folders: train, val/validation/
    valid/dev, test). Hidden entries are skipped; images in nested folders keep their class."""
    root_str = os.path.abspath(os.fspath(root))
    listing = SourceListing(kind="imagefolder", name=os.path.basename(root_str) or root_str,
                            source=display_path(root_str))
    try:
        entries = [e for e in _scandir_sorted(root_str) if not is_hidden(e.name)]
    except OSError as exc:
        raise DatasetError(f"cannot list {display_path(root_str)}: {exc.strerror or exc}") from exc
    top_dirs = [e for e in entries if _entry_is_dir(e)]
    top_files = [e for e in entries if not _entry_is_dir(e)]
    split_dirs = [e for e in top_dirs if normalise_split(e.name) is not None]

    if split_dirs and len(split_dirs) != len(top_dirs):
        others = sorted(e.name for e in top_dirs if normalise_split(e.name) is None)
        raise DatasetError(
            f"{display_path(root_str)} mixes split folders ({', '.join(e.name for e in split_dirs)}) "
            f"with other folders ({', '.join(display_path(o) for o in others)}); use either "
            f"<split>/<class>/ (splits: {', '.join(sorted(set(SPLIT_ALIASES)))}) or <class>/ "
            "throughout, or pass a manifest"
        )

    visited: set[str] = {os.path.realpath(root_str)}
    class_roots: list[tuple[os.DirEntry, str, str | None]] = []  # (entry, label, split)
    if split_dirs:
        for split_entry in split_dirs:
            split = normalise_split(split_entry.name)
            visited.add(os.path.realpath(split_entry.path))
            try:
                inner = [e for e in _scandir_sorted(split_entry.path) if not is_hidden(e.name)]
            except OSError as exc:
                listing.excluded.append(ExcludedFile(display_path(split_entry.name), "unreadable",
                                                     f"cannot list split folder: {exc.strerror or exc}"))
                continue
            for e in inner:
                if _entry_is_dir(e):
                    class_roots.append((e, e.name, split))
                else:
                    _loose_file(listing, e, f"{split_entry.name}/{e.name}")
    else:
        class_roots = [(e, e.name, None) for e in top_dirs]
    for e in top_files:
        _loose_file(listing, e, e.name)

    kept_roots: list[tuple[os.DirEntry, str, str | None]] = []
    for entry, label, split in class_roots:
        target = os.path.realpath(entry.path)
        rel = display_path(os.path.relpath(entry.path, root_str))
        if is_within(os.path.realpath(os.path.dirname(entry.path)), target):
            listing.excluded.append(ExcludedFile(
                rel, "symlink_loop", "symbolic link to a folder that contains it (loop); not followed"))
        elif target in visited:
            listing.excluded.append(ExcludedFile(
                rel, "symlink_revisit", "symbolic link to a folder that is already scanned; not followed"))
        else:
            visited.add(target)
            kept_roots.append((entry, label, split))
    for entry, label, split in kept_roots:
        rel = os.path.relpath(entry.path, root_str)
        before = len(listing.candidates)
        _walk_class(listing, entry.path, root_str, display_path(label), split, visited)
        if len(listing.candidates) == before:
            listing.empty_classes.append(display_path(rel))
    if listing.empty_classes:
        listing.warnings.append(
            f"{len(listing.empty_classes)} class folder(s) hold no image files: "
            + ", ".join(listing.empty_classes)
        )
    return listing


def _entry_is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks; loops are caught while walking
    except OSError:
        return False


def _loose_file(listing: SourceListing, entry: os.DirEntry, rel: str) -> None:
    if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
        listing.excluded.append(ExcludedFile(
            display_path(rel), "unlabelled",
            "image is not inside a class folder; move it into <class>/ (or <split>/<class>/)",
        ))
    else:
        listing.ignored.append(display_path(rel))


def _walk_class(listing: SourceListing, class_dir: str, root: str, label: str,
                split: str | None, visited: set[str]) -> None:
    stack = [class_dir]
    while stack:
        current = stack.pop()
        current_real = os.path.realpath(current)
        try:
            entries = _scandir_sorted(current)
        except OSError as exc:
            listing.excluded.append(ExcludedFile(display_path(os.path.relpath(current, root)),
                                                 "unreadable",
                                                 f"cannot list folder: {exc.strerror or exc}"))
            continue
        subdirs: list[str] = []
        for e in entries:
            if is_hidden(e.name):
                continue
            rel = display_path(os.path.relpath(e.path, root))
            try:
                is_dir = e.is_dir()
            except OSError as exc:
                listing.excluded.append(ExcludedFile(rel, "unreadable", f"cannot stat: {exc}"))
                continue
            if is_dir:
                target = os.path.realpath(e.path)
                if is_within(current_real, target):
                    listing.excluded.append(ExcludedFile(
                        rel, "symlink_loop",
                        "symbolic link to a folder that contains it (loop); not followed"))
                    continue
                if target in visited:
                    listing.excluded.append(ExcludedFile(
                        rel, "symlink_revisit",
                        "links to a folder that is already scanned; not followed"))
                    continue
                visited.add(target)
                subdirs.append(e.path)
                continue
            if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                listing.candidates.append(Candidate(path=e.path, display=rel, label=label, split=split))
            else:
                listing.ignored.append(rel)
        stack.extend(reversed(subdirs))
