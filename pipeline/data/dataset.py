"""`load_dataset`: discover -> validate -> de-duplicate -> split -> card."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.data.card import DatasetCard, dataset_hash, imbalance
from pipeline.data.records import SPLITS, DatasetError, ExcludedFile, ImageRecord
from pipeline.data.sources import SourceListing, discover
from pipeline.data.split import check_fractions, plan_splits
from pipeline.data.validate import CheckedFile, check_files
from pipeline.images import DEFAULT_MAX_PIXELS

_SPLIT_RANK = {"train": 0, "val": 1, "test": 2, None: 3}


@dataclass
class Dataset:
    records: list[ImageRecord]
    card: DatasetCard

    @property
    def classes(self) -> list[str]:
        return list(self.card.classes)

    @property
    def class_to_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.card.classes)}

    def split(self, name: str) -> list[ImageRecord]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; splits are {', '.join(SPLITS)}")
        return [r for r in self.records if r.split == name]

    def __len__(self) -> int:
        return len(self.records)


def _dedupe(checked: list[CheckedFile]) -> tuple[list[CheckedFile], list[ExcludedFile],
                                                   list[list[str]], list[list[str]]]:
    """Identical bytes: one label -> keep the first (train before val before test, then path);
    several labels -> exclude them all as `label_conflict`."""
    groups: dict[str, list[CheckedFile]] = {}
    for c in checked:
        groups.setdefault(c.sha256, []).append(c)
    kept: list[CheckedFile] = []
    excluded: list[ExcludedFile] = []
    duplicates: list[list[str]] = []
    conflicts: list[list[str]] = []
    for sha in sorted(groups):
        members = sorted(groups[sha], key=lambda c: (_SPLIT_RANK[c.candidate.split], c.candidate.display))
        labels = sorted({c.candidate.label for c in members})
        if len(labels) > 1:
            conflicts.append([c.candidate.display for c in members])
            for c in members:
                others = ", ".join(f"{o.candidate.display} ({o.candidate.label})" for o in members if o is not c)
                excluded.append(ExcludedFile(
                    c.candidate.display, "label_conflict",
                    f"identical bytes are labelled {c.candidate.label!r} here and differently at {others}"))
            continue
        kept.append(members[0])
        if len(members) > 1:
            duplicates.append([c.candidate.display for c in members])
    return kept, excluded, duplicates, conflicts


def load_dataset(
    source: Any,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cache_dir: str | os.PathLike | None = None,
    name: str | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Dataset:
    """Load and validate a labelled image dataset.

    `source`: an ImageFolder tree (`<class>/…` or `<split>/<class>/…`), a CSV/TSV/JSONL manifest
    (`path,label[,split]`, paths relative to the manifest), a folder written by datasets'
    `save_to_disk`, a Hugging Face hub id (needs hub access), or a `datasets` object.
    Every file is fully decoded; bad ones are excluded with a code and listed in the card.
    Without source splits, a seeded stratified train/val/test split is made.
    `cache_dir` holds images extracted from HF datasets (default `$TLPIPE_CACHE_DIR/hf-images`).
    Raises `DatasetError` when nothing usable is left or fewer than two classes remain.
    """
    check_fractions(val_fraction, test_fraction)
    if max_pixels <= 0:
        raise DatasetError(f"max_pixels must be positive, got {max_pixels}")
    listing: SourceListing = discover(source, cache_dir=cache_dir)
    results = check_files(listing.candidates, max_pixels=max_pixels, workers=workers, progress=progress)
    checked = [r for r in results if isinstance(r, CheckedFile)]
    excluded = list(listing.excluded) + [r for r in results if isinstance(r, ExcludedFile)]
    kept, conflict_excluded, duplicates, conflicts = _dedupe(checked)
    excluded += conflict_excluded
    excluded.sort(key=lambda e: (e.path, e.code))

    if not kept:
        raise DatasetError(_nothing_usable(listing, excluded))
    labels = sorted({c.candidate.label for c in kept})
    if len(labels) < 2:
        hint = ""
        if listing.kind == "imagefolder":
            hint = (" If this folder wraps the dataset (e.g. <folder>/<name>/<class>/...), pass the "
                    "inner folder.")
        raise DatasetError(
            f"{listing.source}: only one class ({labels[0]!r}, {len(kept)} images) — a classifier needs "
            f"at least two.{hint}"
        )

    assigned, plan = plan_splits(
        [(c.sha256, c.candidate.label, c.candidate.split) for c in kept],
        seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
    )
    records = sorted(
        (ImageRecord(path=c.candidate.path, label=c.candidate.label, split=assigned[c.sha256],
                     sha256=c.sha256, width=c.width, height=c.height) for c in kept),
        key=lambda r: (_SPLIT_RANK[r.split], r.label, r.sha256),
    )
    counts = {s: {c: 0 for c in labels} for s in SPLITS}
    for r in records:
        counts[r.split][r.label] += 1

    warnings = list(listing.warnings) + list(plan.notes)
    missing_train = [c for c in labels if counts["train"][c] == 0]
    if missing_train:
        warnings.append(f"classes with no training image: {', '.join(missing_train)}")
    for s in ("val", "test"):
        absent = [c for c in labels if counts[s][c] == 0]
        if absent and sum(counts[s].values()) > 0:
            warnings.append(f"classes absent from {s}: {', '.join(absent)}")
    all_labels = {c.label for c in listing.candidates}
    lost = sorted(all_labels - set(labels))
    if lost:
        warnings.append(f"classes with no usable image (all excluded): {', '.join(lost)}")

    card = DatasetCard(
        name=name or listing.name,
        source=listing.source,
        source_kind=listing.kind,
        classes=labels,
        counts=counts,
        imbalance_ratio=imbalance(counts, labels),
        excluded=excluded,
        duplicates=duplicates,
        label_conflicts=conflicts,
        dataset_hash=dataset_hash((r.sha256, r.label, r.split) for r in records),
        split_strategy=plan.strategy,
        seed=seed,
        fractions=dict(plan.fractions),
        empty_classes=sorted(listing.empty_classes),
        ignored=sorted(listing.ignored),
        warnings=warnings,
        max_pixels=max_pixels,
    )
    return Dataset(records=records, card=card)


def _nothing_usable(listing: SourceListing, excluded: list[ExcludedFile]) -> str:
    if not listing.candidates and not excluded:
        what = "no image files"
        if listing.ignored:
            what += f" ({len(listing.ignored)} non-image files ignored, e.g. {listing.ignored[0]})"
        return (f"{listing.source}: {what}; expected <class>/<image> folders, a manifest, or a HF "
                "dataset with image and label columns")
    codes: dict[str, int] = {}
    for e in excluded:
        codes[e.code] = codes.get(e.code, 0) + 1
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(codes.items()))
    example = excluded[0]
    fixes = [FIX_HINTS[c] for c in sorted(codes, key=lambda c: -codes[c]) if c in FIX_HINTS]
    fix = "; ".join(dict.fromkeys(fixes)) or "replace or remove the excluded files"
    return (f"{listing.source}: no usable images — all {len(excluded)} entries were excluded "
            f"({summary}; e.g. {example.path}: {example.reason}). To fix: {fix}; "
            "`tlpipe validate` lists every excluded file with its reason")


#: what to do about each exclusion code, for the one-line "nothing usable" error
FIX_HINTS: dict[str, str] = {
    "empty": "re-copy the 0-byte files",
    "not_image": "remove files that are not images (or give them their real extension)",
    "truncated": "re-download or re-export the truncated images",
    "corrupt": "re-export the corrupt images",
    "too_many_pixels": "downscale the oversized images or raise max_pixels if they are genuine",
    "unsupported_mode": "convert the images to RGB",
    "unreadable": "check the files' permissions and broken links",
    "outside_root": "manifest paths must stay inside the manifest's folder: move the images "
                    "under it (or the manifest above them) and write relative paths",
    "missing": "fix the manifest paths (relative to the manifest's folder)",
    "bad_row": "give every manifest row a path and a label",
    "bad_split": "use train/val/test in the split column",
    "symlink_loop": "replace symbolic links that point back into the dataset with real class folders",
    "symlink_revisit": "remove symbolic links to folders that are already part of the dataset",
    "unlabelled": "move the images into <class>/ (or <split>/<class>/) folders",
    "label_conflict": "give identical images a single label",
}
