"""MLflow setup and logging helpers: where runs live, runs that always end, evaluation logging.

Runs live under the state root unless MLFLOW_TRACKING_URI says otherwise (read at call time):
``sqlite:///<root>/mlflow.db`` for runs, ``<root>/mlartifacts/<experiment>/`` for artifacts.

    exp_id = setup_mlflow(root, "tlpipe-sweep")
    with tracked_run(exp_id, run_name="sweep") as run:        # FAILED / KILLED on the way out
        log_dataset_card(ds.card, run_id=run.info.run_id)     # if anything raises inside
        with tracked_run(exp_id, run_name="child", parent_run_id=run.info.run_id) as child:
            log_eval_report(report, run_id=child.info.run_id)

Helpers take an explicit ``run_id`` (default: the active fluent run) and write through an
`MlflowClient`, so the driver can log to any run in any order.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import signal
import tempfile
import threading
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

logger = logging.getLogger(__name__)

#: run tags written by tlpipe
KIND_TAG = "tlpipe.kind"                 # "sweep" | "candidate" | ...
ERROR_TYPE_TAG = "tlpipe.error_type"
ERROR_TAG = "tlpipe.error"
#: who drives a run: set by `tracked_run`, read by `reap_stale_runs` after a driver was killed
DRIVER_HOST_TAG = "tlpipe.driver.host"
DRIVER_PID_TAG = "tlpipe.driver.pid"
DRIVER_START_TAG = "tlpipe.driver.start"   # the process's start token (boot id + start tick)
DRIVER_PIDNS_TAG = "tlpipe.driver.pidns"   # pid namespace: containers may share a hostname
REAPED_TAG = "tlpipe.reaped"

_MAX_PARAM_LEN = 6000
_MAX_TAG_LEN = 8000
_MAX_KEY_LEN = 250
_BATCH = 100
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. :/]")


class RunTerminated(BaseException):
    """Raised inside `tracked_run` when the process receives SIGTERM (the run ends KILLED)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"received signal {signum}")
        self.signum = signum


# ----------------------------------------------------------------------------- where runs live

def _is_local_uri(uri: str) -> bool:
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    return scheme in ("", "file", "sqlite", "postgresql", "mysql", "mssql") or len(scheme) == 1


def tracking_uri_for(root: str | os.PathLike) -> str:
    """$MLFLOW_TRACKING_URI if set, else ``sqlite:///<root>/mlflow.db`` (root made absolute)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(root).expanduser().resolve() / 'mlflow.db'}"


def _slug(text: str, max_len: int = 80) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")
    return (s or "experiment")[:max_len]


def artifact_location_for(root: str | os.PathLike, experiment: str,
                          tracking_uri: str | None = None) -> str | None:
    """``file://<root>/mlartifacts/<experiment slug>`` — or None for a tracking server (http,
    databricks, ...), whose own artifact store decides."""
    uri = tracking_uri or tracking_uri_for(root)
    if not _is_local_uri(uri):
        return None
    return (Path(root).expanduser().resolve() / "mlartifacts" / _slug(experiment)).as_uri()


def quiet_mlflow() -> None:
    """MLflow's INFO chatter (database migrations, 'View run at ...') down to warnings."""
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def use_tracking_uri(uri: str) -> None:
    """`mlflow.set_tracking_uri` without its side effect on the environment: MLflow also exports
    MLFLOW_TRACKING_URI, which would then override every later root (`tracking_uri_for`)."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def setup_mlflow(root: str | os.PathLike, experiment: str) -> str:
    """Point MLflow at the root's store and return the id of `experiment` (created if needed,
    with its artifacts under the root; restored if it was deleted)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    quiet_mlflow()
    Path(root).expanduser().mkdir(parents=True, exist_ok=True)
    uri = tracking_uri_for(root)
    use_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:
            return client.create_experiment(
                experiment, artifact_location=artifact_location_for(root, experiment, uri),
                tags={"tlpipe.root": str(Path(root).expanduser().resolve())})
        except MlflowException:
            exp = client.get_experiment_by_name(experiment)  # created concurrently
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    try:
        reap_stale_runs(client)
    except Exception as exc:  # housekeeping must never stop a job from starting
        logger.warning("could not check %s for runs left RUNNING by killed drivers: %s", uri, exc)
    return exp.experiment_id


