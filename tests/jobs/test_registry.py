"""Predictor artifact → MLflow pyfunc (models from code) → registry aliases and the promotion gate.

Real EfficientNet-Lite0 weights at 64 px, real CIFAR-10 photos, a real sqlite MLflow store.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

CLASSES = ("airplane", "automobile", "frog")


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment(
        "registry-test", artifact_location=(root / "artifacts").as_uri()))
    yield root
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def predictor_dir(cifar10_dir, tmp_path_factory):
    from feature_store.index import SupportIndex
    from pipeline.backbones import get_spec, load_backbone
    from pipeline.heads import LinearProbe
    from pipeline.predictor import Predictor
    from pipeline.preprocess import load_pixels

    spec = get_spec("efficientnet/tf_efficientnet_lite0.in1k").replace(input_size=64, crop_pct=1.0)
    bb = load_backbone(spec, engine="torch")
    paths, labels = [], []
    for cls in CLASSES:
        files = sorted((cifar10_dir / "train" / cls).glob("*.jpg"))[:40]
        paths += files
        labels += [cls] * len(files)
    X = bb.embed(np.stack([load_pixels(str(p), spec) for p in paths]))
    y = np.array(labels)
    train = np.arange(len(y)) % 4 != 0
    head = LinearProbe().fit(X[train], y[train])
    support = SupportIndex(X.shape[1])
    support.add(X[train], list(y[train]))
    pred = Predictor(spec, head, support=support, info={"name": "cifar3"})
    pred.calibrate(X[~train], y[~train], target_precision=0.8)
    out = tmp_path_factory.mktemp("predictor")
    pred.save(out)
    test_images = [p.read_bytes() for cls in CLASSES
                   for p in sorted((cifar10_dir / "test" / cls).glob("*.jpg"))[:4]]
    return out, test_images


def test_predictor_round_trip_identical(predictor_dir):
    from pipeline.predictor import Predictor

    path, images = predictor_dir
    a = Predictor.load(path, engine="torch").predict_images(images)
    b = Predictor.load(path, engine="torch").predict_images(images)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]
    assert {p.decision for p in a} <= {"classifier", "fallback", "abstain"}
    assert sum(p.label == cls for p, cls in zip(a, np.repeat(CLASSES, 4))) >= 6


def test_pyfunc_from_registry_matches_in_process(mlflow_store, predictor_dir):
    import mlflow
    import pandas as pd

    from jobs.registry import alias_version, predictor_path, register_predictor
    from pipeline.predictor import Predictor

    path, images = predictor_dir
    version = register_predictor(path, "cifar3-pyfunc", tags={"metric_value": 0.7})
    assert alias_version("cifar3-pyfunc", "challenger") == version
    model = mlflow.pyfunc.load_model(f"models:/cifar3-pyfunc@challenger")
    df = pd.DataFrame({"image": [base64.b64encode(b).decode() for b in images]})
    served = model.predict(df)
    local = Predictor.load(predictor_path("cifar3-pyfunc", version)).predict_images(images)
    assert list(served["label"]) == [p.label for p in local]
    assert list(served["decision"]) == [p.decision for p in local]
    np.testing.assert_allclose(served["score"].to_numpy(), [p.score for p in local], rtol=1e-5)
    # The logged model holds no pickle: the python model is stored as source code.
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/cifar3-pyfunc/{version}"))
    assert not list(model_dir.rglob("*.pkl")) and not list(model_dir.rglob("*.pickle"))


def test_promotion_gate(mlflow_store, predictor_dir):
    from mlflow import MlflowClient

    from jobs.registry import alias_version, promote, register_predictor

    path, _ = predictor_dir
    name = "cifar3-gate"
    tags = {"selection_metric": "balanced_accuracy", "test_split_hash": "split-A"}
    v1 = register_predictor(path, name, tags={**tags, "metric_value": 0.70})
    r = promote(name)
    assert r.promoted and alias_version(name, "champion") == v1 and "no current champion" in r.reason

    v2 = register_predictor(path, name, tags={**tags, "metric_value": 0.65})
    r = promote(name)
    assert not r.promoted and alias_version(name, "champion") == v1
    assert "not strictly better" in MlflowClient().get_model_version(name, v2).tags["promotion_refused"]

    v3 = register_predictor(path, name, tags={**tags, "metric_value": 0.90, "test_split_hash": "split-B"})
    r = promote(name)
    assert not r.promoted and "different test split" in r.reason

    r = promote(name, version=v2, force=True)
    assert r.promoted and alias_version(name, "champion") == v2
    assert MlflowClient().get_model_version(name, v2).tags["promotion_reason"].startswith("forced")

    v4 = register_predictor(path, name, tags={**tags, "metric_value": 0.75})
    r = promote(name)
    assert r.promoted and alias_version(name, "champion") == v4 and r.previous_champion == v2
    assert v3 != v4


def test_local_backbone_weights_travel_inside_the_artifact(predictor_dir, tmp_path):
    """A predictor on a local (e.g. fine-tuned) backbone bundles the weights: it still loads,
    with the same predictions, after the original weights are gone and the folder moved."""
    import shutil

    import timm
    import torch
    from safetensors.torch import save_file

    from pipeline.backbones import get_spec
    from pipeline.heads import LinearProbe
    from pipeline.predictor import Predictor

    _, images = predictor_dir
    torch.manual_seed(5)
    weights = tmp_path / "weights" / "r.safetensors"
    weights.parent.mkdir()
    save_file(timm.create_model("resnet10t", pretrained=False, num_classes=0).state_dict(), weights)
    spec = get_spec("timm/resnet10t.c3_in1k").replace(weights=str(weights), input_size=32)
    pred = Predictor(spec, LinearProbe().fit(np.random.default_rng(0).normal(size=(40, 512)),
                                             np.repeat(["a", "b"], 20)))
    pred.save(tmp_path / "p")
    expected = [p.to_dict() for p in Predictor.load(tmp_path / "p", engine="torch").predict_images(images)]
    fingerprint = spec.fingerprint
    shutil.rmtree(weights.parent)
    shutil.move(tmp_path / "p", tmp_path / "moved")
    moved = Predictor.load(tmp_path / "moved", engine="torch")
    assert Path(moved.spec.weights).is_relative_to(tmp_path / "moved")
    assert [p.to_dict() for p in moved.predict_images(images)] == expected
    assert moved.spec.fingerprint == fingerprint  # weights are keyed by content, not path
