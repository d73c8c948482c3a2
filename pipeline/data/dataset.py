"""`load_dataset`: discover -> validate -> de-duplicate -> split -> card.

Multi-label (`load_dataset(..., multi_label=None|True|False)`; None detects label sets, see
`pipeline.data.manifest` / `pipeline.data.hf`): records carry their label set in
`ImageRecord.labels` and its key (`"cat|dog"`, `""` for none) in `ImageRecord.label`;
`Dataset.multi_label` says so, `Dataset.classes` lists the labels and
`Dataset.label_matrix(split)` gives the (N, L) indicator. Identical bytes listed with different
label sets are merged into one image carrying the union (single-label: excluded as conflicts).
Splits are made by iterative stratification; the card adds per-label counts, label cardinality,
the most frequent label pairs and the images without a label.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from pipeline.data.card import DatasetCard, dataset_hash, imbalance, label_set_stats
from pipeline.data.records import SPLITS, DatasetError, ExcludedFile, ImageRecord
from pipeline.data.sources import SourceListing, discover
from pipeline.data.split import check_fractions, plan_splits
from pipeline.data.validate import CheckedFile, check_files
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.multilabel.labelsets import KEY_SEPARATOR, binarize, label_key

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

    @property
    def multi_label(self) -> bool:
        """True when images carry label sets (`ImageRecord.labels`)."""
        return bool(self.card.multi_label)

    def label_matrix(self, split: str | None = None) -> np.ndarray:
        """(N, L) uint8 indicator of the records' labels (of one split, or all), columns in
        `classes` order; for a single-label dataset, the one-hot matrix."""
        records = self.records if split is None else self.split(split)
        return binarize([r.labels for r in records], self.classes)

    def split(self, name: str) -> list[ImageRecord]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; splits are {', '.join(SPLITS)}")
        return [r for r in self.records if r.split == name]

    def __len__(self) -> int:
        return len(self.records)


def _dedupe(checked: list[CheckedFile], multi_label: bool = False
            ) -> tuple[list[CheckedFile], list[ExcludedFile], list[list[str]], list[list[str]], int]:
    """Identical bytes: one label -> keep the first (train before val before test, then path);
    several labels -> exclude them all as `label_conflict`, or with `multi_label` keep the first
    carrying the union of the label sets (the last value counts such merges)."""
    groups: dict[str, list[CheckedFile]] = {}
    for c in checked:
        groups.setdefault(c.sha256, []).append(c)
    kept: list[CheckedFile] = []
    excluded: list[ExcludedFile] = []
    duplicates: list[list[str]] = []
    conflicts: list[list[str]] = []
    merged = 0
    for sha in sorted(groups):
        members = sorted(groups[sha], key=lambda c: (_SPLIT_RANK[c.candidate.split], c.candidate.display))
        labels = sorted({c.candidate.label for c in members})
        if multi_label and len(labels) > 1:
            union = tuple(sorted({lab for c in members for lab in (c.candidate.labels or ())}))
            first = members[0]
            members[0] = replace(first, candidate=replace(first.candidate, labels=union,
                                                          label=label_key(union)))
            merged += 1
        elif len(labels) > 1:
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
    return kept, excluded, duplicates, conflicts, merged


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
    multi_label: bool | None = None,
    label_separator: str = KEY_SEPARATOR,
) -> Dataset:
    """Load and validate a labelled image dataset.

    `source`: an ImageFolder tree (`<class>/…` or `<split>/<class>/…`), a CSV/TSV/JSONL manifest
    (`path,label[,split]`, paths relative to the manifest), a folder written by datasets'
    `save_to_disk`, a Hugging Face hub id (needs hub access), a `datasets` object, or the
    `SourceListing` that `pipeline.data.sources.discover` made of one of these (listing is quick
    and fails on a missing path or an unknown layout; checking every file is the slow part).
    Every file is fully decoded; bad ones are excluded with a code and listed in the card.
    Without source splits, a seeded stratified train/val/test split is made.
    `cache_dir` holds images extracted from HF datasets (default `$TLPIPE_CACHE_DIR/hf-images`).
    `multi_label`: None detects label sets (a `labels` manifest column or JSONL lists, a HF
    sequence-of-ClassLabel column), True forces them, False refuses them; `label_separator`
    splits a manifest cell into labels (module docstring).
    Raises `DatasetError` when nothing usable is left or fewer than two classes remain.
    """
    check_fractions(val_fraction, test_fraction)
    if max_pixels <= 0:
        raise DatasetError(f"max_pixels must be positive, got {max_pixels}")
    listing: SourceListing = source if isinstance(source, SourceListing) else discover(
        source, cache_dir=cache_dir, multi_label=multi_label, separator=label_separator)
    multi = listing.multi_label
    results = check_files(listing.candidates, max_pixels=max_pixels, workers=workers, progress=progress)
    checked = [r for r in results if isinstance(r, CheckedFile)]
    excluded = list(listing.excluded) + [r for r in results if isinstance(r, ExcludedFile)]
    kept, conflict_excluded, duplicates, conflicts, merged = _dedupe(checked, multi)
    excluded += conflict_excluded
    excluded.sort(key=lambda e: (e.path, e.code))

    if not kept:
        raise DatasetError(_nothing_usable(listing, excluded))
    if multi:
        labels = sorted({lab for c in kept for lab in (c.candidate.labels or ())})
    else:
        labels = sorted({c.candidate.label for c in kept})
    if multi and len(labels) < 2:
        raise DatasetError(
            f"{listing.source}: {len(labels)} distinct label(s) ({', '.join(map(repr, labels)) or 'none'}) "
            f"over {len(kept)} images — multi-label classification needs at least two labels"
        )
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
        [(c.sha256, (c.candidate.labels or ()) if multi else c.candidate.label, c.candidate.split)
         for c in kept],
        seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, multi_label=multi,
    )
    records = sorted(
        (ImageRecord(path=c.candidate.path, label=c.candidate.label, split=assigned[c.sha256],
                     sha256=c.sha256, width=c.width, height=c.height,
                     labels=tuple(c.candidate.labels or ()) if multi else (c.candidate.label,))
         for c in kept),
        key=lambda r: (_SPLIT_RANK[r.split], r.label, r.sha256),
    )
    counts = {s: {c: 0 for c in labels} for s in SPLITS}
    for r in records:
        for lab in r.labels:
            counts[r.split][lab] += 1

    warnings = list(listing.warnings) + list(plan.notes)
    missing_train = [c for c in labels if counts["train"][c] == 0]
    if missing_train:
        warnings.append(f"classes with no training image: {', '.join(missing_train)}")
    for s in ("val", "test"):
        absent = [c for c in labels if counts[s][c] == 0]
        if absent and sum(counts[s].values()) > 0:
            warnings.append(f"classes absent from {s}: {', '.join(absent)}")
    all_labels = ({lab for c in listing.candidates for lab in (c.labels or ())} if multi
                  else {c.label for c in listing.candidates})
    lost = sorted(all_labels - set(labels))
    if lost:
        warnings.append(f"classes with no usable image (all excluded): {', '.join(lost)}")
    ml_fields = {}
    if multi:
        cardinality, pairs = label_set_stats(r.labels for r in records)
        ml_fields = dict(
            multi_label=True, label_cardinality=cardinality, cooccurrence=pairs,
            image_counts={s: sum(1 for r in records if r.split == s) for s in SPLITS},
            unlabelled={s: sum(1 for r in records if r.split == s and not r.labels) for s in SPLITS},
        )
        if merged:
            warnings.append(f"{merged} identical image(s) were listed with different label sets; "
                            "each was kept once with the union of its labels")

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
        **ml_fields,
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