# ----------------------------------------------------------------------------- killed drivers

def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state first), or None where it cannot be read. The
    command name (field 2) may hold spaces and parentheses: fields restart after the last ')'."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()


def _process_start_token(pid: int) -> str | None:
    """An id of the process `pid` that a later process reusing the pid will not share: the boot
    id + the process's start time in clock ticks (Linux /proc). None where /proc is missing."""
    fields = _stat_fields(pid)
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return f"{boot}:{fields[19]}" if fields is not None and len(fields) > 19 else None


def _is_zombie(pid: int) -> bool:
    return (_stat_fields(pid) or [""])[0] == "Z"


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _hostname() -> str:
    import socket

    return socket.gethostname()


def driver_tags() -> dict[str, str]:
    """Tags naming this process as the driver of a run (host, pid, start token)."""
    pid = os.getpid()
    return {DRIVER_HOST_TAG: _hostname(), DRIVER_PID_TAG: str(pid),
            DRIVER_START_TAG: _process_start_token(pid) or "", DRIVER_PIDNS_TAG: _pid_namespace()}


def _driver_gone(tags: Mapping[str, str], host: str) -> str | None:
    """Why the run's driver is known to be dead, or None (alive, another host, or unknown)."""
    if tags.get(DRIVER_HOST_TAG) != host:
        return None  # another machine's process table is not ours to read
    if (tags.get(DRIVER_PIDNS_TAG) or "") != _pid_namespace():
        return None  # another container on this host: its pids are not ours either
    try:
        pid = int(tags.get(DRIVER_PID_TAG, ""))
    except ValueError:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"its driver (pid {pid} on {host}) is gone"
    except PermissionError:
        pass  # alive, owned by another user
    if _is_zombie(pid):
        return f"its driver (pid {pid} on {host}) has exited (a zombie awaiting its parent)"
    token = tags.get(DRIVER_START_TAG) or ""
    current = _process_start_token(pid)
    if token and current and token != current:
        return f"its driver (pid {pid} on {host}) is gone; the pid now belongs to another process"
    return None


