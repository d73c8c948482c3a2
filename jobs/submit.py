"""`tlpipe submit`: `tlpipe run` as a Ray job on a running cluster, through Ray's Jobs API.

The job's driver runs on the cluster (its head node), so paths must be ones the cluster can
read: local paths that exist here are made absolute (a cluster on this machine, or shared
storage mounted at the same place), others are passed as they are. The MLflow tracking URI and
tlpipe's state, feature store and cache roots travel with the job when they are set here: on a
cluster of several machines, MLFLOW_TRACKING_URI names an `mlflow server` and TLPIPE_FEATURES a
shared fsspec URL (deploy/PRODUCTION.md).

Token authentication (Ray >= 2.52; `RAY_AUTH_MODE=token` on the cluster): the Jobs client sends
the token when this process has `RAY_AUTH_MODE=token` and finds it in `RAY_AUTH_TOKEN`,
`RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token` (`ray get-auth-token` prints it on the head).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from pathlib import Path
from typing import Callable, Sequence

#: environment forwarded to the job when set here (where it logs, where its state and features live)
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "TLPIPE_HOME", "TLPIPE_FEATURES",
                 "TLPIPE_CACHE_DIR")
#: `tlpipe run` options whose value is a path
PATH_OPTIONS = ("--root",)
#: options whose comma-separated items are backbone names or checkpoint folders
FOLDER_LIST_OPTIONS = ("--backbones", "-b")
#: the Jobs API address when neither --address nor RAY_ADDRESS names one
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
#: how long a submission waits for a freshly started head's job agent
AGENT_WAIT_S = 60.0


class SubmitError(RuntimeError):
    """The job could not be submitted or followed; the message says why and what to do."""


def job_address(address: str | None = None) -> str:
    """--address, else $RAY_ADDRESS when it names the Jobs API (http[s]://), else the default."""
    if address:
        return address
    env = os.environ.get("RAY_ADDRESS", "")
    return env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS


def _absolute_if_local(value: str) -> str:
    path = Path(value).expanduser()
    return str(path.resolve()) if not path.is_absolute() and path.exists() else value


def run_entrypoint(data: str, run_args: Sequence[str]) -> str:
    """The job's shell command: `tlpipe run DATA ARGS`, local paths made absolute."""
    args = list(run_args)
    for i, a in enumerate(args[:-1]):
        if a in PATH_OPTIONS and "://" not in args[i + 1]:  # a file:// root is already absolute
            args[i + 1] = str(Path(args[i + 1]).expanduser().resolve())
        elif a in FOLDER_LIST_OPTIONS:  # a folder here is a folder there (same path on the cluster)
            args[i + 1] = ",".join(_absolute_if_local(v) for v in args[i + 1].split(","))
    return shlex.join(["tlpipe", "run", _absolute_if_local(data), *args])


def auth_hint() -> str:
    return ("the cluster uses Ray token authentication: export RAY_AUTH_MODE=token and the cluster's "
            "token in RAY_AUTH_TOKEN (or a file named by RAY_AUTH_TOKEN_PATH; `ray get-auth-token` "
            "prints it on the head node)")


def submit_run(data: str, run_args: Sequence[str], *, address: str | None = None, wait: bool = True,
               submission_id: str | None = None, echo: Callable[[str], None] = print,
               poll_s: float = 1.0) -> tuple[str, str]:
    """Submit `tlpipe run DATA RUN_ARGS`; with `wait`, print its logs as they come and return
    (job id, final status: SUCCEEDED / FAILED / STOPPED), else (job id, status now)."""
    from ray.job_submission import JobSubmissionClient

    address = job_address(address)
    try:
        client = JobSubmissionClient(address)
    except Exception as exc:  # unreachable, refused, 401 / 403 from token auth
        raise SubmitError(_explain(exc, address)) from None
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    entrypoint = run_entrypoint(data, run_args)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                       runtime_env={"env_vars": env_vars} if env_vars else None)
            break
        except Exception as exc:
            # a head that has just started answers before its job agent is up: wait for it
            if "try again later" not in str(exc) or time.monotonic() > deadline:
                raise SubmitError(_explain(exc, address)) from None
            time.sleep(poll_s)
    echo(f"submitted job {job_id} to {address}: {entrypoint}")
    if not wait:
        return job_id, str(client.get_job_status(job_id).value)
    echo(f"following its logs (Ctrl-C stops following; the job goes on: `ray job stop {job_id}`)")
    asyncio.run(_follow(client, job_id, echo))
    status = client.get_job_status(job_id)
    while not status.is_terminal():  # the log stream can end a moment before the status does
        time.sleep(poll_s)
        status = client.get_job_status(job_id)
    return job_id, str(status.value)


async def _follow(client, job_id: str, echo: Callable[[str], None]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        for line in chunk.splitlines():
            echo(line)


def _explain(exc: Exception, address: str) -> str:
    text = " ".join(str(exc).split())
    if any(k in text for k in ("401", "403", "Authentication", "authentication")):
        return f"the Ray cluster at {address} refused the request: {auth_hint()}"
    return (f"cannot reach Ray's Jobs API at {address} ({type(exc).__name__}: {text[:300]}); start a "
            "cluster with `ray start --head` (its dashboard serves the Jobs API on port 8265) or "
            "pass --address http://HEAD:8265")
