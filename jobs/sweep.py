"""The sweep: every (backbone, head) pair trained on cached features as parallel Ray tasks,
tracked in MLflow, then a winner selected under the latency / size budgets.

Flow:
1. per backbone, the driver reads the train / val / test embeddings from the feature store once
   and `ray.put`s them; that backbone's head tasks share the one object (a few backbones are in
   flight at a time, so memory stays bounded on big sweeps);
2. one Ray task per (backbone, head): fit on train (heads that tune, e.g. LinearProbe, select on
   val), predict the test split, `evaluate` it, find the hardest examples, time the head, render
   the confusion matrix and reliability diagram, and return plain data + the saved head's files;
3. the driver logs, as results arrive, one child MLflow run per candidate under the sweep's
   parent run (a failed task becomes a FAILED child with the remote traceback; heads that cannot
   apply, e.g. zero-shot on a backbone without a text tower, are skipped with the reason);
4. on the parent: the leaderboard (table, CSV, markdown), the accuracy-vs-latency Pareto plot,
   the selection (`select_winner`) and a self-contained report.html.

Latency of a candidate = backbone latency (measured once per backbone on this machine, batch 1
and 32, or given by the caller) + head latency (measured in its task). The parameter count of a
candidate = backbone params + the numbers stored in the fitted head (a k-NN head stores its
support set, so its size counts).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from jobs.tracking import finite_float

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "tlpipe-sweep"
DEFAULT_HEADS = ("linear", "knn", "centroid")
SWEEP_KIND = "sweep"
CANDIDATE_KIND = "candidate"
SWEEP_TAG = "tlpipe.sweep_run_id"
CANDIDATE_TAG = "tlpipe.candidate"
HEAD_DIR_TAG = "tlpipe.head_dir"
WINNER_TAG = "tlpipe.winner_run_id"
WINNER_NAME_TAG = "tlpipe.winner"
WHY_TAG = "tlpipe.selection_why"
SELECTION_ERROR_TAG = "tlpipe.selection_error"
LATENCY_BATCH_SIZES = (1, 32)

#: leaderboard columns, in order (also the keys of every row `compare` returns)
ROW_KEYS = (
    "rank", "name", "backbone", "head", "family", "status", "winner", "selection_metric",
    "metric", "ci_low", "ci_high", "accuracy", "balanced_accuracy", "macro_f1", "top5", "ece",
    "latency_ms_b1", "latency_ms_b32", "backbone_latency_ms_b1", "head_latency_ms_b1",
    "params_m", "fit_seconds", "n_train", "n_test", "head_params", "run_id", "head_dir", "error",
)
_ROW_METRICS = ("metric_value", "ci_low", "ci_high", "accuracy", "balanced_accuracy", "macro_f1",
                "top5", "ece", "latency_ms_b1", "latency_ms_b32", "backbone_latency_ms_b1",
                "head_latency_ms_b1", "params_m", "fit_seconds")


# ----------------------------------------------------------------------------- inputs / outputs

@dataclass(frozen=True)
class FeatureSetRef:
    """One backbone's cached embeddings, as the sweep sees them.

    `fingerprint` keys the feature store (it depends on the extraction engine and dtype: take it
    from `ExtractStats.fingerprint` — see `feature_sets_from_stats` — or
    `spec.fingerprint_for(engine, dtype)`). `spec` (a BackboneSpec) is needed only to measure the
    backbone's latency here and for text-prompt heads.
    """

    backbone: str
    fingerprint: str
    family: str = ""
    params_m: float | None = None
    engine: str = "torch"
    text: bool = False
    spec: Any = None
    dtype: str = "float32"

    @classmethod
    def from_spec(cls, spec: Any, *, engine: str = "torch", dtype: str = "float32",
                  fingerprint: str | None = None) -> "FeatureSetRef":
        return cls(backbone=spec.name,
                   fingerprint=fingerprint or spec.fingerprint_for(engine, dtype),
                   family=spec.family, params_m=spec.params_m, engine=engine,
                   text=bool(getattr(spec, "text", False)), spec=spec, dtype=dtype)


def feature_sets_from_stats(stats: Iterable[Any]) -> list[FeatureSetRef]:
    """FeatureSetRefs for what `jobs.extract.extract_features` returned (backbone name,
    fingerprint and engine of each extraction), with the registry's specs."""
    from pipeline.backbones import get_spec

    return [FeatureSetRef.from_spec(get_spec(s.backbone), engine=s.engine,
                                    fingerprint=s.fingerprint) for s in stats]


@dataclass(frozen=True)
class HeadConfig:
    """A head to try: `head` is a key of `pipeline.heads.HEADS`; `name` labels the candidate
    (defaults to `head`; give two configs of one head different names to compare params)."""

    head: str
    params: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.head


