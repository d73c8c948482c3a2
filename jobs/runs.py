"""Runs that always end: `tracked_run` ends a run FINISHED, FAILED or KILLED whatever happens in
its block (SIGTERM included), records errors on it and tags the driver process (so that
`jobs.mlflow_setup.reap_stale_runs` can end it if the driver dies)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import traceback
from typing import Any, Iterator, Mapping

from jobs.mlflow_setup import ERROR_TAG, ERROR_TYPE_TAG, MAX_TAG_LEN, client, driver_tags

logger = logging.getLogger(__name__)


class RunTerminated(BaseException):
    """Raised inside `tracked_run` when the process receives SIGTERM (the run ends KILLED)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"received signal {signum}")
        self.signum = signum


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
    c.set_tag(run_id, ERROR_TAG, message[:MAX_TAG_LEN])
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
