"""CSV / TSV / JSONL manifests: `path,label[,split]`, paths relative to the manifest's folder.

A path may not escape that folder: absolute paths, `..` that climbs out, and symbolic links that
resolve outside are excluded as `outside_root`.

Multi-label manifests: `path,labels[,split]` with the labels of a row separated by `|`
(`separator`), or in JSONL a list (`{"path": "a.jpg", "labels": ["cat", "dog"]}`). A row with an
empty label set is an image without any label (a negative for every label), not an error.
Detected when the label column is named `labels`/`tags`/`categories` (and no `label` column
exists) or a JSONL label is a list; `multi_label=True` forces it (a `label` column is then
split on the separator too), `multi_label=False` refuses it.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterable

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
from pipeline.multilabel.labelsets import KEY_SEPARATOR, label_key, parse_labels

MANIFEST_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
PATH_COLUMNS = ("path", "filepath", "file_path", "filename", "file", "image", "image_path")
LABEL_COLUMNS = ("label", "class", "class_name", "category", "target")
SPLIT_COLUMNS = ("split", "subset", "fold")
MULTI_LABEL_COLUMNS = ("labels", "tags", "categories", "classes")


def _pick_column(columns: Iterable[str], wanted: tuple[str, ...]) -> str | None:
    by_lower = {c.strip().lower(): c for c in columns if c is not None}
    for w in wanted:
        if w in by_lower:
            return by_lower[w]
    return None


def _read_manifest_rows(path: Path) -> Iterable[tuple[str, dict | None, str | None]]:
    """Yield (row_ref, row_dict or None, error) for each data row."""
    kind = MANIFEST_SUFFIXES[path.suffix.lower()]
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"manifest {display_path(path)} is not UTF-8 text ({exc}); re-save it as UTF-8") from exc
    except OSError as exc:
        raise DatasetError(f"cannot read manifest {display_path(path)}: {exc.strerror or exc}") from exc
    if kind in ("csv", "tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="," if kind == "csv" else "\t")
        try:
            for i, row in enumerate(reader, start=2):
                if None in row:  # more cells than header columns
                    yield f"{path.name}:{i}", None, "row has more cells than the header"
                    continue
                if all((v is None or not str(v).strip()) for v in row.values()):
                    continue  # blank line
                yield f"{path.name}:{i}", row, None
        except csv.Error as exc:
            raise DatasetError(f"manifest {display_path(path)} is not valid CSV: {exc}") from exc
        return
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"{path.name}:{i}", None, f"invalid JSON ({exc.msg})"
            continue
        if not isinstance(row, dict):
            yield f"{path.name}:{i}", None, "line is not a JSON object"
            continue
        yield f"{path.name}:{i}", row, None


def scan_manifest(path: Path, *, multi_label: bool | None = None, separator: str = KEY_SEPARATOR
                  ) -> SourceListing:
    """CSV/TSV/JSONL manifest with `path` and `label` (optional `split`) columns. Paths are
    relative to the manifest's folder and may not escape it (absolute paths, `..`, and symlinks
    that resolve outside are excluded as `outside_root`). `multi_label`: None detects label
    sets (module docstring), True / False forces; `separator` splits a cell into labels."""
    if multi_label and not separator:
        raise DatasetError("the multi-label separator must be a non-empty string, e.g. '|'")
    path = Path(os.path.abspath(path))
    root = os.path.dirname(os.fspath(path))
    root_real = os.path.realpath(root)
    listing = SourceListing(kind="manifest", name=path.stem, source=display_path(path))
    rows = list(_read_manifest_rows(path))
    columns: list[str] = []
    for _, row, _ in rows:
        if row is not None:
            columns.extend(k for k in row.keys() if isinstance(k, str) and k not in columns)
    if kind_is_csv(path) and not columns:
        columns = _csv_header(path)
    path_col = _pick_column(columns, PATH_COLUMNS)
    label_col = _pick_column(columns, LABEL_COLUMNS)
    sets_col = _pick_column(columns, MULTI_LABEL_COLUMNS)
    split_col = _pick_column(columns, SPLIT_COLUMNS)
    if multi_label:
        label_col = sets_col or label_col
    elif label_col is None:
        label_col = sets_col
    if path_col is None or label_col is None:
        raise DatasetError(
            f"manifest {display_path(path)} needs a path column ({'/'.join(PATH_COLUMNS)}) and a "
            f"label column ({'/'.join(LABEL_COLUMNS + MULTI_LABEL_COLUMNS)}); found columns: "
            f"{columns or 'none'}"
        )
    has_lists = any(row is not None and isinstance(row.get(label_col), list) for _, row, _ in rows)
    multi = bool(multi_label) if multi_label is not None else (label_col == sets_col or has_lists)
    listing.multi_label = multi
    if not multi:
        joined = sum(1 for _, row, _ in rows if row is not None and separator
                     and separator in str(row.get(label_col) or ""))
        if joined:
            listing.warnings.append(
                f"{joined} label(s) contain {separator!r}; if these are label sets, load with "
                "multi_label=True (--multi-label)")
    if split_col is not None and not any(
        row is not None and str(row.get(split_col) or "").strip() for _, row, _ in rows
    ):
        split_col = None  # present but empty everywhere: treat as unsplit
    for ref, row, error in rows:
        if row is None:
            listing.excluded.append(ExcludedFile(ref, "bad_row", error or "unreadable row"))
            continue
        raw_path = row.get(path_col)
        raw_label = row.get(label_col)
        raw_path = "" if raw_path is None else str(raw_path).strip()
        shown = display_path(raw_path) if raw_path else ref
        labels: tuple[str, ...] | None = None
        if multi:
            labels = tuple(display_path(v) for v in parse_labels(raw_label, separator))
            label = label_key(labels)
            bad = [v for v in labels if KEY_SEPARATOR in v]
            if bad:
                listing.excluded.append(ExcludedFile(
                    shown, "bad_row", f"{ref}: label {bad[0]!r} contains {KEY_SEPARATOR!r}, which "
                    "joins a label set; rename the label"))
                continue
        elif isinstance(raw_label, list):
            listing.excluded.append(ExcludedFile(
                shown, "bad_row", f"{ref}: the label is a list; load with multi_label=True "
                "(--multi-label) for several labels per image"))
            continue
        else:
            label = "" if raw_label is None else str(raw_label).strip()
        if not raw_path or (not label and not multi):
            listing.excluded.append(ExcludedFile(shown, "bad_row",
                                                 f"{ref}: empty {'path' if not raw_path else 'label'}"))
            continue
        split: str | None = None
        if split_col is not None:
            raw_split = str(row.get(split_col) or "").strip()
            split = normalise_split(raw_split)
            if split is None:
                listing.excluded.append(ExcludedFile(
                    shown, "bad_split",
                    f"{ref}: split {raw_split!r} is not one of train/val/test "
                    f"(accepted: {', '.join(sorted(SPLIT_ALIASES))})"))
                continue
        if os.path.isabs(raw_path) or raw_path.startswith("~"):
            listing.excluded.append(ExcludedFile(
                shown, "outside_root",
                f"{ref}: absolute paths are not allowed; write it relative to the manifest's folder"))
            continue
        joined = os.path.normpath(os.path.join(root, raw_path))
        if not is_within(joined, root):
            listing.excluded.append(ExcludedFile(
                shown, "outside_root", f"{ref}: '..' escapes the manifest's folder {display_path(root)}"))
            continue
        if not os.path.lexists(joined):
            listing.excluded.append(ExcludedFile(shown, "missing", f"{ref}: file does not exist"))
            continue
        if not is_within(os.path.realpath(joined), root_real):
            listing.excluded.append(ExcludedFile(
                shown, "outside_root",
                f"{ref}: symbolic link resolves outside the manifest's folder"))
            continue
        if os.path.isdir(joined):
            listing.excluded.append(ExcludedFile(shown, "bad_row", f"{ref}: path is a folder, not a file"))
            continue
        listing.candidates.append(Candidate(path=joined, display=shown, label=display_path(label),
                                            split=split, labels=labels))
    return listing


def kind_is_csv(path: Path) -> bool:
    return MANIFEST_SUFFIXES.get(path.suffix.lower()) in ("csv", "tsv")


def _csv_header(path: Path) -> list[str]:
    delim = "\t" if MANIFEST_SUFFIXES[path.suffix.lower()] == "tsv" else ","
    first = path.read_text(encoding="utf-8-sig").splitlines()[:1]
    return next(csv.reader(first, delimiter=delim), []) if first else []
