"""Starting or joining Ray: an embedded local Ray by default, a cluster when RAY_ADDRESS says so."""

from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

#: the GCS address of the local Ray that `ensure_ray` started in this process (None: it joined a
#: cluster, or Ray was started elsewhere)
_embedded = {"gcs_address": None}


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> dict:
    """Initialise Ray once per process and return its cluster resources.

    `address` (or the RAY_ADDRESS environment variable, read here and not at import) joins an
    existing cluster — the same code then runs under `ray job submit`. Otherwise a local Ray is
    started with the machine's CPUs, no dashboard and quiet logs.
    """
    import ray

    if not ray.is_initialized():
        # no address: always a fresh embedded Ray, even when a `ray start` cluster runs here
        # (RAY_ADDRESS=auto joins that one)
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        common = dict(
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=True,
        )
        if address != "local":
            ray.init(address=address, **common)
        else:
            _quiet_token_auth_notice()
            ray.init(
                address="local",
                num_cpus=num_cpus or os.cpu_count(),
                include_dashboard=False,
                **common,
            )
            _embedded["gcs_address"] = ray.get_runtime_context().gcs_address
        if "ray.data" in sys.modules:  # else `quiet_ray_data` runs where Ray Data is first used
            quiet_ray_data()
    return ray.cluster_resources()


class _DropTokenAuthEnabledNotice(logging.Filter):
    """Drops the one record "Token authentication is enabled for this Ray cluster. Set
    RAY_AUTH_MODE=disabled to opt out" that Ray (2.60 here) logs at WARNING each time
    `ray.init()` starts a new local cluster with RAY_AUTH_MODE unset.

    Why it is filtered and not acted on: it is informational here. tlpipe's embedded Ray is
    started by tlpipe, for this process, on this machine, and token authentication (Ray's default,
    token in ~/.ray/auth_token) is what we want it to keep; the only action it suggests is turning
    security off. Setting RAY_AUTH_MODE=token ourselves would also silence it, but only if done
    before Ray first reads its config in this process, which tlpipe cannot guarantee (ray may be
    imported earlier). Every other record of that logger passes, notably the warning that a
    cluster starts *without* authentication."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled for this Ray cluster")


_TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _quiet_token_auth_notice() -> None:
    log = logging.getLogger(_TOKEN_AUTH_LOGGER)
    if not any(isinstance(f, _DropTokenAuthEnabledNotice) for f in log.filters):
        log.addFilter(_DropTokenAuthEnabledNotice())


def quiet_ray_data() -> None:
    """Ray Data without progress bars or per-job console lines (tlpipe prints its own)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    # Ray Data then logs, on the console, a WARNING "Progress bars disabled. To enable, set ..."
    # (informational: tlpipe disables them on purpose and prints its own progress, see
    # jobs.progress) and an INFO "Dataset ... execution finished in N seconds" per job (tlpipe
    # prints its own stats table). Both stay in the session's ray-data.log: they are only marked
    # hidden for Ray Data's console handler.
    _hide_from_console("ray.data._internal.progress",
                       lambda r: str(r.msg).startswith("Progress bars disabled"))
    _hide_from_console("ray.data._internal.execution.streaming_executor",
                       lambda r: r.levelno < logging.WARNING)


class _HideFromRayDataConsole(logging.Filter):
    """Sets `hide` on matching records: Ray Data's console handler drops those
    (`ray.data._internal.logging.HiddenRecordFilter`), its file handler keeps them."""

    def __init__(self, match) -> None:
        super().__init__()
        self.match = match

    def filter(self, record: logging.LogRecord) -> bool:
        if self.match(record):
            record.hide = True
        return True


def _hide_from_console(logger_name: str, match) -> None:
    log = logging.getLogger(logger_name)
    if not any(isinstance(f, _HideFromRayDataConsole) for f in log.filters):
        log.addFilter(_HideFromRayDataConsole(match))


#: threads one task may usefully take for a batched solve (more gain little on one node)
MAX_TASK_CPUS = 8


def import_modules(names: Sequence[str]) -> int:
    """Import `names` in this process (a Ray worker); its pid."""
    import importlib

    for name in names:
        importlib.import_module(name)
    return os.getpid()


def warm_workers(modules: Sequence[str], *, cap: int = MAX_TASK_CPUS) -> list:
    """One task per CPU (at most `cap`) that imports `modules`, started now and not waited for:
    the workers that later run the real tasks are then already up with those imports done (torch
    alone takes seconds per fresh worker), while the driver does its own work. Returns the refs."""
    import ray

    task = ray.remote(import_modules).options(num_cpus=1, max_retries=0)
    n = int(max(1, min(cap, ray.cluster_resources().get("CPU", 1))))
    return [task.remote(list(modules)) for _ in range(n)]


def task_slots(cpus_per_task: float) -> int | None:
    """How many tasks of `cpus_per_task` CPUs the embedded local Ray runs at once; None on a
    joined cluster, whose size may change (an autoscaler adds nodes for queued tasks, so a driver
    there submits everything at once)."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().gcs_address != _embedded["gcs_address"]:
        return None
    cpus = ray.cluster_resources().get("CPU", 1)
    return int(max(1, cpus // max(cpus_per_task, 1e-9)))


def cluster_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def node_cpus(cap: int = MAX_TASK_CPUS) -> int:
    """CPUs of the largest live node (at most `cap`): the threads a task that runs alone can
    use."""
    import ray

    cpus = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return int(max(1, min(cap, max(cpus, default=1))))
