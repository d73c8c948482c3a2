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


@pytest.fixture(scope="session")
def small_spec():
    """Real EfficientNet-Lite0 at 96 px: CIFAR photos are 32 px, so this keeps the ImageNet
    features useful and the tests fast (one ONNX export, cached by fingerprint, for all of them)."""
    import dataclasses

    from pipeline.backbones import get_spec

    return dataclasses.replace(get_spec("efficientnet/tf_efficientnet_lite0.in1k"), input_size=96, crop_pct=1.0)
