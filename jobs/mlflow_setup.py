"""Where runs live: tracking URIs, experiments, the client, the run tags tlpipe writes, and the
reaper `setup_mlflow` runs: runs whose driver process died without ending them are ended KILLED.

Runs live under the state root unless MLFLOW_TRACKING_URI says otherwise (read at call time):
``sqlite:///<root>/mlflow.db`` for runs, ``<root>/mlartifacts/<experiment>/`` for artifacts.
On a cluster, MLFLOW_TRACKING_URI names an ``mlflow server`` (http[s]://) that every node
reaches: runs, the registry and artifacts (``mlflow-artifacts:/``, proxied by the server to its
``--artifacts-destination``) then all go through it, and no node needs a shared disk or
object-store credentials for MLflow (deploy/PRODUCTION.md).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

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
#: longest tag value MLflow stores
MAX_TAG_LEN = 8000


class TrackingServerError(ConnectionError):
    """The MLflow tracking server named by MLFLOW_TRACKING_URI does not answer."""


#: how long `check_tracking_server` waits for the server's /health
HEALTH_TIMEOUT_S = 10.0


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
    """MLflow's INFO chatter (database migrations) down to warnings; no progress bars, and no
    '🏃 View run ... at: http://...' pair on stdout for every run started against a tracking
    server (two lines per sweep candidate; the CLI prints where the sweep is once)."""
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def check_tracking_server(uri: str, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    """For an http(s) tracking URI, one GET of the server's ``/health``: raises
    `TrackingServerError` when nothing answers there (refused, unknown host, timeout), so a job
    fails in seconds instead of after MLflow's retries (minutes) — or after hours of extraction.
    Any HTTP answer passes (a proxy or auth in front may answer 401 / 404): only reachability is
    checked. Other URIs (sqlite, databricks, ...) are not checked."""
    import urllib.error
    import urllib.request

    if not uri.lower().startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", None) or exc
        raise TrackingServerError(
            f"cannot reach the MLflow tracking server at {uri} ({why}); start it (`mlflow server "
            "--backend-store-uri ... --artifacts-destination ...`, see deploy/PRODUCTION.md) or "
            "unset MLFLOW_TRACKING_URI to track under the state root") from None


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
    check_tracking_server(uri)
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
    # a local store is tlpipe's own: all its experiments; a shared server holds other people's
    # experiments too, so only this one is searched (one query, not one per 100 experiments)
    try:
        reap_stale_runs(client, None if _is_local_uri(uri) else [exp.experiment_id])
    except Exception as exc:  # housekeeping must never stop a job from starting
        logger.warning("could not check %s for runs left RUNNING by killed drivers: %s", uri, exc)
    return exp.experiment_id


# ----------------------------------------------------------------------------- the client


def client():
    """An MlflowClient on the current tracking URI (call `setup_mlflow` first)."""
    import mlflow

    return mlflow.MlflowClient()


def resolve_run_id(run_id: str | None) -> str:
    if run_id:
        return run_id
    import mlflow

    active = mlflow.active_run()
    if active is None:
        raise RuntimeError("no run_id given and no active MLflow run; pass run_id= or log inside "
                           "`with tracked_run(...)`")
    return active.info.run_id


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