def reap_stale_runs(mlflow_client=None, experiment_ids: Sequence[str] | None = None) -> list[str]:
    """Mark KILLED every RUNNING run whose driver process on this host is dead.

    A driver killed with SIGKILL (or by the OOM killer, or a power cut) cannot end its runs; they
    would stay RUNNING forever. `tracked_run` tags each run with its driver's host, pid and
    process start token; this finds RUNNING runs whose driver was on this host and no longer
    exists (or whose pid was reused), records why (``tlpipe.error``, ``tlpipe.reaped``) and ends
    them KILLED. Runs of other hosts and runs without driver tags are left alone. Returns the ids
    of the runs it ended. `setup_mlflow` calls it, so the next `tlpipe run` cleans up.
    """
    import time

    from mlflow.entities import ViewType

    c = mlflow_client or client()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ALL)]
    host = _hostname()
    flt = f"attributes.status = 'RUNNING' and tags.`{DRIVER_HOST_TAG}` = '{host}'"
    reaped: list[str] = []
    for i in range(0, len(experiment_ids), 100):  # MLflow caps experiment ids per search
        token = None
        while True:
            page = c.search_runs(list(experiment_ids[i:i + 100]), filter_string=flt,
                                 run_view_type=ViewType.ALL, max_results=1000, page_token=token)
            for run in page:
                why = _driver_gone(run.data.tags, host)
                if why is None:
                    continue
                message = (f"run left RUNNING: {why} (killed, e.g. SIGKILL / OOM, before it could "
                           f"end the run); marked KILLED by pid {os.getpid()} at "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
                logger.warning("MLflow run %s (%s): %s", run.info.run_id, run.info.run_name,
                               message)
                c.set_tag(run.info.run_id, ERROR_TYPE_TAG, "DriverKilled")
                c.set_tag(run.info.run_id, ERROR_TAG, message)
                c.set_tag(run.info.run_id, REAPED_TAG, "true")
                c.set_terminated(run.info.run_id, "KILLED")
                reaped.append(run.info.run_id)
            token = page.token
            if not token:
                break
    return reaped


def client():
    """An MlflowClient on the current tracking URI (call `setup_mlflow` first)."""
    import mlflow

    return mlflow.MlflowClient()


def _resolve_run_id(run_id: str | None) -> str:
    if run_id:
        return run_id
    import mlflow

    active = mlflow.active_run()
    if active is None:
        raise RuntimeError("no run_id given and no active MLflow run; pass run_id= or log inside "
                           "`with tracked_run(...)`")
    return active.info.run_id


# ----------------------------------------------------------------------------- runs that end

def _status_for(exc: BaseException | None) -> str:
    if exc is None:
        return "FINISHED"
    if isinstance(exc, (KeyboardInterrupt, RunTerminated)):
        return "KILLED"
    if isinstance(exc, SystemExit) and exc.code in (0, None):
        return "FINISHED"
    if getattr(exc, "exit_code", None) == 0:  # click / typer Exit(0)
        return "FINISHED"
    return "FAILED"


def _fluent_stack_ids() -> list[str] | None:
    try:
        from mlflow.tracking import fluent

        return [r.info.run_id for r in fluent._active_run_stack.get()]
    except Exception:  # private API moved: fall back to ending via the client
        return None


def _end(run_id: str, status: str) -> None:
    import mlflow

    ids = _fluent_stack_ids()
    if ids is not None and run_id in ids:
        # runs started inside ours and never ended go down with the same status
        for _ in range(len(ids) - ids.index(run_id)):
            mlflow.end_run(status)
    else:
        client().set_terminated(run_id, status)


def record_error(run_id: str, exc: BaseException, tb: str | None = None) -> None:
    """Tags (error type, message) and an ``error.txt`` artifact (traceback) on a run."""
    remote_tb = getattr(exc, "remote_traceback", None)  # an error raised elsewhere (Ray task)
    message = str(exc) if remote_tb else f"{type(exc).__name__}: {exc}"
    c = client()
    c.set_tag(run_id, ERROR_TYPE_TAG, getattr(exc, "error_type", None) or type(exc).__name__)
    c.set_tag(run_id, ERROR_TAG, message[:_MAX_TAG_LEN])
    text = tb or remote_tb or "".join(
        traceback.format_exception(type(exc), exc, exc.__traceback__))
    c.log_text(run_id, text, "error.txt")


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """In the main thread, SIGTERM raises RunTerminated while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise RunTerminated(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not allowed here (embedded interpreter...)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def tracked_run(experiment_id: str, *, run_name: str | None = None,
                parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None,
                description: str | None = None, handle_sigterm: bool = True):
    """Start an MLflow run (nested under the active run, or under `parent_run_id`) and make sure
    it ends: FINISHED on success, KILLED on KeyboardInterrupt / SIGTERM, FAILED on any other
    exception (with the error recorded as tags and an ``error.txt`` traceback). The exception
    propagates. Yields the `mlflow.ActiveRun`.

    A SIGKILLed driver runs no handler: the run is tagged with this process's host, pid and start
    token (`driver_tags`) so that the next `setup_mlflow` (`reap_stale_runs`) ends it KILLED.
    """
    import mlflow

    active = mlflow.active_run()
    run = mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, nested=active is not None,
        parent_run_id=parent_run_id,
        tags={**driver_tags(), **{k: str(v) for k, v in (tags or {}).items()}},
        description=description)
    run_id = run.info.run_id
    guard = _sigterm_raises() if handle_sigterm else contextlib.nullcontext()
    try:
        with guard:
            yield run
    except BaseException as exc:
        status = _status_for(exc)
        try:
            if status != "FINISHED":
                record_error(run_id, exc)
        except Exception as log_exc:  # never mask the original error
            logger.warning("could not record the error on MLflow run %s: %s", run_id, log_exc)
        finally:
            try:
                _end(run_id, status)
            except Exception as end_exc:
                logger.warning("could not end MLflow run %s as %s: %s", run_id, status, end_exc)
        raise
    else:
        _end(run_id, "FINISHED")


# ----------------------------------------------------------------------------- small loggers

def metric_key(name: str) -> str:
    """A valid MLflow metric/param key from any text (class names included)."""
    key = _KEY_BAD.sub("_", str(name)).replace("..", "_").lstrip("/")
    return key[:_MAX_KEY_LEN] or "_"


def finite_float(v: Any) -> float | None:
    """float(v) when it is a finite number, else None (MLflow rejects NaN/inf and junk)."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def log_metrics(metrics: Mapping[str, Any], *, run_id: str | None = None,
                step: int = 0) -> dict[str, float]:
    """Log every finite numeric value (None / NaN / inf / non-numbers skipped); returns what was
    logged, keyed as MLflow stores it."""
    import time

    from mlflow.entities import Metric

    run_id = _resolve_run_id(run_id)
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

    run_id = _resolve_run_id(run_id)
    clean = {metric_key(k): _param_value(v) for k, v in params.items() if v is not None}
    items = [Param(k, v) for k, v in clean.items()]
    c = client()
    for i in range(0, len(items), _BATCH):
        c.log_batch(run_id, params=items[i:i + _BATCH])
    return clean


