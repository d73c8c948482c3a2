"""Hugging Face `datasets` sources: a `save_to_disk` folder, a hub id, or an in-memory object.

Image bytes are written to a cache folder keyed by content hash so every record has a real path.
Hub ids need hub access; offline, the error says how to bring the dataset over with save_to_disk.

Multi-label: a label column that is a sequence (``Sequence(ClassLabel)`` / ``List(ClassLabel)``,
or a list of strings) gives each row a label set (an empty list: an image without a label).
Detected from the feature type; ``multi_label=True`` forces label sets (a plain ClassLabel row
becomes a one-label set), ``multi_label=False`` refuses a sequence column.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.data.records import (
    Candidate,
    DatasetError,
    ExcludedFile,
    SourceListing,
    display_path,
    normalise_split,
)
from pipeline.images import file_extension, sha256_bytes
from pipeline.multilabel.labelsets import KEY_SEPARATOR, label_key

def _import_datasets():
    try:
        import datasets  # noqa: PLC0415 - heavy, only when a HF source is used
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise DatasetError("Hugging Face sources need the `datasets` package: pip install datasets") from exc
    return datasets


def load_hf_disk(path: Path, *, cache_dir: Path, multi_label: bool | None = None) -> SourceListing:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    datasets = _import_datasets()
    try:
        obj = datasets.load_from_disk(os.fspath(path))
    except Exception as exc:
        raise DatasetError(
            f"{display_path(path)} looks like a datasets save_to_disk folder but cannot be loaded: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return scan_hf(obj, cache_dir=cache_dir, name=path.name, source=display_path(os.path.abspath(path)),
                   kind="hf_disk", multi_label=multi_label)


def load_hf_hub(repo_id: str, *, cache_dir: Path, multi_label: bool | None = None) -> SourceListing:
    """`datasets.load_dataset(repo_id)`; offline machines get a DatasetError naming the fix."""
    datasets = _import_datasets()
    fix = (
        f"on a machine with hub access run `datasets.load_dataset({repo_id!r}).save_to_disk(DIR)`, "
        "copy DIR here and pass that folder instead of the hub id"
    )
    try:
        obj = datasets.load_dataset(repo_id)
    except Exception as exc:
        raise DatasetError(
            f"could not load Hugging Face dataset {repo_id!r} from the hub "
            f"({type(exc).__name__}: {exc}); {fix}"
        ) from exc
    return scan_hf(obj, cache_dir=cache_dir, name=repo_id, source=f"hf://{repo_id}", kind="hf_hub",
                   multi_label=multi_label)


def _hf_columns(ds: Any, where: str) -> tuple[str, str]:
    datasets = _import_datasets()
    features = ds.features
    names = list(features.keys())
    image_col = next((c for c in ("image", "img") if c in features), None)
    if image_col is None:
        image_col = next((c for c in names if isinstance(features[c], datasets.Image)), None)
    label_col = next((c for c in ("label", "labels") if c in features), None)
    if label_col is None:
        label_col = next((c for c in names if isinstance(features[c], datasets.ClassLabel)
                          or isinstance(getattr(features[c], "feature", None), datasets.ClassLabel)), None)
    if image_col is None or label_col is None:
        raise DatasetError(
            f"{where}: needs an image column ('image' or an Image feature) and a label column "
            f"('label' or a ClassLabel feature); found columns {names}"
        )
    return image_col, label_col


def _write_cached(data: bytes, cache_dir: Path) -> str:
    sha = sha256_bytes(data)
    ext = file_extension(data, ".img")
    target = cache_dir / sha[:2] / f"{sha}{ext}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return os.fspath(target)


def scan_hf(obj: Any, *, cache_dir: Path, name: str, source: str, kind: str,
            multi_label: bool | None = None) -> SourceListing:
    """A `datasets.Dataset` or `DatasetDict` with image + label columns. Image bytes are written
    to `cache_dir/<sha[:2]>/<sha>.<ext>` so every record has a real path."""
    datasets = _import_datasets()
    listing = SourceListing(kind=kind, name=name, source=source)
    if isinstance(obj, datasets.DatasetDict):
        parts: list[tuple[str, str | None, Any]] = []
        for key in sorted(obj.keys()):
            split = normalise_split(key)
            parts.append((key, split, obj[key]))
        if not any(split for _, split, _ in parts):
            listing.warnings.append(
                f"no split named train/val/test among {sorted(obj.keys())}; all rows pooled and split")
            parts = [(key, None, ds) for key, _, ds in parts]
        else:
            for key, split, ds in parts:
                if split is None:
                    listing.warnings.append(f"split {key!r} ({ds.num_rows} rows) ignored: not train/val/test")
            parts = [p for p in parts if p[1] is not None]
    elif isinstance(obj, datasets.Dataset):
        parts = [(obj.split and str(obj.split) or "data", None, obj)]
    else:
        raise DatasetError(f"expected a datasets.Dataset or DatasetDict, got {type(obj).__name__}")

    cache_dir.mkdir(parents=True, exist_ok=True)
    columns = [(key, split, ds, *_hf_columns(ds, f"{source} split {key!r}")) for key, split, ds in parts]
    sequence = [key for key, _, ds, _, label_col in columns
                if getattr(ds.features[label_col], "feature", None) is not None]
    if multi_label is False and sequence:
        raise DatasetError(f"{source}: the label column of split {sequence[0]!r} holds label lists; "
                           "load it with multi_label=True (--multi-label)")
    listing.multi_label = bool(multi_label) if multi_label is not None else bool(sequence)
    for key, split, ds, image_col, label_col in columns:
        label_feature = ds.features[label_col]
        inner = getattr(label_feature, "feature", None)
        label_feature = inner if inner is not None else label_feature
        names = label_feature.names if isinstance(label_feature, datasets.ClassLabel) else None
        image_feature = ds.features[image_col]
        view = ds.select_columns([image_col, label_col])
        if isinstance(image_feature, datasets.Image):
            view = view.cast_column(image_col, datasets.Image(decode=False))
        index = 0
        for batch in view.iter(batch_size=256):
            for value, label_value in zip(batch[image_col], batch[label_col], strict=True):
                ref = f"{key}[{index}]"
                index += 1
                if listing.multi_label:
                    labels = _hf_label_set(listing, ref, label_value, names)
                    if labels is None:
                        continue
                    _hf_row(listing, ref, value, label_key(labels), None, split, cache_dir, labels)
                else:
                    _hf_row(listing, ref, value, label_value, names, split, cache_dir)
    return listing


def _hf_label_set(listing: SourceListing, ref: str, value: Any, names: list[str] | None
                  ) -> tuple[str, ...] | None:
    """A row's label set (names for ClassLabel ids), or None after excluding a bad row."""
    values = [] if value is None else (list(value) if isinstance(value, (list, tuple)) else [value])
    out = set()
    for v in values:
        if names is not None and not (isinstance(v, int) and 0 <= v < len(names)):
            listing.excluded.append(ExcludedFile(ref, "bad_row", f"label id {v!r} is not a class "
                                                 f"of the column (0..{len(names) - 1})"))
            return None
        lab = display_path(names[v] if names is not None else str(v).strip())
        if KEY_SEPARATOR in lab:
            listing.excluded.append(ExcludedFile(ref, "bad_row", f"label {lab!r} contains "
                                                 f"{KEY_SEPARATOR!r}, which joins a label set"))
            return None
        if lab:
            out.add(lab)
    return tuple(sorted(out))


