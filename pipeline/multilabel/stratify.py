"""Iterative stratification of multi-label data (Sechidis, Tsoumakas & Vlahavas, ECML 2011).

Stratifying by label *set* fails when most sets are rare; stratifying each label alone is
impossible when an image carries several. The iterative algorithm:

1. every split j wants ``r_j * n`` images, and ``c_jl`` images of each label l;
2. take the label with the fewest images still unassigned; give each of its images to the split
   that most wants that label (ties: the split that wants the most images, then a seeded coin),
   and lower that split's wants for every label of the image;
3. repeat until every labelled image is placed; images without a label go where most are wanted.

Two changes from the paper, both so that every label shows up in every split where that is
possible: the per-label wants ``c_jl`` are integers rounded like the single-label split (a
held-out split gets at least one image of a label that has more images than there are splits),
and a repair pass afterwards moves an image into a split that lacks one of its labels when that
empties no split of any label. numpy only; deterministic given ``order`` and ``seed``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def label_wants(n: int, proportions: Sequence[float]) -> np.ndarray:
    """Integer share of ``n`` items per split (split 0 takes the rest): rounded, at least one per
    held-out split with a positive proportion when ``n`` leaves one for split 0, and split 0
    always keeps one (the same rule as ``pipeline.data.split.allocate``)."""
    props = np.asarray(proportions, dtype=np.float64)
    held = [j for j in range(1, len(props)) if props[j] > 0]
    out = np.zeros(len(props), dtype=np.int64)
    for j in held:
        out[j] = int(n * props[j] + 0.5)
    if n >= len(held) + 1:
        for j in held:
            out[j] = max(1, out[j])
    while n > 0 and held and out[held].sum() > n - 1:
        j = max(held, key=lambda k: (out[k], k))
        if out[j] == 0:
            break
        out[j] -= 1
    out[0] = n - out[1:].sum()
    return out


def iterative_stratify(Y: np.ndarray, proportions: Sequence[float], *, seed: int = 0,
                       order: np.ndarray | None = None, repair: bool = True) -> np.ndarray:
    """Split index (0 .. len(proportions)-1) for each row of the (N, L) indicator matrix ``Y``.

    ``proportions`` sum to 1 (split 0 is usually train). ``order``: the order rows are visited
    in within a label (default: a seeded permutation); pass an order that depends only on
    content (e.g. hashes) to make the result independent of listing order.
    """
    Y = np.asarray(Y).astype(bool)
    if Y.ndim != 2:
        raise ValueError(f"Y must be an (n_samples, n_labels) indicator matrix, got shape {Y.shape}")
    props = np.asarray(proportions, dtype=np.float64)
    if props.ndim != 1 or len(props) < 2 or np.any(props < 0) or not np.isclose(props.sum(), 1.0):
        raise ValueError(f"proportions must be >= 0 and sum to 1, got {list(proportions)}")
    n, L = Y.shape
    k = len(props)
    rng = np.random.default_rng(seed)
    if order is None:
        order = rng.permutation(n)
    rank = np.empty(n, dtype=np.int64)
    rank[np.asarray(order, dtype=np.int64)] = np.arange(n)

    want_total = props * n
    want = np.stack([label_wants(int(c), props) for c in Y.sum(axis=0)], axis=1).astype(np.float64) \
        if L else np.zeros((k, 0))
    assign = np.full(n, -1, dtype=np.int64)
    remaining = Y.sum(axis=0).astype(np.int64)
    members = [np.flatnonzero(Y[:, lab]) for lab in range(L)]
    for lab in range(L):
        members[lab] = members[lab][np.argsort(rank[members[lab]], kind="stable")]

    def place(i: int, scores: np.ndarray) -> None:
        best = np.flatnonzero(scores == scores.max())
        if len(best) > 1:
            tot = want_total[best]
            best = best[tot == tot.max()]
        j = int(best[0] if len(best) == 1 else rng.choice(best))
        assign[i] = j
        want_total[j] -= 1
        labs = np.flatnonzero(Y[i])
        want[j, labs] -= 1
        remaining[labs] -= 1

    while True:
        live = np.flatnonzero(remaining > 0)
        if not len(live):
            break
        lab = int(live[np.argmin(remaining[live])])
        for i in members[lab]:
            if assign[i] < 0:
                place(int(i), want[:, lab])
    for i in np.argsort(rank, kind="stable"):
        if assign[i] < 0:
            place(int(i), want_total)
    if repair and n:
        _repair(Y, assign, props)
    return assign


def _repair(Y: np.ndarray, assign: np.ndarray, props: np.ndarray) -> None:
    """Move an image into each split that lacks one of its labels, when the label has enough
    images for every split and the move leaves its old split with every label it had."""
    k = len(props)
    splits = [j for j in range(k) if props[j] > 0]
    counts = np.stack([Y[assign == j].sum(axis=0) for j in range(k)])  # (k, L)
    for lab in np.argsort(Y.sum(axis=0), kind="stable"):
        if Y[:, lab].sum() < len(splits):
            continue
        for j in splits:
            if counts[j, lab] > 0:
                continue
            best, best_key = None, None
            for i in np.flatnonzero(Y[:, lab]):
                src = assign[i]
                labs = np.flatnonzero(Y[i])
                if np.any(counts[src, labs] <= 1):
                    continue  # moving it would empty its split of one of its labels
                key = (-int(counts[src, labs].min()), len(labs), int(i))
                if best_key is None or key < best_key:
                    best, best_key = int(i), key
            if best is not None:
                labs = np.flatnonzero(Y[best])
                counts[assign[best], labs] -= 1
                counts[j, labs] += 1
                assign[best] = j


def iterative_split(Y: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, holdout_idx), about ``fraction`` of the rows held out, every label on both
    sides where it has at least two rows. Indices sorted."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    a = iterative_stratify(Y, [1.0 - fraction, fraction], seed=seed)
    return np.flatnonzero(a == 0), np.flatnonzero(a == 1)


def iterative_folds(Y: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold index (0 .. n_folds-1) per row, each fold stratified over every label."""
    if int(n_folds) < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    return iterative_stratify(Y, [1.0 / n_folds] * int(n_folds), seed=seed)


__all__ = ["iterative_folds", "iterative_split", "iterative_stratify", "label_wants"]