@dataclass
class SweepResult:
    """What a sweep did, as plain data."""

    parent_run_id: str
    experiment_id: str
    rows: list[dict[str, Any]]           # leaderboard (see ROW_KEYS), best first, failed last
    selection: dict[str, Any] | None     # Selection.to_dict(), None when nothing was eligible
    selection_error: str | None
    winner_run_id: str | None
    skipped: list[dict[str, str]]        # {backbone, head, reason}
    head_dirs: dict[str, str]            # candidate name -> local dir of the saved head
    report_path: str
    sweep_dir: str
    backbone_latency: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def winner(self) -> dict[str, Any] | None:
        return next((r for r in self.rows if r.get("winner")), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- helpers

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "x"


def candidate_name(backbone: str, head_label: str) -> str:
    return f"{backbone}+{head_label}"


#: short CLI names -> `pipeline.heads.HEADS` keys (the class names); either form is accepted
HEAD_ALIASES = {"linear": "LinearProbe", "knn": "KNN", "centroid": "NearestCentroid",
                "zeroshot": "ZeroShot", "zero-shot": "ZeroShot", "tip": "TipAdapter",
                "mlp": "MLP"}


def resolve_head(name: str) -> str:
    """A head name or alias -> its key in `pipeline.heads.HEADS` (ValueError listing choices)."""
    from pipeline.heads import HEADS

    if name in HEADS:
        return name
    if name.lower() in HEAD_ALIASES:
        return HEAD_ALIASES[name.lower()]
    by_lower = {k.lower(): k for k in HEADS}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    raise ValueError(f"unknown head {name!r}; choose from {sorted(HEAD_ALIASES)} "
                     f"(or the class names {sorted(HEADS)})")


def _head_configs(heads: Iterable[str | HeadConfig] | Mapping[str, Mapping[str, Any]],
                  head_params: Mapping[str, Mapping[str, Any]] | None) -> list[HeadConfig]:
    if isinstance(heads, Mapping):
        items: list[HeadConfig] = [HeadConfig(h, dict(p or {})) for h, p in heads.items()]
    elif isinstance(heads, str):
        items = [HeadConfig(heads)]
    else:
        items = [h if isinstance(h, HeadConfig) else HeadConfig(str(h)) for h in heads]
    out = []
    for hc in items:
        label = hc.label  # the name the user gave (e.g. "linear") labels the candidate
        extra = dict((head_params or {}).get(label, {}))
        out.append(HeadConfig(resolve_head(hc.head), {**dict(hc.params), **extra}, label))
    labels = [h.label for h in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"head labels must be unique, duplicated: {dup}; give repeated heads "
                         "different HeadConfig names")
    if not out:
        raise ValueError("no heads to sweep: pass at least one head name")
    return out


def _init_params(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class BackboneTextEmbedder:
    """Picklable ``list[str] -> (N, D)`` callable: loads the backbone's text tower lazily (in the
    Ray worker that needs it) — for heads with a ``text_embedder`` parameter (zero-shot)."""

    def __init__(self, spec: Any, device: str = "cpu"):
        self.spec = spec
        self.device = device
        self._backbone = None

    def __repr__(self) -> str:
        return f"BackboneTextEmbedder({getattr(self.spec, 'name', self.spec)!r})"

    def __getstate__(self):
        return {"spec": self.spec, "device": self.device, "_backbone": None}

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        if self._backbone is None:
            from pipeline.backbones import load_backbone

            self._backbone = load_backbone(self.spec, device=self.device, engine="torch")
        return self._backbone.text_embed(list(prompts))


def _skip_reason(hc: HeadConfig, ref: FeatureSetRef, text_embedders: Mapping[str, Any]) -> str | None:
    from pipeline.heads import HEADS

    params = _init_params(HEADS[hc.head])
    if "text_embedder" in params and hc.params.get("text_embedder") is None:
        if ref.backbone in text_embedders:
            return None
        if not ref.text:
            return (f"head {hc.head!r} needs class-name text embeddings, but {ref.backbone} has no "
                    "text tower (use a CLIP-family backbone)")
        if ref.spec is None:
            return (f"head {hc.head!r} needs the text tower of {ref.backbone}, but no backbone "
                    "spec was given to load it (pass FeatureSetRef.from_spec(spec))")
    return None


def _task_params(hc: HeadConfig, ref: FeatureSetRef, text_embedders: Mapping[str, Any],
                 cpus: int) -> dict[str, Any]:
    from pipeline.heads import HEADS

    params = dict(hc.params)
    names = _init_params(HEADS[hc.head])
    if "text_embedder" in names and params.get("text_embedder") is None:
        params["text_embedder"] = _text_embedder(ref, text_embedders)
    if hc.head == "TipAdapter" and params.get("base") is None and \
            (ref.backbone in text_embedders or (ref.text and ref.spec is not None)):
        # CLIP-family: Tip-Adapter on top of zero-shot (training-free end to end)
        params["base"] = HEADS["ZeroShot"](text_embedder=_text_embedder(ref, text_embedders))
    if "n_threads" in names and params.get("n_threads") is None:
        params["n_threads"] = max(1, int(cpus))
    return params


def _text_embedder(ref: FeatureSetRef, text_embedders: Mapping[str, Any]) -> Any:
    return text_embedders.get(ref.backbone) or BackboneTextEmbedder(ref.spec)


def _loggable_params(params: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        if callable(v) or hasattr(v, "get_params"):
            v = repr(v)
        out[k] = v
    return out


# ----------------------------------------------------------------------------- latency

def measure_backbone_latency(ref: FeatureSetRef, *, device: str = "cpu",
                             batch_sizes: Sequence[int] = LATENCY_BATCH_SIZES,
                             warmup: int = 2, repeats: int = 5) -> dict[str, Any]:
    """Median ms per image of `load_backbone(spec, engine).embed` on random uint8 pixels, on
    this machine (`device`: "cpu" or "cuda", synchronised around each timed call)."""
    from pipeline.backbones import load_backbone
    from pipeline.latency import measure_latency

    if ref.spec is None:
        raise ValueError(f"cannot measure {ref.backbone}'s latency without its spec; pass "
                         "FeatureSetRef.from_spec(spec) or backbone_latency={name: {...}}")
    kw = {"dtype": ref.dtype} if ref.engine == "torch" else {}
    backbone = load_backbone(ref.spec, device=device, engine=ref.engine, **kw)
    sync = None
    if str(device).startswith("cuda"):
        import torch

        sync = torch.cuda.synchronize
    size = int(ref.spec.input_size)
    rng = np.random.default_rng(0)
    result = measure_latency(
        backbone.embed, lambda bs: rng.integers(0, 256, size=(bs, 3, size, size), dtype=np.uint8),
        batch_sizes=batch_sizes, warmup=warmup, repeats=repeats, sync=sync)
    result["device"] = str(device)
    if backbone.params_m is not None:
        result["params_m"] = float(backbone.params_m)
    return result


def _backbone_latency(ref: FeatureSetRef, source: Any, device: str = "cpu",
                      repeats: int = 5) -> tuple[dict[str, Any], str | None]:
    """({latency_ms_b1, latency_ms_b32, ...} or {}, reason it is missing)."""
    try:
        if source is None:
            lat = measure_backbone_latency(ref, device=device, repeats=repeats)
        elif callable(source):
            lat = source(ref)
        else:
            lat = source.get(ref.backbone)
            if lat is None:
                return {}, f"no latency given for {ref.backbone}"
        return dict(lat or {}), None
    except Exception as exc:  # weights missing, engine unavailable, ...
        return {}, f"backbone latency not measured: {type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------- the Ray task

def _align_proba(proba: np.ndarray, head_classes: Sequence[Any], classes: Sequence[str]) -> np.ndarray:
    """Reorder the head's columns to `classes` (classes the head never saw get probability 0)."""
    index = {str(c): i for i, c in enumerate(classes)}
    out = np.zeros((proba.shape[0], len(classes)), dtype=np.float64)
    for j, c in enumerate(head_classes):
        out[:, index[str(c)]] = proba[:, j]
    return out


def _fitted_scalars(head: Any) -> dict[str, Any]:
    out = {}
    for k, v in vars(head).items():
        if k.endswith("_") and not k.startswith("_") and k not in ("classes_", "n_features_in_"):
            if isinstance(v, (bool, int, float, str, np.integer, np.floating)):
                out[k] = v.item() if isinstance(v, np.generic) else v
    return out


def _stored_numbers(head_dir: Path) -> int:
    from safetensors.numpy import load_file

    total = 0
    for p in head_dir.glob("*.safetensors"):
        total += sum(int(a.size) for a in load_file(str(p)).values())
    for p in head_dir.glob("*.faiss"):  # index files store float32 vectors
        total += p.stat().st_size // 4
    return total


def fit_evaluate(data: Mapping[str, Any], head_name: str, params: Mapping[str, Any],
                 classes: Sequence[str], *, selection_metric: str, n_bootstrap: int, seed: int,
                 hardest_k: int, latency_batch_sizes: Sequence[int] = LATENCY_BATCH_SIZES,
                 latency_repeats: int = 5) -> dict[str, Any]:
    """Fit one head on data["X_train"], evaluate on data["X_test"]; plain-data result. Never
    raises: a failure comes back as ``{"status": "failed", "error", "traceback"}``."""
    try:
        from pipeline.heads import HEADS

        cls = HEADS[head_name]
        head = cls(**dict(params))
        fit_kw = {}
        if data.get("X_val") is not None and _accepts(cls.fit, "X_val"):
            fit_kw = {"X_val": data["X_val"], "y_val": data["y_val"]}
        t0 = time.perf_counter()
        head.fit(data["X_train"], data["y_train"], **fit_kw)
        fit_s = time.perf_counter() - t0
        return evaluate_head(head, data, classes, fit_seconds=fit_s,
                             selection_metric=selection_metric, n_bootstrap=n_bootstrap, seed=seed,
                             hardest_k=hardest_k, latency_batch_sizes=latency_batch_sizes,
                             latency_repeats=latency_repeats)
    except Exception as exc:
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()}


def evaluate_head(head: Any, data: Mapping[str, Any], classes: Sequence[str], *,
                  fit_seconds: float, selection_metric: str, n_bootstrap: int, seed: int,
                  hardest_k: int, latency_batch_sizes: Sequence[int] = LATENCY_BATCH_SIZES,
                  latency_repeats: int = 5) -> dict[str, Any]:
    """A fitted head on data["X_test"] / data["y_test"]: the evaluation, hardest examples, head
    latency, saved files and figures of a candidate (shared by probes and fine-tunes)."""
    from pipeline import plots
    from pipeline.evaluate import evaluate, hardest_examples
    from pipeline.latency import measure_latency

    X_test = data["X_test"]
    t0 = time.perf_counter()
    proba = _align_proba(np.asarray(head.predict_proba(X_test)), head.classes_, classes)
    predict_s = time.perf_counter() - t0
    report = evaluate(data["y_test"], proba, classes, selection_metric=selection_metric,
                      n_bootstrap=n_bootstrap, seed=seed)
    hardest = hardest_examples(data["y_test"], proba, classes, ids=list(range(len(X_test))),
                               k=hardest_k)

    def make_batch(bs: int) -> np.ndarray:
        reps = math.ceil(bs / len(X_test))
        return np.ascontiguousarray(np.tile(X_test, (reps, 1))[:bs])

    lat = measure_latency(head.predict_proba, make_batch, batch_sizes=latency_batch_sizes,
                          warmup=1, repeats=latency_repeats)
    with tempfile.TemporaryDirectory(prefix="tlpipe-head-") as tmp:
        head.save(tmp)
        numbers = _stored_numbers(Path(tmp))
        files = {str(p.relative_to(tmp)): p.read_bytes()
                 for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
    figures = {"confusion_matrix.png": plots.png_bytes(plots.confusion_matrix_figure(report)),
               "reliability.png": plots.png_bytes(plots.reliability_figure(report))}
    return {
        "status": "ok", "report": report.to_dict(), "hardest": hardest,
        "head_files": files, "head_numbers": int(numbers),
        "head_size_mb": sum(len(b) for b in files.values()) / 1e6,
        "fit_seconds": fit_seconds, "predict_seconds": predict_s,
        "head_latency": {k: v for k, v in lat.items() if k.startswith("latency_ms_b")},
        "fitted": _fitted_scalars(head), "figures": figures,
    }


# ----------------------------------------------------------------------------- feature loading

def _split_records(dataset: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"train": [], "val": [], "test": []}
    for r in dataset.records:
        if r.split in out:
            out[r.split].append(r)
    return out


def _plan_features(store: Any, ref: FeatureSetRef, splits: Mapping[str, list[Any]]
                   ) -> tuple[dict[str, list[Any]], str | None]:
    """Records of each split that have an embedding for this backbone, or why it is skipped."""
    kept: dict[str, list[Any]] = {}
    for split in ("train", "val", "test"):
        recs = splits[split]
        if not recs:
            kept[split] = []
            continue
        try:
            present = store.contains(ref.fingerprint, [r.sha256 for r in recs])
        except KeyError:
            present = np.zeros(len(recs), dtype=bool)
        kept[split] = [r for r, ok in zip(recs, present) if ok]
    if not kept["train"]:
        return kept, (f"no train embeddings in the feature store for {ref.backbone} "
                      f"(fingerprint {ref.fingerprint[:16]}): run `tlpipe extract` first")
    if not kept["test"]:
        return kept, (f"no test embeddings for {ref.backbone}: the dataset has no test split "
                      "or it was not extracted")
    return kept, None


def _read_features(store: Any, ref: FeatureSetRef, kept: Mapping[str, list[Any]],
                   splits: Mapping[str, list[Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """({X_/y_ arrays per split}, {n_<split>, missing_<split>, test_records})."""
    data: dict[str, Any] = {}
    info: dict[str, Any] = {"test_records": kept["test"]}
    for split in ("train", "val", "test"):
        recs = kept[split]
        info[f"n_{split}"] = len(recs)
        info[f"missing_{split}"] = len(splits[split]) - len(recs)
        if recs:
            data[f"X_{split}"] = store.get(ref.fingerprint, [r.sha256 for r in recs])
            data[f"y_{split}"] = np.asarray([r.label for r in recs], dtype=str)
        else:
            data[f"X_{split}"] = data[f"y_{split}"] = None
    return data, info


# ----------------------------------------------------------------------------- leaderboard

_float = finite_float


def _int(v: Any) -> int | None:
    f = _float(v)
    return None if f is None else int(f)


def _row_from_run(run: Any, winner_run_id: str | None) -> dict[str, Any]:
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    status = run.info.status
    row = {
        "rank": None, "name": t.get(CANDIDATE_TAG) or run.info.run_name,
        "backbone": p.get("backbone"), "head": p.get("head_label") or p.get("head"),
        "family": p.get("family") or "", "status": status,
        "winner": bool(winner_run_id) and run.info.run_id == winner_run_id,
        "selection_metric": p.get("selection_metric"),
        "metric": _float(m.get("metric_value")) if status == "FINISHED" else None,
    }
    for k in _ROW_METRICS[1:]:
        row[k] = _float(m.get(k))
    row.update({
        "n_train": _int(p.get("n_train")), "n_test": _int(p.get("n_test")),
        "head_params": p.get("head_params"), "run_id": run.info.run_id,
        "head_dir": t.get(HEAD_DIR_TAG), "error": t.get("tlpipe.error"),
    })
    return {k: row.get(k) for k in ROW_KEYS}


def _sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(r):
        m = r["metric"]
        lat = r["latency_ms_b1"]
        return (m is None, -(m or 0.0), math.inf if lat is None else lat, r["name"] or "")

    rows = sorted(rows, key=key)
    rank = 0
    for r in rows:
        if r["metric"] is not None:
            rank += 1
            r["rank"] = rank
    return rows


def leaderboard(parent_run_id: str) -> list[dict[str, Any]]:
    """Rows of one sweep (its child runs' params / metrics / tags), best first."""
    from jobs.tracking import client

    c = client()
    parent = c.get_run(parent_run_id)
    winner = parent.data.tags.get(WINNER_TAG)
    runs = []
    token = None
    while True:
        page = c.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
            max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    runs = [r for r in runs if r.data.tags.get("tlpipe.kind") == CANDIDATE_KIND]
    return _sort_rows([_row_from_run(r, winner) for r in runs])


def _candidates(rows: Sequence[Mapping[str, Any]]) -> list[Any]:
    from pipeline.select import Candidate

    return [Candidate(name=r["name"], backbone=r["backbone"], head=r["head"], family=r["family"],
                      metric=r["metric"], ci_low=r["ci_low"], ci_high=r["ci_high"],
                      latency_ms_b1=r["latency_ms_b1"], latency_ms_b32=r["latency_ms_b32"],
                      params_m=r["params_m"], extra={"run_id": r["run_id"]})
            for r in rows if r["status"] == "FINISHED"]


def _display_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    cols = ("rank", "name", "family", "status", "metric", "ci_low", "ci_high", "accuracy",
            "macro_f1", "ece", "latency_ms_b1", "latency_ms_b32", "params_m", "winner", "run_id")
    out = []
    for r in rows:
        d = {c: r.get(c) for c in cols}
        d["winner"] = "\u2605" if r.get("winner") else ""
        if r.get("error"):
            d["status"] = f"{r['status']}: {r['error'][:120]}"
        out.append(d)
    return out


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(ROW_KEYS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in ROW_KEYS})
    return buf.getvalue()


# ----------------------------------------------------------------------------- the sweep

def run_sweep(
    dataset: Any,
    feature_sets: Sequence[FeatureSetRef | Any],
    heads: Iterable[str | HeadConfig] | Mapping[str, Mapping[str, Any]] = DEFAULT_HEADS,
    *,
    root: str | os.PathLike,
    store: Any = None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    head_params: Mapping[str, Mapping[str, Any]] | None = None,
    selection_metric: str = "balanced_accuracy",
    max_latency_ms: float | None = None,
    max_params_m: float | None = None,
    latency_key: str = "latency_ms_b1",
    backbone_latency: Mapping[str, Mapping[str, Any]] | Callable[[FeatureSetRef], Mapping[str, Any]] | None = None,
    text_embedders: Mapping[str, Callable[[list[str]], np.ndarray]] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    hardest_k: int = 16,
    cpus_per_task: float = 1,
    max_backbones_in_flight: int = 3,
    latency_repeats: int = 5,
    latency_device: str = "cpu",
) -> SweepResult:
    """Train and evaluate every (backbone, head) pair; log everything to MLflow; select.

    `dataset`: a `pipeline.data.Dataset` (records with path / label / split / sha256, classes,
    card). `feature_sets`: FeatureSetRef (or BackboneSpec, fingerprinted for the torch engine)
    per backbone; their embeddings must already be in `store` (default ``<root>/features``).
    `heads`: names from `pipeline.heads.HEADS`, HeadConfig objects, or {name: params};
    `head_params` adds params per head label. `backbone_latency`: None measures each backbone
    here on `latency_device` (needs its spec and weights); a mapping {backbone: {latency_ms_b1,
    latency_ms_b32, [params_m]}} or a callable(ref) -> that dict supplies them instead.
    `text_embedders` {backbone: picklable list[str] -> (N, D) callable} overrides the text tower
    used by zero-shot heads. At most `max_backbones_in_flight` backbones' features sit in the
    Ray object store at once.
    """
    import ray

    from feature_store import FeatureStore
    from jobs.ray_runtime import ensure_ray
    from jobs.tracking import (KIND_TAG, format_markdown_table, log_bytes, log_dataset_card,
                               log_json, log_metrics, log_params, log_table, log_tags, log_text,
                               setup_mlflow, tracked_run)
    from pipeline.evaluate import SELECTION_METRICS

    if selection_metric not in SELECTION_METRICS:
        raise ValueError(f"unknown selection metric {selection_metric!r}; choose one of "
                         f"{SELECTION_METRICS}")
    # fine-tune heads ("lora", "full") run on Ray Train after the probes: see jobs.finetune
    from jobs.finetune import split_finetune_heads

    heads, ft_cfgs = split_finetune_heads(heads, head_params)
    head_cfgs = _head_configs(heads, head_params) if heads or not ft_cfgs else []
    refs = [f if isinstance(f, FeatureSetRef) else FeatureSetRef.from_spec(f) for f in feature_sets]
    if not refs:
        raise ValueError("no feature sets to sweep: extract at least one backbone first")
    names = [r.backbone for r in refs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"each backbone may appear once per sweep; duplicated: {dup}")
    root = Path(root).expanduser()
    store = store if store is not None else FeatureStore(root / "features")
    if isinstance(store, (str, os.PathLike)):
        store = FeatureStore(store)
    text_embedders = dict(text_embedders or {})
    classes = [str(c) for c in dataset.classes]
    card = dataset.card.to_dict() if hasattr(dataset.card, "to_dict") else dict(dataset.card)
    splits = _split_records(dataset)

    experiment_id = setup_mlflow(root, experiment)
    run_name = run_name or time.strftime("sweep-%Y%m%d-%H%M%S")
    with tracked_run(experiment_id, run_name=run_name, tags={KIND_TAG: SWEEP_KIND}) as parent:
        parent_id = parent.info.run_id
        sweep_dir = root / "sweeps" / parent_id
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log_params({"backbones": names, "heads": [h.label for h in head_cfgs + ft_cfgs],
                    "head_params": {h.label: _loggable_params(h.params)
                                    for h in head_cfgs + ft_cfgs},
                    "selection_metric": selection_metric, "max_latency_ms": max_latency_ms,
                    "max_params_m": max_params_m, "latency_key": latency_key,
                    "n_bootstrap": n_bootstrap, "seed": seed}, run_id=parent_id)
        log_tags({"tlpipe.budget": f"latency<={max_latency_ms} ms, params<={max_params_m} M"},
                 run_id=parent_id)
        log_dataset_card(card, run_id=parent_id)

        ensure_ray()
        task = ray.remote(fit_evaluate).options(num_cpus=cpus_per_task, max_retries=1)
        skipped: list[dict[str, str]] = []
        head_dirs: dict[str, str] = {}
        figures_by_name: dict[str, dict[str, bytes]] = {}
        lat_by_backbone: dict[str, dict[str, Any]] = {}
        plans: list[tuple[FeatureSetRef, dict[str, list[Any]]]] = []
        for ref in refs:
            kept, reason = _plan_features(store, ref, splits)
            if reason:
                skipped.extend({"backbone": ref.backbone, "head": h.label, "reason": reason}
                               for h in head_cfgs)
            else:
                plans.append((ref, kept))
        # backbone latency first, one backbone at a time, before any head task competes for CPU
        for ref, _ in plans:
            lat, lat_reason = _backbone_latency(ref, backbone_latency, latency_device,
                                                latency_repeats)
            lat_by_backbone[ref.backbone] = {**lat, **({"error": lat_reason} if lat_reason else {})}
        pending: dict[Any, tuple[FeatureSetRef, HeadConfig, dict[str, Any]]] = {}
        ft_plans = list(plans)  # submit_next consumes `plans`

        def submit_next() -> None:
            ref, kept = plans.pop(0)
            data, info = _read_features(store, ref, kept, splits)
            obj = ray.put(data)  # one copy in the object store, shared by this backbone's heads
            for hc in head_cfgs:
                why = _skip_reason(hc, ref, text_embedders)
                if why:
                    skipped.append({"backbone": ref.backbone, "head": hc.label, "reason": why})
                    continue
                params = _task_params(hc, ref, text_embedders, int(max(1, cpus_per_task)))
                fut = task.remote(obj, hc.head, params, classes, selection_metric=selection_metric,
                                  n_bootstrap=n_bootstrap, seed=seed, hardest_k=hardest_k,
                                  latency_repeats=latency_repeats)
                pending[fut] = (ref, hc, info)

        def in_flight() -> int:
            return len({v[0].backbone for v in pending.values()})

        try:
            while plans or pending:
                while plans and in_flight() < max(1, max_backbones_in_flight):
                    submit_next()
                if not pending:
                    continue
                done, _ = ray.wait(list(pending), num_returns=1)
                fut = done[0]
                ref, hc, info = pending.pop(fut)
                try:
                    result = ray.get(fut)
                except Exception as exc:  # the worker died (OOM kill, node lost, ...)
                    result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                              "traceback": traceback.format_exc()}
                name = candidate_name(ref.backbone, hc.label)
                head_dir = _log_candidate(
                    name, ref, hc, info, lat_by_backbone.get(ref.backbone, {}), result,
                    parent_id=parent_id, experiment_id=experiment_id, sweep_dir=sweep_dir,
                    classes=classes, card=card, selection_metric=selection_metric)
                if head_dir:
                    head_dirs[name] = head_dir
                    figures_by_name[name] = {**result.get("figures", {}),
                                             **result.get("_driver_figures", {})}
        except BaseException:
            for fut in pending:
                ray.cancel(fut)
            raise

        # ---- fine-tunes (jobs.finetune), one at a time after the probes: same test split,
        # same evaluation, the fine-tuned backbone's own latency
        if ft_cfgs:
            from jobs.finetune import sweep_finetunes

            probe_dirs = {ref.backbone: head_dirs.get(candidate_name(ref.backbone, h.label))
                          for ref, _ in ft_plans for h in head_cfgs if h.head == "LinearProbe"}
            for name, ft_ref, hc, info, lat, result in sweep_finetunes(
                    dataset, [ref for ref, _ in ft_plans], ft_cfgs, probe_dirs, root=root,
                    store=store, sweep_dir=sweep_dir, classes=classes, skipped=skipped,
                    selection_metric=selection_metric, n_bootstrap=n_bootstrap, seed=seed,
                    hardest_k=hardest_k, latency_repeats=latency_repeats,
                    latency_device=latency_device):
                head_dir = _log_candidate(
                    name, ft_ref, hc, info, lat, result, parent_id=parent_id,
                    experiment_id=experiment_id, sweep_dir=sweep_dir, classes=classes, card=card,
                    selection_metric=selection_metric)
                if head_dir:
                    head_dirs[name] = head_dir
                    figures_by_name[name] = {**result.get("figures", {}),
                                             **result.get("_driver_figures", {})}

        # ---- leaderboard, selection, report on the parent
        rows = leaderboard(parent_id)
        selection, selection_error = _select(rows, max_latency_ms=max_latency_ms,
                                             max_params_m=max_params_m, latency_key=latency_key)
        winner_run_id = None
        if selection is not None:
            winner_run_id = selection.winner.extra.get("run_id")
            log_tags({WINNER_TAG: winner_run_id, WINNER_NAME_TAG: selection.winner.name,
                      WHY_TAG: selection.why}, run_id=parent_id)
            log_json(selection.to_dict(), "selection.json", run_id=parent_id)
        else:
            log_tags({SELECTION_ERROR_TAG: selection_error}, run_id=parent_id)
        for r in rows:
            r["winner"] = bool(winner_run_id) and r["run_id"] == winner_run_id

        log_table(rows, "leaderboard.json", run_id=parent_id)
        log_text(_csv(rows), "leaderboard.csv", run_id=parent_id)
        log_text(format_markdown_table(_display_rows(rows)), "leaderboard.md", run_id=parent_id)
        log_json(skipped, "skipped.json", run_id=parent_id)
        log_json(lat_by_backbone, "backbone_latency.json", run_id=parent_id)
        log_metrics({"n_candidates": len(rows),
                     "n_failed": sum(r["status"] != "FINISHED" for r in rows),
                     "n_skipped": len(skipped)}, run_id=parent_id)
        report_path = _write_report(
            sweep_dir, rows, card, selection, selection_error, skipped, figures_by_name,
            selection_metric=selection_metric, latency_key=latency_key, title=run_name,
            parent_id=parent_id)
        log_bytes(report_path.read_bytes(), "report.html", run_id=parent_id)
        pareto = sweep_dir / "pareto.png"
        if pareto.exists():
            log_bytes(pareto.read_bytes(), "pareto.png", run_id=parent_id)

    return SweepResult(
        parent_run_id=parent_id, experiment_id=experiment_id, rows=rows,
        selection=selection.to_dict() if selection is not None else None,
        selection_error=selection_error, winner_run_id=winner_run_id, skipped=skipped,
        head_dirs=head_dirs, report_path=str(report_path), sweep_dir=str(sweep_dir),
        backbone_latency=lat_by_backbone)


class CandidateFailed(RuntimeError):
    """A head task failed; carries the remote traceback (recorded as the run's error.txt)."""

    def __init__(self, message: str, remote_traceback: str):
        super().__init__(message)  # "ValueError: ..." as the task reported it
        self.remote_traceback = remote_traceback
        self.error_type = message.split(":", 1)[0] if ":" in message else "Error"


def _log_candidate(name: str, ref: FeatureSetRef, hc: HeadConfig, info: Mapping[str, Any],
                   lat: Mapping[str, Any], result: dict[str, Any], *, parent_id: str,
                   experiment_id: str, sweep_dir: Path, classes: Sequence[str],
                   card: Mapping[str, Any], selection_metric: str) -> str | None:
    """One child run for one candidate; returns the local head dir (None when it failed)."""
    from jobs.tracking import (KIND_TAG, dataset_params, log_dir, log_eval_report, log_json,
                               log_metrics, log_params, log_tags, tracked_run)
    from pipeline.evaluate import EvalReport

    tags = {KIND_TAG: CANDIDATE_KIND, SWEEP_TAG: parent_id, CANDIDATE_TAG: name,
            "tlpipe.backbone": ref.backbone, "tlpipe.head": hc.label}
    try:
        with tracked_run(experiment_id, run_name=name, parent_run_id=parent_id, tags=tags,
                         handle_sigterm=False) as run:
            run_id = run.info.run_id
            params = {"backbone": ref.backbone, "head": hc.head, "head_label": hc.label,
                      "family": ref.family, "fingerprint": ref.fingerprint, "engine": ref.engine,
                      "dtype": ref.dtype,
                      "head_params": _loggable_params(hc.params),
                      "selection_metric": selection_metric,
                      **{f"head.{k}": v for k, v in _loggable_params(hc.params).items()},
                      **dataset_params(card)}
            # the counts actually used (embeddings present) override the card's
            params.update({f"n_{s}": info.get(f"n_{s}") for s in ("train", "val", "test")})
            log_params(params, run_id=run_id)
            log_json(card, "dataset/dataset_card.json", run_id=run_id)
            if result.get("status") != "ok":
                raise CandidateFailed(result.get("error", "unknown error"),
                                      result.get("traceback", ""))
            log_params({f"fitted.{k}": v for k, v in result["fitted"].items()}, run_id=run_id)
            report = EvalReport.from_dict(result["report"])
            test_records = info["test_records"]
            hardest = result["hardest"]
            for h in hardest:  # task ids are test-row indices -> image key + path
                rec = test_records[h["id"]]
                h["id"], h["path"] = rec.sha256, rec.path
            hardest_png = _hardest_png(hardest)
            result["_driver_figures"] = {"hardest_examples.png": hardest_png}
            log_eval_report(report, run_id=run_id, hardest=hardest,
                            figures={**result["figures"], "hardest_examples.png": hardest_png})
            b_lat = {k: _float(v) for k, v in lat.items() if k.startswith("latency_ms_b")}
            h_lat = result["head_latency"]
            backbone_params = _float(lat.get("params_m")) if lat.get("params_m") is not None \
                else _float(ref.params_m)
            head_params_m = result["head_numbers"] / 1e6
            metrics = {"fit_seconds": result["fit_seconds"],
                       "predict_seconds": result["predict_seconds"],
                       "head_size_mb": result["head_size_mb"], "head_params_m": head_params_m,
                       "backbone_params_m": backbone_params,
                       "params_m": None if backbone_params is None else backbone_params + head_params_m}
            for key, v in h_lat.items():
                metrics[f"head_{key}"] = v
                b = b_lat.get(key)
                metrics[f"backbone_{key}"] = b
                metrics[key] = None if b is None else b + v
            if lat.get("error"):
                log_tags({"tlpipe.latency_note": lat["error"]}, run_id=run_id)
            log_metrics(metrics, run_id=run_id)
            if result.get("finetune") is not None:  # curves, params, adapter / merged model
                from jobs.finetune import log_finetune

                log_finetune(result["finetune"], run_id=run_id)

            head_dir = sweep_dir / "candidates" / _slug(name)
            (head_dir / "head").mkdir(parents=True, exist_ok=True)
            for rel, data in result["head_files"].items():
                (head_dir / "head" / rel).parent.mkdir(parents=True, exist_ok=True)
                (head_dir / "head" / rel).write_bytes(data)
            meta = {"name": name, "backbone": ref.backbone, "fingerprint": ref.fingerprint,
                    "engine": ref.engine, "dtype": ref.dtype, "family": ref.family,
                    "head": hc.head,
                    "head_label": hc.label, "classes": list(classes), "run_id": run_id,
                    "sweep_run_id": parent_id,
                    "finetune_dir": getattr(result.get("finetune"), "artifacts_dir", None),
                    "spec": ref.spec.to_dict() if hasattr(ref.spec, "to_dict") else None}
            (head_dir / "candidate.json").write_text(json.dumps(meta, indent=2, default=str))
            log_dir(head_dir / "head", "head", run_id=run_id)
            log_json(meta, "candidate.json", run_id=run_id)
            log_tags({HEAD_DIR_TAG: str(head_dir / "head")}, run_id=run_id)
            return str(head_dir / "head")
    except CandidateFailed:
        return None  # recorded: the child run ended FAILED with the remote traceback
    except Exception as exc:  # logging this candidate failed: its run ended FAILED; go on
        logger.warning("could not log candidate %s: %s: %s", name, type(exc).__name__, exc)
        return None


def _hardest_png(hardest: Sequence[Mapping[str, Any]]) -> bytes:
    from pipeline import plots

    return plots.png_bytes(plots.hardest_examples_figure(
        [h["path"] for h in hardest], plots.hardest_captions(hardest)))


def _select(rows, *, max_latency_ms, max_params_m, latency_key):
    from pipeline.select import NoEligibleCandidateError, select_winner

    try:
        return select_winner(_candidates(rows), max_latency_ms=max_latency_ms,
                             max_params_m=max_params_m, latency_key=latency_key), None
    except NoEligibleCandidateError as exc:
        return None, str(exc)


def _write_report(sweep_dir: Path, rows, card, selection, selection_error, skipped,
                  figures_by_name, *, selection_metric, latency_key, title, parent_id) -> Path:
    from pipeline import plots

    figures: dict[str, bytes] = {}
    cands = _candidates(rows)
    winner = selection.winner.name if selection is not None else None
    if cands:
        pareto = plots.png_bytes(plots.pareto_figure(
            cands, metric_name=selection_metric, latency_key=latency_key, winner=winner))
        (sweep_dir / "pareto.png").write_bytes(pareto)
        figures[f"{selection_metric} vs latency (all candidates, by family)"] = pareto
    if winner and winner in figures_by_name:
        wf = figures_by_name[winner]
        for file, label in (("confusion_matrix.png", "confusion matrix"),
                            ("reliability.png", "reliability diagram"),
                            ("hardest_examples.png", "most confident mistakes")):
            if file in wf:
                figures[f"Winner ({winner}): {label}"] = wf[file]
    notes = [selection.why if selection is not None else f"No winner: {selection_error}"]
    failed = [r for r in rows if r["status"] != "FINISHED"]
    if failed:
        notes.append(f"{len(failed)} candidate(s) failed: " + "; ".join(
            f"{r['name']} ({r['error']})" for r in failed))
    if skipped:
        notes.append(f"{len(skipped)} skipped: " + "; ".join(
            f"{s['backbone']}+{s['head']} ({s['reason']})" for s in skipped))
    notes.append(f"MLflow sweep run: {parent_id}")
    html = plots.report_html(_display_rows(rows), card, figures, title=f"tlpipe sweep {title}",
                             notes="\n".join(notes))
    path = sweep_dir / "report.html"
    path.write_text(html, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- reading back

def latest_sweep_run_id(experiment: str = DEFAULT_EXPERIMENT) -> str:
    """The most recent FINISHED sweep of `experiment` (tracking URI already set)."""
    from jobs.tracking import KIND_TAG, client

    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment {experiment!r} here; run a sweep first")
    runs = c.search_runs([exp.experiment_id],
                         filter_string=f"tags.`{KIND_TAG}` = '{SWEEP_KIND}' and "
                                       "attributes.status = 'FINISHED'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise LookupError(f"no finished sweep in experiment {experiment!r}; run a sweep first")
    return runs[0].info.run_id


def compare(root: str | os.PathLike, sweep_run_id: str | None = None, *,
            experiment: str = DEFAULT_EXPERIMENT) -> list[dict[str, Any]]:
    """Leaderboard rows of the latest finished sweep (or `sweep_run_id`), read back from MLflow:
    one per candidate, best first, failed last (keys: ROW_KEYS)."""
    from jobs.tracking import quiet_mlflow, tracking_uri_for, use_tracking_uri

    quiet_mlflow()
    use_tracking_uri(tracking_uri_for(root))
    return leaderboard(sweep_run_id or latest_sweep_run_id(experiment))
