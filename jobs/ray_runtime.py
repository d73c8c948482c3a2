"""Starting or joining Ray: an embedded local Ray by default, a cluster when RAY_ADDRESS says so."""

from __future__ import annotations

import logging
import os


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
            ray.init(
                address="local",
                num_cpus=num_cpus or os.cpu_count(),
                include_dashboard=False,
                **common,
            )
        _quiet_ray_data()
    return ray.cluster_resources()


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False


def cluster_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1
