"""Fold assignment for selection: stratified k-fold on train+val, or the validation split.

Folds are assigned once per dataset from the images' content hashes, so every backbone, head and
ensemble of a sweep is scored on exactly the same held-out images (paired comparisons need that).
An image's fold depends only on its id, label, the seed and the set of ids of its class: a
backbone that failed to embed a few images still sees the others in the same folds.

Layout: ``folds`` is an int array (R, N) — R repeats of an assignment of the N train+val rows;
``fold >= 0`` means "held out in that fold", ``-1`` means "always trained on" (the train split when
selection uses the validation split).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

#: above this many train+val images, selection uses the validation split instead of k-fold CV
CV_MAX_ROWS = 20_000
DEFAULT_K = 5
#: below this many train+val images, k-fold CV is repeated and out-of-fold probabilities averaged
TINY_ROWS = 300
TINY_REPEATS = 3


@dataclass(frozen=True)
class SelectionPlan:
    """How candidates are scored: `mode` "cv" (k-fold on train+val, repeated `repeats` times) or
    "val" (fit on train, score on the validation split)."""

    mode: str
    k: int
    repeats: int
    n_rows: int
    n_selection: int

    def describe(self) -> str:
        if self.mode == "val":
            return f"validation split ({self.n_selection} images)"
        rep = f", repeated {self.repeats}x" if self.repeats > 1 else ""
        return f"{self.k}-fold CV on train+val{rep} ({self.n_selection} images)"

    def to_dict(self) -> dict:
        return {"mode": self.mode, "k": self.k, "repeats": self.repeats, "n_rows": self.n_rows,
                "n_selection": self.n_selection, "describe": self.describe()}


def _rank_key(seed: int, repeat: int, sha: str) -> str:
    return hashlib.sha256(f"{seed}:{repeat}:{sha}".encode()).hexdigest()


def plan_selection(labels, splits, *, k: int = DEFAULT_K, cv_max_rows: int = CV_MAX_ROWS,
                   mode: str = "auto") -> SelectionPlan:
    """Choose CV or the validation split for rows with these labels and split names."""
    _, counts = np.unique(np.asarray(labels, dtype=str), return_counts=True)
    return plan_from_counts(len(labels), splits, counts, k=k, cv_max_rows=cv_max_rows, mode=mode)


def plan_from_counts(n: int, splits, counts, *, k: int = DEFAULT_K, cv_max_rows: int = CV_MAX_ROWS,
                     mode: str = "auto") -> SelectionPlan:
    """`plan_selection`'s rule for `n` rows with these split names, given how many rows carry each
    label (`counts`: per class, or per label of a multi-label set; zeros are ignored)."""
    splits = np.asarray(splits, dtype=str)
    n_val = int((splits == "val").sum())
    if mode not in ("auto", "cv", "val"):
        raise ValueError(f"selection mode must be 'auto', 'cv' or 'val', got {mode!r}")
    if mode == "val" or (mode == "auto" and n > cv_max_rows and n_val > 0):
        if n_val == 0:
            raise ValueError("selection on the validation split needs a validation split; "
                             "use mode='cv' or add val/ images")
        return SelectionPlan("val", 1, 1, n, n_val)
    if n == 0:
        raise ValueError("no train+val images to select on")
    counts = np.asarray(counts)
    counts = counts[counts > 0]
    rarest = int(counts.min()) if len(counts) else 2
    # every fold must be able to hold out at least one image of the rarest class
    kk = int(max(2, min(int(k), rarest if rarest >= 2 else 2)))
    repeats = TINY_REPEATS if n < TINY_ROWS else 1
    return SelectionPlan("cv", kk, repeats, n, n)


def assign_folds(ids, labels, splits, plan: SelectionPlan, *, seed: int = 0) -> np.ndarray:
    """(R, N) fold of each row per repeat (see module docstring)."""
    ids = [str(i) for i in ids]
    labels = np.asarray(labels, dtype=str)
    splits = np.asarray(splits, dtype=str)
    n = len(ids)
    if plan.mode == "val":
        return np.where(splits == "val", 0, -1).astype(np.int64)[None, :]
    out = np.empty((plan.repeats, n), dtype=np.int64)
    for r in range(plan.repeats):
        for label in np.unique(labels):
            rows = np.flatnonzero(labels == label)
            order = sorted(rows, key=lambda i: _rank_key(seed, r, ids[i]))
            # deal in a rotating start so small classes do not all land in fold 0
            start = int(_rank_key(seed, r, str(label))[:8], 16) % plan.k
            for pos, i in enumerate(order):
                out[r, i] = (start + pos) % plan.k
    return out


def fold_lookup(ids, labels, splits, plan: SelectionPlan, *, seed: int = 0) -> dict[str, np.ndarray]:
    """{id: (R,) folds} for the dataset's train+val rows; backbones index it by their own rows."""
    folds = assign_folds(ids, labels, splits, plan, seed=seed)
    return {str(i): folds[:, j] for j, i in enumerate(ids)}
