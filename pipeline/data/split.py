"""Seeded, stratified train/val/test assignment that does not depend on file listing order.

Within a class, files are ordered by sha256(f"{seed}:{content sha256}") — a pure function of the
content and the seed — so the same files give the same split on any machine, in any order.

Multi-label datasets (`plan_splits(..., multi_label=True)`, items carry label sets) are split by
iterative stratification (`pipeline.multilabel.stratify`), visiting files in the same
content-and-seed order: every label keeps its share in every split, and appears in every split
wherever it has enough images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pipeline.data.records import SPLITS, DatasetError
from pipeline.multilabel.stratify import iterative_stratify


@dataclass(frozen=True)
class SplitPlan:
    """How splits were decided, as recorded in the card."""

    strategy: str
    fractions: dict[str, float]
    notes: tuple[str, ...] = ()


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= float(value) < 1.0:
            raise DatasetError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise DatasetError(
            f"val_fraction + test_fraction must be below 1 (got {val_fraction} + {test_fraction}); "
            "nothing would be left to train on"
        )


def allocate(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """How many of `n` items go to each named held-out split; the rest stay in train.

    Rounds n*fraction; every split with a positive fraction gets at least one item when `n`
    leaves at least one for train (so a class with >= 3 images gets >= 1 in val and in test),
    and train always keeps at least one.
    """
    names = [k for k in fractions if fractions[k] > 0]
    counts = {k: int(n * fractions[k] + 0.5) for k in names}
    if n >= len(names) + 1:
        for k in names:
            counts[k] = max(1, counts[k])
    while n > 0 and names and sum(counts.values()) > n - 1:
        biggest = max(names, key=lambda k: (counts[k], k))
        if counts[biggest] == 0:
            break
        counts[biggest] -= 1
    return counts


def order_key(sha256: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()


def stratified_assign(
    items: Sequence[tuple[str, str]], fractions: dict[str, float], seed: int
) -> dict[str, str]:
    """Assign `(sha256, label)` items to `train` or one of `fractions`' splits, per label.

    Returns {sha256: split}. Held-out splits are filled in the order given by `fractions`.
    """
    by_label: dict[str, list[str]] = {}
    for sha, label in items:
        by_label.setdefault(label, []).append(sha)
    out: dict[str, str] = {}
    for label in sorted(by_label):
        shas = sorted(set(by_label[label]), key=lambda s: (order_key(s, seed), s))
        counts = allocate(len(shas), fractions)
        pos = 0
        for split_name in fractions:
            k = counts.get(split_name, 0)
            for sha in shas[pos:pos + k]:
                out[sha] = split_name
            pos += k
        for sha in shas[pos:]:
            out[sha] = "train"
    return out


def iterative_assign(
    items: Sequence[tuple[str, Sequence[str]]], fractions: dict[str, float], seed: int
) -> dict[str, str]:
    """Assign `(sha256, label set)` items to `train` or one of `fractions`' splits by iterative
    stratification over every label. Returns {sha256: split}."""
    unique = {sha: tuple(labels) for sha, labels in items}
    shas = sorted(unique, key=lambda s: (order_key(s, seed), s))
    vocab = sorted({lab for labels in unique.values() for lab in labels})
    col = {lab: j for j, lab in enumerate(vocab)}
    Y = np.zeros((len(shas), len(vocab)), dtype=bool)
    for i, sha in enumerate(shas):
        Y[i, [col[lab] for lab in unique[sha]]] = True
    names = ["train", *fractions]
    props = [1.0 - sum(fractions.values()), *fractions.values()]
    assigned = iterative_stratify(Y, props, seed=seed, order=np.arange(len(shas)))
    return {sha: names[int(j)] for sha, j in zip(shas, assigned)}


def plan_splits(
    items: Sequence[tuple[str, Any, str | None]], *, seed: int, val_fraction: float, test_fraction: float,
    multi_label: bool = False,
) -> tuple[dict[str, str], SplitPlan]:
    """Final split per sha256 for `(sha256, label, source_split)` items (`(sha256, label set,
    source_split)` with `multi_label`, split by iterative stratification).

    - every item has a source split and train, val, test are all present: kept as given;
    - train plus one of val/test: the missing one is carved out of train (its fraction of train,
      stratified, seeded);
    - no source splits (or no train split): seeded stratified train/val/test split of everything.
    """
    check_fractions(val_fraction, test_fraction)
    assign = iterative_assign if multi_label else stratified_assign
    how = "iterative-stratified" if multi_label else "stratified"
    present = {s for _, _, s in items if s is not None}
    all_tagged = all(s is not None for _, _, s in items)
    if all_tagged and "train" in present:
        assigned = {sha: s for sha, _, s in items}
        missing = [s for s in ("val", "test") if s not in present]
        if not missing:
            return assigned, SplitPlan("source", {})
        carve = {"val": val_fraction, "test": test_fraction}
        wanted = {s: carve[s] for s in missing if carve[s] > 0}
        if not wanted:
            return assigned, SplitPlan("source", {}, (f"no {' or '.join(missing)} split in the source "
                                                      "and its fraction is 0",))
        train_items = [(sha, label) for sha, label, s in items if s == "train"]
        # Carve the given fraction *of train*; fractions of train must leave train non-empty.
        total = sum(wanted.values())
        if total >= 1.0:
            raise DatasetError(f"cannot carve {wanted} out of train: fractions sum to {total} >= 1")
        carved = assign(train_items, wanted, seed)
        assigned.update(carved)
        names = " and ".join(wanted)
        return assigned, SplitPlan(
            f"source+carved:{','.join(wanted)}", dict(wanted),
            (f"{names} carved out of the source train split ({how}, seeded; fraction of train)",),
        )
    notes: tuple[str, ...] = ()
    if present and not all_tagged:
        notes = ("some files had a source split and some did not; all were re-split",)
    elif present:
        notes = (f"source splits {sorted(present)} have no train split; all files were re-split",)
    fractions = {"val": val_fraction, "test": test_fraction}
    assigned = assign([(sha, label) for sha, label, _ in items],
                      {k: v for k, v in fractions.items() if v > 0}, seed)
    return assigned, SplitPlan(
        how,
        {"train": round(1.0 - val_fraction - test_fraction, 10), "val": val_fraction, "test": test_fraction},
        notes,
    )


__all__ = ["SPLITS", "SplitPlan", "allocate", "check_fractions", "iterative_assign", "plan_splits",
           "stratified_assign"]