def log_tags(tags: Mapping[str, Any], *, run_id: str | None = None) -> None:
    from mlflow.entities import RunTag

    run_id = _resolve_run_id(run_id)
    items = [RunTag(str(k), _param_value(v)[:_MAX_TAG_LEN]) for k, v in tags.items()
             if v is not None]
    c = client()
    for i in range(0, len(items), _BATCH):
        c.log_batch(run_id, tags=items[i:i + _BATCH])


def log_bytes(data: bytes, artifact_file: str, *, run_id: str | None = None) -> None:
    """Write `data` as the artifact `artifact_file` (e.g. ``"eval/confusion_matrix.png"``)."""
    run_id = _resolve_run_id(run_id)
    folder, name = os.path.split(artifact_file)
    with tempfile.TemporaryDirectory(prefix="tlpipe-artifact-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        client().log_artifact(run_id, str(path), artifact_path=folder or None)


def log_text(text: str, artifact_file: str, *, run_id: str | None = None) -> None:
    client().log_text(_resolve_run_id(run_id), text, artifact_file)


def log_json(obj: Any, artifact_file: str, *, run_id: str | None = None) -> None:
    log_text(json.dumps(obj, indent=2, default=str), artifact_file, run_id=run_id)


def log_dir(local_dir: str | os.PathLike, artifact_path: str, *, run_id: str | None = None) -> None:
    client().log_artifacts(_resolve_run_id(run_id), str(local_dir), artifact_path=artifact_path)


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
        client().log_table(_resolve_run_id(run_id), data, artifact_file)


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
    run_id = _resolve_run_id(run_id)
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
    from pipeline import plots

    figs = {"confusion_matrix.png": plots.png_bytes(plots.confusion_matrix_figure(report)),
            "reliability.png": plots.png_bytes(plots.reliability_figure(report))}
    if hardest is not None and hardest_images is not None:
        figs["hardest_examples.png"] = plots.png_bytes(plots.hardest_examples_figure(
            list(hardest_images), plots.hardest_captions(hardest)))
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

    run_id = _resolve_run_id(run_id)
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
