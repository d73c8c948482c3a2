"""Logging helpers: metrics, params, tags, artifacts, tables, the dataset card and evaluation
reports, written through an `MlflowClient` to an explicit ``run_id`` (default: the active fluent
run), so the driver can log to any run in any order.

    exp_id = setup_mlflow(root, DEFAULT_EXPERIMENT)            # jobs.mlflow_setup
    with tracked_run(exp_id, run_name="sweep") as run:        # jobs.runs: FAILED / KILLED on the
        log_dataset_card(ds.card, run_id=run.info.run_id)     # way out if anything raises inside
        with tracked_run(exp_id, run_name="child", parent_run_id=run.info.run_id) as child:
            log_eval_report(report, run_id=child.info.run_id)

Where runs live is `jobs.mlflow_setup`, how they end `jobs.runs`; both are re-exported here so
a job needs one import.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

logger = logging.getLogger(__name__)

from jobs.mlflow_setup import (  # noqa: F401
    DRIVER_HOST_TAG,
    DRIVER_PID_TAG,
    DRIVER_PIDNS_TAG,
    DRIVER_START_TAG,
    ERROR_TAG,
    ERROR_TYPE_TAG,
    KIND_TAG,
    MAX_TAG_LEN,
    REAPED_TAG,
    TrackingServerError,
    artifact_location_for,
    check_tracking_server,
    client,
    driver_tags,
    quiet_mlflow,
    reap_stale_runs,
    resolve_run_id,
    setup_mlflow,
    tracking_uri_for,
    use_tracking_uri,
)
from jobs.runs import RunTerminated, record_error, tracked_run  # noqa: F401
from pipeline.numeric import finite_float  # noqa: F401  (re-exported for jobs)

_MAX_PARAM_LEN = 6000
_MAX_KEY_LEN = 250
_BATCH = 100
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. :/]")


def metric_key(name: str) -> str:
    """A valid MLflow metric/param key from any text (class names included)."""
    key = _KEY_BAD.sub("_", str(name)).replace("..", "_").lstrip("/")
    return key[:_MAX_KEY_LEN] or "_"


def log_metrics(metrics: Mapping[str, Any], *, run_id: str | None = None,
                step: int = 0) -> dict[str, float]:
    """Log every finite numeric value (None / NaN / inf / non-numbers skipped); returns what was
    logged, keyed as MLflow stores it."""
    import time

    from mlflow.entities import Metric

    run_id = resolve_run_id(run_id)
    clean = {}
    for k, v in metrics.items():
        f = finite_float(v)
        if f is not None:
            clean[metric_key(k)] = f
    ts = int(time.time() * 1000)
    items = [Metric(k, v, ts, step) for k, v in clean.items()]
    c = client()
    for i in range(0, len(items), 1000):
        c.log_batch(run_id, metrics=items[i:i + 1000])
    return clean


def _param_value(v: Any) -> str:
    if isinstance(v, str):
        s = v
    elif isinstance(v, (dict, list, tuple)):
        s = json.dumps(v, sort_keys=True, default=str)
    else:
        s = str(v)
    return s if len(s) <= _MAX_PARAM_LEN else s[:_MAX_PARAM_LEN - 3] + "..."


def log_params(params: Mapping[str, Any], *, run_id: str | None = None) -> dict[str, str]:
    """Log params as strings (containers as JSON, long values truncated); None values skipped."""
    from mlflow.entities import Param

    run_id = resolve_run_id(run_id)
    clean = {metric_key(k): _param_value(v) for k, v in params.items() if v is not None}
    items = [Param(k, v) for k, v in clean.items()]
    c = client()
    for i in range(0, len(items), _BATCH):
        c.log_batch(run_id, params=items[i:i + _BATCH])
    return clean


def log_tags(tags: Mapping[str, Any], *, run_id: str | None = None) -> None:
    from mlflow.entities import RunTag

    run_id = resolve_run_id(run_id)
    items = [RunTag(str(k), _param_value(v)[:MAX_TAG_LEN]) for k, v in tags.items()
             if v is not None]
    c = client()
    for i in range(0, len(items), _BATCH):
        c.log_batch(run_id, tags=items[i:i + _BATCH])


def log_bytes(data: bytes, artifact_file: str, *, run_id: str | None = None) -> None:
    """Write `data` as the artifact `artifact_file` (e.g. ``"eval/confusion_matrix.png"``)."""
    run_id = resolve_run_id(run_id)
    folder, name = os.path.split(artifact_file)
    with tempfile.TemporaryDirectory(prefix="tlpipe-artifact-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        client().log_artifact(run_id, str(path), artifact_path=folder or None)


def log_text(text: str, artifact_file: str, *, run_id: str | None = None) -> None:
    client().log_text(resolve_run_id(run_id), text, artifact_file)


def log_json(obj: Any, artifact_file: str, *, run_id: str | None = None) -> None:
    log_text(json.dumps(obj, indent=2, default=str), artifact_file, run_id=run_id)


def log_dir(local_dir: str | os.PathLike, artifact_path: str, *, run_id: str | None = None) -> None:
    client().log_artifacts(resolve_run_id(run_id), str(local_dir), artifact_path=artifact_path)


def log_table(rows: Sequence[Mapping[str, Any]], artifact_file: str, *,
              run_id: str | None = None) -> None:
    """`MlflowClient.log_table` (shown in the MLflow UI's evaluation view) from a list of rows."""
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    data = {c: [_table_cell(r.get(c)) for r in rows] for c in columns}
    with warnings.catch_warnings():  # pandas deprecation chatter from inside MLflow
        warnings.simplefilter("ignore")
        client().log_table(resolve_run_id(run_id), data, artifact_file)


def _table_cell(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# ----------------------------------------------------------------------------- dataset card

def _card_dict(card: Any) -> dict[str, Any]:
    if card is None:
        return {}
    if isinstance(card, Mapping):
        return dict(card)
    return card.to_dict()


def dataset_params(card: Any) -> dict[str, Any]:
    """The few dataset facts worth a param: hash, class count, images per split."""
    d = _card_dict(card)
    counts = d.get("counts") or {}
    out: dict[str, Any] = {"dataset_hash": d.get("dataset_hash"), "dataset_name": d.get("name"),
                           "n_classes": len(d.get("classes") or [])}
    for split in ("train", "val", "test"):
        if split in counts:
            out[f"n_{split}"] = int(sum(int(n) for n in counts[split].values()))
    return out


def log_dataset_card(card: Any, *, run_id: str | None = None,
                     artifact_file: str = "dataset/dataset_card.json") -> None:
    """The dataset card as a JSON artifact, its hash / counts as params, classes as a tag."""
    run_id = resolve_run_id(run_id)
    d = _card_dict(card)
    log_json(d, artifact_file, run_id=run_id)
    log_params(dataset_params(d), run_id=run_id)
    classes = [str(c) for c in d.get("classes") or []]
    log_tags({"dataset.hash": d.get("dataset_hash"), "dataset.source": d.get("source"),
              "dataset.classes": ", ".join(classes),
              "dataset.excluded": len(d.get("excluded") or [])}, run_id=run_id)


# ----------------------------------------------------------------------------- evaluation

def eval_metrics(report: Any, *, per_class_max: int = 100) -> dict[str, float]:
    """An EvalReport flattened to metric name -> value (per-class P/R/F1 for up to
    `per_class_max` classes; all of them are in the per-class CSV)."""
    d = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    out: dict[str, float] = {}
    for k in ("accuracy", "top5", "balanced_accuracy", "macro_f1", "ece", "metric_value",
              "ci_low", "ci_high", "n_samples", "top_k"):
        if d.get(k) is not None:
            out[k] = float(d[k])
    per_class = d.get("per_class") or []
    if len(per_class) <= per_class_max:
        for row in per_class:
            name = metric_key(str(row["class"]))
            for m in ("precision", "recall", "f1"):
                out[f"class/{name}/{m}"] = float(row[m])
    return out


def eval_figures(report: Any, *, hardest: Sequence[Mapping[str, Any]] | None = None,
                 hardest_images: Sequence[Any] | None = None) -> dict[str, bytes]:
    """PNG bytes of the confusion matrix, reliability diagram and (if given) the hardest
    examples grid, keyed by their artifact file names."""
    from pipeline import charts

    figs = charts.evaluation_pngs(report)
    if hardest is not None and hardest_images is not None:
        figs["hardest_examples.png"] = charts.hardest_examples_png(
            list(hardest_images), charts.hardest_captions(hardest))
    return figs


def log_eval_report(report: Any, *, run_id: str | None = None, artifact_dir: str = "eval",
                    hardest: Sequence[Mapping[str, Any]] | None = None,
                    hardest_images: Sequence[Any] | None = None,
                    figures: Mapping[str, bytes] | None = None,
                    per_class_max: int = 100) -> dict[str, float]:
    """Log an EvalReport: flattened metrics, ``<dir>/report.json``, ``<dir>/per_class.csv``,
    the confusion matrix, reliability and hardest-examples PNGs (rendered here unless passed
    in `figures` as PNG bytes by file name) and ``<dir>/hardest_examples.json``."""
    from pipeline import plots

    run_id = resolve_run_id(run_id)
    logged = log_metrics(eval_metrics(report, per_class_max=per_class_max), run_id=run_id)
    log_params({"selection_metric": report.selection_metric}, run_id=run_id)
    log_json(report.to_dict(), f"{artifact_dir}/report.json", run_id=run_id)
    log_text(plots.per_class_csv(report), f"{artifact_dir}/per_class.csv", run_id=run_id)
    figs = dict(figures or {})
    missing_core = not {"confusion_matrix.png", "reliability.png"} <= figs.keys()
    want_hardest = hardest is not None and hardest_images is not None \
        and "hardest_examples.png" not in figs
    if missing_core or want_hardest:
        rendered = eval_figures(report, hardest=hardest if want_hardest else None,
                                hardest_images=hardest_images if want_hardest else None)
        for k, v in rendered.items():
            figs.setdefault(k, v)
    with tempfile.TemporaryDirectory(prefix="tlpipe-eval-") as tmp:
        for name, data in figs.items():
            (Path(tmp) / name).write_bytes(data)
        if hardest is not None:
            (Path(tmp) / "hardest_examples.json").write_text(
                json.dumps(list(hardest), indent=2, default=str))
        client().log_artifacts(run_id, tmp, artifact_path=artifact_dir)
    return logged


# ----------------------------------------------------------------------------- reading back

def read_text_artifact(run_id: str, artifact_file: str) -> str:
    """The text of one artifact of a run (downloaded to a temp dir)."""
    with tempfile.TemporaryDirectory(prefix="tlpipe-dl-") as tmp:
        path = client().download_artifacts(run_id, artifact_file, dst_path=tmp)
        return Path(path).read_text()


def format_markdown_table(rows: Sequence[Mapping[str, Any]],
                          columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table (floats to 4 decimals)."""
    if columns is None:
        columns = []
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return "" if not math.isfinite(v) else f"{v:.4f}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    buf = io.StringIO()
    buf.write("| " + " | ".join(columns) + " |\n")
    buf.write("|" + "|".join("---" for _ in columns) + "|\n")
    for r in rows:
        buf.write("| " + " | ".join(cell(r.get(c)) for c in columns) + " |\n")
    return buf.getvalue()
