"""Small real CIFAR-10 ImageFolders for tests: the first N photos of each class, copied."""

from __future__ import annotations

import shutil
from pathlib import Path


def copy_cifar_subset(cifar10_dir: Path, root: Path, per_split: dict[str, int]) -> Path:
    """`root/<split>/<class>/*.jpg` with the first `per_split[split]` photos of every class of
    `cifar10_dir/<split>` (sorted names: the same photos every run)."""
    for split, n in per_split.items():
        for cls_dir in sorted((Path(cifar10_dir) / split).iterdir()):
            dest = root / split / cls_dir.name
            dest.mkdir(parents=True)
            for p in sorted(cls_dir.glob("*.jpg"))[:n]:
                shutil.copy(p, dest / p.name)
    return root
