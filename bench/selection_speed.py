"""The speed target of honest selection, on its own: tlpipe's whole `tlpipe run` on cached
features against the practitioner script's cross-validation on the same features, side by side,
in one run, in alternating rounds.

    python -m bench.selection_speed [--dataset clothing|cifar|both] [--rounds 2]
                                    [--cifar-subset TRAIN/VAL/TEST ...] [--write]

Per dataset (the same data as `bench.accuracy`): a state root holds tlpipe's feature store — the
one `bench.accuracy --keep-root` kept, else one under the bench cache that an untimed first
`tlpipe run` fills (extraction, backbone latencies). Then each round times, one after the other on this machine:

* tlpipe: ``tlpipe run DATA --root ROOT -b ...``, the whole command in a fresh process (intake,
  Ray start, every candidate of the sweep with 5-fold CV, the concatenation and the ensemble,
  selection, report, registration), wall time;
* the script: ``GridSearchCV(StandardScaler + LogisticRegression, C in logspace(-4, 2, 13),
  StratifiedKFold(5), n_jobs=-1)`` for each backbone on the same train+val embeddings (read
  from tlpipe's store), wall time summed over the backbones — the script's CV alone, without
  its imports, feature loading or anything else.

`bench.accuracy` measures the same two things once, with both arms' first runs (extraction) and
their accuracy; this one repeats only the comparison the target is about, so it can be rerun
alone on a quiet machine. Both arms are CPU-bound and gain unequally from wider vector units, so
each instruction-set class (AVX2 only, AVX-512 VNNI, AMX) keeps its own section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from bench.accuracy import (BACKBONES, MLFLOW_URI_VARS, BenchData, bench_cache, cifar_data,
                            clothing_data, cpu_facts, describe_cpu, display_path, load_average, log,
                            practitioner_cv, tlpipe_command)


#: the CIFAR-10 subset `bench.accuracy` uses too (photos a class: train/val/test)
DEFAULT_CIFAR_SUBSET = "300/50/100"


def state_root(data: BenchData) -> Path:
    """The root kept by `bench.accuracy --keep-root` for this dataset (its features are already
    extracted) when there is one, else this bench's own under the bench cache."""
    raw = bench_cache() / f"accuracy-{data.key}.json"
    if raw.exists():
        kept = Path(json.loads(raw.read_text()).get("tlpipe", {}).get("root", ""))
        if str(kept) and (kept / "features").is_dir():
            return kept
    return bench_cache() / f"selection-speed-{data.key}"


def tlpipe_run(data: BenchData, backbones, root: Path, logfile: Path) -> float:
    """Wall seconds of one whole `tlpipe run` (its own process), which must succeed."""
    cmd = tlpipe_command() + ["run", str(data.root), "--root", str(root),
                              "--model-name", f"speed-{data.key}"]
    for b in backbones:
        cmd += ["-b", b]
    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_URI_VARS}
    t0 = time.perf_counter()
    with open(logfile, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(root))
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"tlpipe run failed (exit {proc.returncode}); see {logfile}")
    return seconds


