"""Label sets: the canonical key a multi-label record carries, and indicator matrices.

A multi-label image has a *set* of labels (possibly empty). Code written for one label per
image reads ``record.label``; a multi-label record keeps there the canonical key of its set,
the sorted labels joined by ``KEY_SEPARATOR`` (``"cat|dog"``; ``""`` for no label), and the
set itself in ``record.labels``. The key is what the dataset hash, sorting and a FAISS support
index (one string per vector) store; ``split_key`` turns it back into the set.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

#: joins the sorted labels of a set into one string key; a label may not contain it
KEY_SEPARATOR = "|"


def label_key(labels: Iterable[str]) -> str:
    """Canonical key of a label set: sorted, de-duplicated, joined by ``KEY_SEPARATOR``."""
    return KEY_SEPARATOR.join(sorted({str(lab) for lab in labels}))


def split_key(key: str) -> tuple[str, ...]:
    """The label set of a key written by ``label_key`` (``""`` -> no label)."""
    return tuple(k for k in str(key).split(KEY_SEPARATOR) if k)


def per_label(by_key: Mapping[str, float]) -> dict[str, float]:
    """Totals by label-set key → totals by label, sorted ({"cat|dog": 2, "cat": 1} →
    {"cat": 3, "dog": 2}): each label of a key gets the key's whole amount."""
    out: dict[str, float] = {}
    for key, amount in by_key.items():
        for lab in split_key(key):
            out[lab] = out.get(lab, 0) + amount
    return dict(sorted(out.items()))


def parse_labels(value: Any, separator: str = KEY_SEPARATOR) -> tuple[str, ...]:
    """A manifest / dataset cell as a sorted label set: a list (JSONL, HF) or a string of
    labels separated by ``separator``; blanks are dropped and repeats collapse."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        parts = [str(v).strip() for v in value if v is not None]
    else:
        text = str(value)
        parts = [p.strip() for p in (text.split(separator) if separator else [text])]
    return tuple(sorted({p for p in parts if p}))


def label_sets(Y: Any) -> list[tuple[str, ...]]:
    """Rows of label sets from a list of label sets or of keys (``"cat|dog"``)."""
    out = []
    for row in Y:
        out.append(split_key(row) if isinstance(row, str) else tuple(sorted({str(v) for v in row})))
    return out


def binarize(sets: Sequence[Iterable[str]], classes: Sequence[str]) -> np.ndarray:
    """(N, L) uint8 indicator matrix of label sets over ``classes`` (unknown labels: an error)."""
    index = {str(c): j for j, c in enumerate(classes)}
    Y = np.zeros((len(sets), len(index)), dtype=np.uint8)
    for i, row in enumerate(sets):
        for lab in (split_key(row) if isinstance(row, str) else row):
            j = index.get(str(lab))
            if j is None:
                raise ValueError(f"label {lab!r} of row {i} is not one of the classes "
                                 f"{list(index)[:10]}; pass classes= covering every label")
            Y[i, j] = 1
    return Y


def unbinarize(Y: np.ndarray, classes: Sequence[str]) -> list[tuple[str, ...]]:
    """Label sets (tuples in class order) of an (N, L) indicator matrix."""
    cls = [str(c) for c in classes]
    return [tuple(cls[j] for j in np.flatnonzero(row)) for row in np.asarray(Y)]


__all__ = ["KEY_SEPARATOR", "binarize", "label_key", "label_sets", "parse_labels", "split_key",
           "unbinarize"]
