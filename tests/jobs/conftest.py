from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A real embedded local Ray for the whole session (2 CPUs, like CI)."""
    import ray

    from jobs.ray_runtime import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()