def cached_features(data: BenchData, backbones, root: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """{backbone: train+val embeddings from tlpipe's store}, labels — the rows every backbone has."""
    from feature_store import FeatureStore
    from pipeline.backbones import get_spec
    from pipeline.backbones.registry import default_cpu_engine
    from pipeline.data import load_dataset
    from pipeline.devices import default_dtype
    from pipeline.settings import features_root

    ds = load_dataset(str(data.root))
    store = FeatureStore(features_root(root))
    recs = ds.split("train") + ds.split("val")
    engine = default_cpu_engine()  # what `tlpipe run` extracted with (see jobs.extract.resolve_engine)
    dtype = default_dtype("cpu") if engine == "torch" else "float32"
    fps = {b: get_spec(b).fingerprint_for(engine, dtype) for b in backbones}
    have = np.ones(len(recs), dtype=bool)
    for fp in fps.values():
        have &= store.contains(fp, [r.sha256 for r in recs])
    recs = [r for r, ok in zip(recs, have) if ok]
    ids = [r.sha256 for r in recs]
    return {b: store.get(fp, ids) for b, fp in fps.items()}, np.asarray([r.label for r in recs])


def script_cv(features: dict[str, np.ndarray], y: np.ndarray) -> float:
    """Wall seconds of the script's CV over every backbone."""
    total = 0.0
    for X in features.values():
        t0 = time.perf_counter()
        practitioner_cv(X, y, n_jobs=-1, max_iter=1000)
        total += time.perf_counter() - t0
    return total


def measure(data: BenchData, backbones, rounds: int) -> dict:
    root = state_root(data)
    root.mkdir(parents=True, exist_ok=True)
    logs = bench_cache() / f"selection-speed-{data.key}"
    if not (root / "features").exists():
        log(f"{data.key}: first run (untimed: extraction into {root})")
        tlpipe_run(data, backbones, root, logs.with_suffix(".first.log"))
    features, y = cached_features(data, backbones, root)
    out = {"tlpipe_s": [], "script_s": [], "n_rows": int(len(y)), "load": [],
           "dims": {b: int(X.shape[1]) for b, X in features.items()}}
    for r in range(rounds):
        out["load"].append(load_average())
        t = tlpipe_run(data, backbones, root, logs.with_suffix(f".round{r}.log"))
        s = script_cv(features, y)
        out["tlpipe_s"].append(t)
        out["script_s"].append(s)
        log(f"{data.key} round {r + 1}: tlpipe run {t:.1f} s, script CV {s:.1f} s (load {out['load'][-1]})")
    return out


def verdict(tlpipe_s: list[float], script_s: list[float]) -> str:
    """✓ when tlpipe was faster in every round, ✗ when slower in every round, ≈ when the rounds
    disagree (the gap is inside run-to-run noise: parity, not a win)."""
    faster = [t < s for t, s in zip(tlpipe_s, script_s)]
    return "✓" if all(faster) else "✗" if not any(faster) else "≈ parity (rounds disagree)"


def render(results: dict[str, tuple[BenchData, dict]], cpu: dict, backbones) -> str:
    lines = [describe_cpu(cpu) + ". Each round runs tlpipe's whole command, then the script's CV "
             "on the same cached features; median over rounds (every round listed); the target holds "
             "where tlpipe was faster in every round.", "",
             "| dataset | train+val images | tlpipe run, whole command (s) | script CV only (s) | "
             "tlpipe / script | target (tlpipe faster) | rounds: tlpipe / script (s) | load (1/5/15 min) |",
             "|---|---|---|---|---|---|---|---|"]
    for data, m in results.values():
        t, s = statistics.median(m["tlpipe_s"]), statistics.median(m["script_s"])
        rounds = ", ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(m["tlpipe_s"], m["script_s"]))
        lines.append(f"| {data.title} | {m['n_rows']} | {t:.1f} | {s:.1f} | {t / s:.2f} | "
                     f"{verdict(m['tlpipe_s'], m['script_s'])} | {rounds} | {'; '.join(m['load'])} |")
    lines += ["", "Backbones: " + ", ".join(f"`{b}`" for b in backbones) + ". DATA: "
              + "; ".join(f"`{display_path(d.root)}`" for d, _ in results.values())
              + ". tlpipe's command: `tlpipe run DATA --root ROOT --model-name speed-KEY -b ...` "
              "(ROOT keeps the feature store between rounds; each round registers one more version)."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("clothing", "cifar", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cifar-subset", action="append", default=None, metavar="TRAIN/VAL/TEST",
                        help="photos a class of a CIFAR-10 subset (repeatable; default 300/50/100)")
    parser.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = parser.parse_args(argv)
    backbones = list(BACKBONES)
    cpu = cpu_facts()
    log(describe_cpu(cpu))
    datasets = []
    if args.dataset in ("clothing", "both"):
        datasets.append(clothing_data(False, 0))
    subsets = args.cifar_subset or [DEFAULT_CIFAR_SUBSET]
    if args.dataset in ("cifar", "both"):
        for spec in subsets:
            try:
                n_train, n_val, n_test = (int(v) for v in spec.split("/"))
            except ValueError:
                parser.error(f"--cifar-subset {spec!r}: expected TRAIN/VAL/TEST photos a class, e.g. 300/50/100")
            datasets.append(cifar_data(n_train, n_val, n_test, 0, False))
    results = {d.key: (d, measure(d, backbones, args.rounds)) for d in datasets}
    body = render(results, cpu, backbones)
    print(body)
    if args.write:
        from bench.report import write_section

        cmd = "python -m bench.selection_speed" + ("" if args.dataset == "both" else f" --dataset {args.dataset}") \
            + ("" if args.rounds == 2 else f" --rounds {args.rounds}") \
            + "".join(f" --cifar-subset {v}" for v in subsets if subsets != [DEFAULT_CIFAR_SUBSET])
        isa = "amx" if cpu["amx"] else "avx512" if cpu["avx512_vnni"] else "avx2"
        title = {"amx": "AMX", "avx512": "AVX-512 VNNI", "avx2": "AVX2 only"}[isa]
        write_section(f"selection-speed-{isa}", "Honest selection: tlpipe's whole run vs the script's "
                      f"CV, same features ({title})", cmd, body)
        log(f"wrote section selection-speed-{isa} of BENCHMARKS.md")


if __name__ == "__main__":
    main()
