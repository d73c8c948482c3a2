"""Plain records shared by the intake modules.

Multi-label datasets (several labels per image, see ``pipeline.multilabel.labelsets``): every
record carries its label set in ``labels`` (a sorted tuple, possibly empty) and, in ``label``,
the set's canonical key (``"cat|dog"``; ``""`` for an image without a label), so code written
for one label per image keeps working on a plain string. In a single-label dataset ``labels``
is ``(label,)``. ``Dataset.multi_label`` / ``DatasetCard.multi_label`` tell which kind it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

SPLITS: tuple[str, ...] = ("train", "val", "test")

# Folder / column / HF split names accepted for each canonical split.
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


class DatasetError(ValueError):
    """Fatal intake problem: nothing usable, a single class, a missing path, a bad manifest..."""


@dataclass(frozen=True)
class ImageRecord:
    """One usable image. `path` is a real filesystem path (absolute). `labels`: the label set
    (multi-label datasets; `label` is then its key), `(label,)` when not given."""

    path: str
    label: str
    split: str
    sha256: str
    width: int
    height: int
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.labels and self.label:
            object.__setattr__(self, "labels", (self.label,))


@dataclass(frozen=True)
class ExcludedFile:
    """A file left out of the dataset. `path` is display-safe and relative to the source root."""

    path: str
    code: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "code": self.code, "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict) -> "ExcludedFile":
        return cls(path=str(d["path"]), code=str(d["code"]), reason=str(d["reason"]))


@dataclass(frozen=True)
class Candidate:
    """A file a source proposes, before validation. `split` is canonical or None (unsplit)."""

    path: str  # real filesystem path (str; non-UTF-8 names carry surrogate escapes)
    display: str  # display-safe, relative to the source root
    label: str
    split: str | None
    labels: tuple[str, ...] | None = None  # multi-label sources: the set (`label` is its key)


def display_path(path: str | bytes | os.PathLike) -> str:
    """A printable, JSON-safe rendering of a path: undecodable bytes become `\\xNN` escapes."""
    text = os.fsdecode(path)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def normalise_split(name: str) -> str | None:
    """Canonical split name (`train`/`val`/`test`) for a folder/column value, or None."""
    return SPLIT_ALIASES.get(str(name).strip().lower())


def is_within(child: str, parent: str) -> bool:
    """True when `child` is `parent` or below it (lexically; resolve links first if needed)."""
    try:
        return os.path.commonpath([child, parent]) == parent
    except ValueError:
        return False


@dataclass
class SourceListing:
    """What a source proposes, plus everything it already had to leave out."""

    kind: str  # imagefolder | manifest | hf_disk | hf_hub | hf_memory
    name: str
    source: str
    candidates: list[Candidate] = field(default_factory=list)
    excluded: list[ExcludedFile] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # non-image files, listed quietly
    empty_classes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    multi_label: bool = False  # candidates carry label sets (`Candidate.labels`)