def _hf_row(listing: SourceListing, ref: str, value: Any, label_value: Any, names: list[str] | None,
            split: str | None, cache_dir: Path, labels: tuple[str, ...] | None = None) -> None:
    # a multi-label row (labels given) was checked by _hf_label_set; an empty set is allowed
    if labels is None and (label_value is None
                           or (names is not None and not (0 <= int(label_value) < len(names)))):
        listing.excluded.append(ExcludedFile(ref, "unlabelled", f"label {label_value!r} is missing or -1"))
        return
    label = names[int(label_value)] if names is not None else str(label_value)
    data: bytes | None = None
    src_path: str | None = None
    if isinstance(value, dict):
        data = value.get("bytes")
        src_path = value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        src_path = value
    shown = ref + (f" ({display_path(os.path.basename(src_path))})" if src_path else "")
    if data is None and src_path:
        try:
            with open(src_path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            listing.excluded.append(ExcludedFile(shown, "unreadable",
                                                 f"image path {display_path(src_path)}: {exc.strerror or exc}"))
            return
    if data is None:
        listing.excluded.append(ExcludedFile(shown, "unreadable", "row has neither image bytes nor a path"))
        return
    path = _write_cached(bytes(data), cache_dir)
    listing.candidates.append(Candidate(path=path, display=shown, label=display_path(label), split=split,
                                        labels=labels))
