"""The MLP head's default width, measured: the cross-validated selection score and the CPU time
of the MLP candidate at the automatic width (`pipeline.heads.mlp.auto_hidden`) against wider
fixed widths, on the same cached features and the same folds `tlpipe run` uses, side by side.

    python -m bench.mlp_width [--dataset clothing|cifar|both] [--widths auto,256,512] [--write]

Per dataset (the data and feature stores of `bench.selection_speed`, filled by its first run) and
per backbone, each width runs `pipeline.sweep.candidate.fit_evaluate` (5-fold CV, refit, test
scoring) with one thread, one after the other in this process (after one untimed warm-up fit).
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.accuracy import (BACKBONES, cifar_data, clothing_data, cpu_facts, describe_cpu, log)
from bench.selection_speed import DEFAULT_CIFAR_SUBSET, state_root


def feature_sets(data, backbones):
    """(classes, {backbone: the sweep's feature set}) read from the bench's state root."""
    from feature_store import FeatureStore
    from pipeline.backbones import get_spec
    from pipeline.backbones.registry import default_cpu_engine
    from pipeline.data import load_dataset
    from pipeline.settings import features_root
    from pipeline.sweep.features import plan_features, read_features, split_records
    from pipeline.sweep.folds import fold_lookup, plan_selection
    from pipeline.sweep.plan import FeatureSetRef

    root = state_root(data)
    if not (root / "features").is_dir():
        raise SystemExit(f"no features under {root}: run `python -m bench.selection_speed` first")
    ds = load_dataset(str(data.root))
    store = FeatureStore(features_root(root))
    splits = split_records(ds)
    trval = splits["train"] + splits["val"]
    plan = plan_selection([r.label for r in trval], [r.split for r in trval], k=5, mode="auto")
    folds = fold_lookup([r.sha256 for r in trval], [r.label for r in trval],
                        [r.split for r in trval], plan, seed=0)
    out = {}
    for b in backbones:
        ref = FeatureSetRef.from_spec(get_spec(b), engine=default_cpu_engine())
        kept, why = plan_features(store, ref, splits)
        if why:
            raise SystemExit(f"{b}: {why}")
        out[b] = read_features(store, ref, kept, splits, folds)[0]
    return [str(c) for c in ds.classes], out


def measure(data, backbones, widths) -> list[dict]:
    from pipeline.sweep.candidate import fit_evaluate

    classes, sets = feature_sets(data, backbones)
    # untimed: the first fit of a process pays for importing torch and warming its kernels
    first = next(iter(sets.values()))
    fit_evaluate(first, "MLP", {"n_threads": 1, "max_epochs": 1}, classes,
                 selection_metric="balanced_accuracy", n_bootstrap=0, seed=0, hardest_k=1,
                 latency_repeats=1)
    rows = []
    for b, fs in sets.items():
        for w in widths:
            params = {"n_threads": 1, **({} if w == "auto" else {"hidden": int(w)})}
            t0, c0 = time.perf_counter(), time.process_time()
            r = fit_evaluate(fs, "MLP", params, classes, selection_metric="balanced_accuracy",
                             n_bootstrap=0, seed=0, hardest_k=1, latency_repeats=1)
            if r.get("status") != "ok":
                raise SystemExit(f"{b} MLP({w}): {r.get('error')}")
            rows.append({"backbone": b, "width": w, "hidden": r["fitted"].get("hidden_"),
                         "cv": r["selection"]["score"], "cv_std": r["selection"]["std"],
                         "test": r["report"]["metric_value"],
                         "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0})
            log(f"{data.key} {b} MLP({w}): CV {rows[-1]['cv']:.4f}, {rows[-1]['wall_s']:.1f} s")
    return rows


def render(results, cpu, widths) -> str:
    lines = [describe_cpu(cpu) + ". `fit_evaluate` of the MLP candidate (5-fold CV on train+val, "
             "refit, test scoring), one thread, same folds for every width.", "",
             "| dataset | backbone | width | hidden units | CV balanced accuracy (± fold std) | "
             "test balanced accuracy | wall s |", "|---|---|---|---|---|---|---|"]
    for data, rows in results:
        for r in rows:
            lines.append(f"| {data.title} | `{r['backbone'].rsplit('/', 1)[-1]}` | {r['width']} | "
                         f"{r['hidden']} | {r['cv']:.4f} ± {r['cv_std']:.4f} | {r['test']:.4f} | "
                         f"{r['wall_s']:.1f} |")
    lines.append("")
    for data, rows in results:
        for w in widths:
            mine = [r for r in rows if r["width"] == w]
            lines.append(f"- {data.title}, width {w}: mean CV {statistics.mean(r['cv'] for r in mine):.4f}, "
                         f"total {sum(r['wall_s'] for r in mine):.1f} s over {len(mine)} backbones.")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("clothing", "cifar", "both"), default="both")
    parser.add_argument("--widths", default="auto,256", help="comma-separated: auto or hidden units")
    parser.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = parser.parse_args(argv)
    widths = [w.strip() for w in args.widths.split(",") if w.strip()]
    for w in widths:
        if w != "auto" and not w.isdigit():
            parser.error(f"--widths: {w!r} is neither 'auto' nor a number of hidden units")
    cpu = cpu_facts()
    datasets = []
    if args.dataset in ("clothing", "both"):
        datasets.append(clothing_data(False, 0))
    if args.dataset in ("cifar", "both"):
        datasets.append(cifar_data(*(int(v) for v in DEFAULT_CIFAR_SUBSET.split("/")), 0, False))
    results = [(d, measure(d, list(BACKBONES), widths)) for d in datasets]
    body = render(results, cpu, widths)
    print(body)
    if args.write:
        from bench.report import write_section

        cmd = "python -m bench.mlp_width" + ("" if args.dataset == "both" else f" --dataset {args.dataset}") \
            + ("" if args.widths == "auto,256" else f" --widths {args.widths}")
        write_section("mlp-width", "MLP head: automatic width vs a fixed wider one, same folds", cmd, body)
        log("wrote section mlp-width of BENCHMARKS.md")


if __name__ == "__main__":
    main()
