"""Constants and helpers shared by the serving tests' conftest and test modules."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LITE0 = "efficientnet/tf_efficientnet_lite0.in1k"
HEAD_CLASSES = ("airplane", "automobile", "bird")
NEW_CLASS = "frog"
MARGIN = 0.03  # |score - threshold| kept away from the boundary (embedding noise across batches)


def free_port() -> int:
    from deploy.app import free_port as _free

    return _free()


def copy_predictor(src: Path, dst: Path, **info) -> Path:
    """A copy of a saved predictor with extra `info` (a new 'version' of the same model)."""
    from bench.soak import copy_predictor_version

    return copy_predictor_version(src, dst, **info)


def register_in_tmp_store(root: Path, experiment: str, predictor_dir: Path, name: str,
                          alias: str = "champion") -> tuple[str, str, str]:
    """Register `predictor_dir` as `name`@`alias` in a fresh MLflow store under `root`, leaving
    the process's tracking URI as it was; returns (tracking_uri, experiment_id, version)."""
    import os

    import mlflow

    from jobs.registry import register_predictor
    from jobs.tracking import setup_mlflow

    previous, env = mlflow.get_tracking_uri(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        experiment_id = setup_mlflow(root, experiment)
        mlflow.set_experiment(experiment_id=experiment_id)
        version = register_predictor(predictor_dir, name, alias=alias)
        return mlflow.get_tracking_uri(), experiment_id, version
    finally:
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env
        mlflow.set_tracking_uri(previous)


@dataclass
class ServedApp:
    """An app under test: its base URL and an httpx client."""

    url: str
    client: object

    def get(self, path, **kw):
        return self.client.get(self.url + path, **kw)

    def post(self, path, **kw):
        return self.client.post(self.url + path, **kw)


def lite0_embedder(input_size: int):
    """(spec, embed(paths) -> embeddings) of the real EfficientNet-Lite0 weights at `input_size`
    (full crop, ONNX Runtime); skips the calling test where the weights are missing."""
    import dataclasses

    import numpy as np
    import pytest

    from pipeline.backbones import get_spec, load_backbone, weights_available
    from pipeline.preprocess import load_pixels

    spec = dataclasses.replace(get_spec(LITE0), input_size=input_size, crop_pct=1.0)
    ok, why = weights_available(spec)
    if not ok:
        pytest.skip(why)
    backbone = load_backbone(spec, engine="onnx")

    def embed(paths):
        return np.concatenate([backbone.embed(np.stack([load_pixels(p, spec) for p in paths[i:i + 32]]))
                               for i in range(0, len(paths), 32)])

    return spec, embed
