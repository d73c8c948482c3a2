"""Multi-label test data from real photos: mosaics of CIFAR-10 images.

Each mosaic is a 2 x 2 grid of 32 px cells holding two to four photos of *different* CIFAR-10
classes (the other cells mid-grey); its labels are the classes shown. Photos are taken in sorted
order per class and never reused, so the same call builds the same mosaics on every run.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

TILE = 32


def build_mosaics(cifar10_dir: Path, root: Path, n: int, *, split: str = "train", seed: int = 0,
                  min_tiles: int = 2, max_tiles: int = 4, classes: list[str] | None = None,
                  fmt: str = "csv", separator: str = "|", skip: int = 0) -> Path:
    """Write `n` mosaics under `root/images/` and a manifest (`root/manifest.csv` with
    `path,labels` joined by `separator`, or `root/manifest.jsonl` with label lists); returns
    the manifest path. `skip`: photos per class to pass over first (disjoint sets of mosaics
    from one split)."""
    rng = np.random.default_rng(seed)
    src = Path(cifar10_dir) / split
    names = classes or sorted(p.name for p in src.iterdir() if p.is_dir())
    photos = {c: sorted((src / c).glob("*.jpg"))[skip:] for c in names}
    used = {c: 0 for c in names}
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, list[str]]] = []
    for i in range(n):
        k = int(rng.integers(min_tiles, max_tiles + 1))
        shown = sorted(rng.choice(len(names), size=k, replace=False).tolist())
        cells = rng.permutation(4)[:k]
        canvas = Image.new("RGB", (2 * TILE, 2 * TILE), (128, 128, 128))
        for c, cell in zip(shown, cells):
            cls = names[c]
            if used[cls] >= len(photos[cls]):
                raise ValueError(f"not enough {cls} photos in {src} for {n} mosaics")
            with Image.open(photos[cls][used[cls]]) as tile:
                canvas.paste(tile.convert("RGB").resize((TILE, TILE)),
                             ((int(cell) % 2) * TILE, (int(cell) // 2) * TILE))
            used[cls] += 1
        rel = f"images/m{i:05d}.jpg"
        canvas.save(root / rel, quality=95)
        rows.append((rel, [names[c] for c in shown]))
    if fmt == "jsonl":
        manifest = root / "manifest.jsonl"
        manifest.write_text("".join(json.dumps({"path": p, "labels": labs}) + "\n" for p, labs in rows))
        return manifest
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "labels"])
        for p, labs in rows:
            w.writerow([p, separator.join(labs)])
    return manifest


def read_manifest(manifest: Path, separator: str = "|") -> list[tuple[str, tuple[str, ...]]]:
    """(absolute path, label set) per row of a manifest written by `build_mosaics`."""
    root = manifest.parent
    if manifest.suffix == ".jsonl":
        rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        return [(str(root / r["path"]), tuple(r["labels"])) for r in rows]
    with manifest.open() as fh:
        return [(str(root / r["path"]), tuple(r["labels"].split(separator)))
                for r in csv.DictReader(fh)]
