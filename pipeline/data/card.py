"""DatasetCard: what intake found, as plain JSON-able data plus a rich rendering.

Multi-label cards (`multi_label=True`): `counts` holds, per split, the images that carry each
label (an image counts once under each of its labels, so counts no longer add up to images);
`image_counts` holds the images per split, `label_cardinality` the mean labels per image,
`cooccurrence` the most frequent label pairs `[a, b, images]`, `unlabelled` the images without
any label per split.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from pipeline.data.records import SPLITS, ExcludedFile

#: newest card format this tlpipe reads; single-label cards are still written as v1 (unchanged),
#: multi-label cards as v2 (their counts mean images per label, which a v1 reader would misread)
CARD_VERSION = 2


def dataset_hash(triples: Iterable[tuple[str, str, str]]) -> str:
    """sha256 over the sorted (content sha256, label, split) triples: changes when any image,
    label or split assignment changes, and never with paths or listing order."""
    h = hashlib.sha256()
    for sha, label, split in sorted(triples):
        h.update(json.dumps([sha, label, split], ensure_ascii=True).encode())
        h.update(b"\n")
    return h.hexdigest()


#: how many label pairs a multi-label card lists
TOP_PAIRS = 10


def label_set_stats(label_sets: Iterable[tuple[str, ...]], top: int = TOP_PAIRS
                    ) -> tuple[float | None, list[list]]:
    """(mean labels per image, the `top` most frequent label pairs as [a, b, images])."""
    n = total = 0
    pairs: Counter = Counter()
    for labels in label_sets:
        n += 1
        ordered = sorted(set(labels))
        total += len(ordered)
        for i, a in enumerate(ordered):
            for b in ordered[i + 1:]:
                pairs[(a, b)] += 1
    ranked = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return (total / n if n else None), [[a, b, k] for (a, b), k in ranked]


def imbalance(counts: dict[str, dict[str, int]], classes: list[str]) -> float | None:
    """max / min training images per class (classes with no training image are not counted)."""
    train = [counts.get("train", {}).get(c, 0) for c in classes]
    train = [n for n in train if n > 0]
    if not train:
        return None
    return max(train) / min(train)


@dataclass
class DatasetCard:
    name: str
    source: str
    source_kind: str
    classes: list[str]
    counts: dict[str, dict[str, int]]  # {split: {class: n}}, every split and class present
    imbalance_ratio: float | None
    excluded: list[ExcludedFile]
    duplicates: list[list[str]]  # identical bytes, same label: first path kept, rest dropped
    label_conflicts: list[list[str]]  # identical bytes under different labels: all excluded
    dataset_hash: str
    split_strategy: str  # "source" | "source+carved:val" | "stratified" ...
    seed: int
    fractions: dict[str, float]
    empty_classes: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # non-image files that were skipped
    warnings: list[str] = field(default_factory=list)
    max_pixels: int | None = None
    multi_label: bool = False
    image_counts: dict[str, int] | None = None  # multi-label: images per split
    label_cardinality: float | None = None  # multi-label: mean labels per image
    cooccurrence: list[list] = field(default_factory=list)  # multi-label: [a, b, images], top first
    unlabelled: dict[str, int] = field(default_factory=dict)  # multi-label: images with no label

    # ------------------------------------------------------------------ derived
    @property
    def n_images(self) -> int:
        if self.image_counts is not None:
            return sum(self.image_counts.values())
        return sum(sum(per.values()) for per in self.counts.values())

    def split_total(self, split: str) -> int:
        if self.image_counts is not None:
            return int(self.image_counts.get(split, 0))
        return sum(self.counts.get(split, {}).values())

    def class_total(self, cls: str) -> int:
        return sum(per.get(cls, 0) for per in self.counts.values())

    def excluded_by_code(self) -> dict[str, int]:
        return dict(sorted(Counter(e.code for e in self.excluded).items()))

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "card_version": 2 if self.multi_label else 1,
            "name": self.name,
            "source": self.source,
            "source_kind": self.source_kind,
            "classes": list(self.classes),
            "counts": {s: dict(per) for s, per in self.counts.items()},
            "imbalance_ratio": self.imbalance_ratio,
            "excluded": [e.to_dict() for e in self.excluded],
            "duplicates": [list(g) for g in self.duplicates],
            "label_conflicts": [list(g) for g in self.label_conflicts],
            "dataset_hash": self.dataset_hash,
            "split_strategy": self.split_strategy,
            "seed": self.seed,
            "fractions": dict(self.fractions),
            "empty_classes": list(self.empty_classes),
            "ignored": list(self.ignored),
            "warnings": list(self.warnings),
            "max_pixels": self.max_pixels,
            **({"multi_label": True, "image_counts": dict(self.image_counts or {}),
                "label_cardinality": self.label_cardinality,
                "cooccurrence": [list(p) for p in self.cooccurrence],
                "unlabelled": dict(self.unlabelled)} if self.multi_label else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetCard":
        version = d.get("card_version", CARD_VERSION)
        if version > CARD_VERSION:
            raise ValueError(f"dataset card version {version} is newer than this tlpipe ({CARD_VERSION}); upgrade tlpipe")
        ratio = d.get("imbalance_ratio")
        return cls(
            name=str(d["name"]),
            source=str(d["source"]),
            source_kind=str(d["source_kind"]),
            classes=[str(c) for c in d["classes"]],
            counts={str(s): {str(c): int(n) for c, n in per.items()} for s, per in d["counts"].items()},
            imbalance_ratio=None if ratio is None else float(ratio),
            excluded=[ExcludedFile.from_dict(e) for e in d.get("excluded", [])],
            duplicates=[[str(p) for p in g] for g in d.get("duplicates", [])],
            label_conflicts=[[str(p) for p in g] for g in d.get("label_conflicts", [])],
            dataset_hash=str(d["dataset_hash"]),
            split_strategy=str(d["split_strategy"]),
            seed=int(d["seed"]),
            fractions={str(k): float(v) for k, v in d.get("fractions", {}).items()},
            empty_classes=[str(p) for p in d.get("empty_classes", [])],
            ignored=[str(p) for p in d.get("ignored", [])],
            warnings=[str(w) for w in d.get("warnings", [])],
            max_pixels=None if d.get("max_pixels") is None else int(d["max_pixels"]),
            multi_label=bool(d.get("multi_label", False)),
            image_counts=(None if d.get("image_counts") is None
                          else {str(k): int(v) for k, v in d["image_counts"].items()}),
            label_cardinality=(None if d.get("label_cardinality") is None
                               else float(d["label_cardinality"])),
            cooccurrence=[[str(p[0]), str(p[1]), int(p[2])] for p in d.get("cooccurrence", [])],
            unlabelled={str(k): int(v) for k, v in d.get("unlabelled", {}).items()},
        )

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=True, **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "DatasetCard":
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------ rendering
    def render(self, *, max_rows: int = 20):
        """A rich renderable: summary, class x split counts, exclusions, duplicates, warnings."""
        from rich.console import Group  # noqa: PLC0415 - only needed when rendering
        from rich.table import Table
        from rich.text import Text

        parts: list[Any] = []
        ratio = "n/a" if self.imbalance_ratio is None else f"{self.imbalance_ratio:.2f}"
        fr = ", ".join(f"{k}={v:g}" for k, v in self.fractions.items()) or "as given"
        # Every string that comes from the data (names, paths, reasons) is a Text, never markup:
        # a file called "[bold]x.jpg" must be listed under its own name, and "[/x]" must not crash.
        what = "classes"
        if self.multi_label:
            card = "n/a" if self.label_cardinality is None else f"{self.label_cardinality:.2f}"
            what = (f"labels (multi-label: {card} labels per image, "
                    f"{sum(self.unlabelled.values())} images without a label)")
        parts.append(Text.assemble(
            (f"{self.name}", "bold"), f"  ({self.source_kind}: {self.source})\n",
            f"{self.n_images} images, {len(self.classes)} {what}, imbalance {ratio} (train max/min); ",
            f"split: {self.split_strategy} (seed {self.seed}; {fr})\n",
            f"hash {self.dataset_hash[:16]}…  excluded {len(self.excluded)}, duplicates "
            f"{sum(len(g) - 1 for g in self.duplicates)}, label conflicts {len(self.label_conflicts)}",
        ))

        counts = Table(title="Images per " + ("label" if self.multi_label else "class") + " and split",
                       show_footer=True)
        counts.add_column("label" if self.multi_label else "class", footer="images")
        for s in SPLITS:
            counts.add_column(s, justify="right", footer=str(self.split_total(s)))
        counts.add_column("total", justify="right", footer=str(self.n_images))
        for c in self.classes:
            counts.add_row(Text(c), *(str(self.counts.get(s, {}).get(c, 0)) for s in SPLITS),
                           str(self.class_total(c)))
        parts.append(counts)

        if self.cooccurrence:
            pairs = Table(title=f"Most frequent label pairs (top {len(self.cooccurrence)})")
            pairs.add_column("label")
            pairs.add_column("label")
            pairs.add_column("images", justify="right")
            for a, b, k in self.cooccurrence:
                pairs.add_row(Text(a), Text(b), str(k))
            parts.append(pairs)

        if self.excluded:
            by_code = Table(title="Excluded files by reason code")
            by_code.add_column("code")
            by_code.add_column("files", justify="right")
            for code, n in self.excluded_by_code().items():
                by_code.add_row(code, str(n))
            parts.append(by_code)
            detail = Table(title=f"Excluded files (first {min(max_rows, len(self.excluded))} of {len(self.excluded)})")
            detail.add_column("path", overflow="fold", max_width=60)
            detail.add_column("code")
            detail.add_column("reason", overflow="fold")
            for e in self.excluded[:max_rows]:
                detail.add_row(Text(e.path), Text(e.code), Text(e.reason))
            parts.append(detail)

        groups = [("duplicate (kept first)", g) for g in self.duplicates] + [
            ("label conflict (all excluded)", g) for g in self.label_conflicts
        ]
        if groups:
            dup = Table(title="Identical files")
            dup.add_column("kind")
            dup.add_column("paths", overflow="fold")
            for kind, g in groups[:max_rows]:
                dup.add_row(kind, Text("\n".join(g)))
            parts.append(dup)

        notes = list(self.warnings)
        if self.ignored:
            notes.append(f"{len(self.ignored)} non-image file(s) ignored, e.g. {', '.join(self.ignored[:3])}")
        if notes:
            parts.append(Text("\n".join(f"! {w}" for w in notes), style="yellow"))
        return Group(*parts)
