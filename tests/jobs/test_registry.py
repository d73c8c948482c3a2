"""Predictor artifact → MLflow pyfunc (models from code) → registry aliases and the promotion gate.

Real EfficientNet-Lite0 weights at 64 px, real CIFAR-10 photos, a real sqlite MLflow store.
"""

from __future__ import annotations

import base64
import json
import re
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
    model = mlflow.pyfunc.load_model("models:/cifar3-pyfunc@challenger")
    df = pd.DataFrame({"image": [base64.b64encode(b).decode() for b in images]})
    served = model.predict(df)
    local = Predictor.load(predictor_path("cifar3-pyfunc", version)).predict_images(images)
    assert list(served["label"]) == [p.label for p in local]
    assert list(served["decision"]) == [p.decision for p in local]
    np.testing.assert_allclose(served["score"].to_numpy(), [p.score for p in local], rtol=1e-5)
    # The logged model holds no pickle: the python model is stored as source code.
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/cifar3-pyfunc/{version}"))
    assert not list(model_dir.rglob("*.pkl")) and not list(model_dir.rglob("*.pickle"))

    # bad rows in a batch cost those rows, not the batch: each is an `error` row naming why
    assert served["error"].isna().all()
    bad = {1: "not an image file", 3: "(corrupt|ends before the image data)", 4: "neither bytes nor valid base64",
           5: "file is empty"}
    mixed = [images[0], b"plain text", images[1], images[2][: len(images[2]) // 2], "@@@", b"", images[3]]
    out = model.predict(pd.DataFrame({"image": mixed}))
    assert len(out) == len(mixed) and list(out.columns) == list(served.columns)
    for i, why in bad.items():
        row = out.iloc[i]
        assert row["decision"] == "error" and row["label"] is None and row["score"] == 0.0, row
        assert re.match(f"row {i}: .*{why}", row["error"]), row["error"]
    ok = [0, 2, 6]
    assert out.iloc[ok]["error"].isna().all()
    assert list(out.iloc[ok]["label"]) == [local[j].label for j in (0, 1, 3)]
    np.testing.assert_allclose(out.iloc[ok]["score"].to_numpy(), [local[j].score for j in (0, 1, 3)], rtol=1e-5)
    # what `mlflow models serve` answers for them (its own encoder) is strict JSON: null, never NaN
    import io

    from mlflow.pyfunc.scoring_server import predictions_to_json

    buf = io.StringIO()
    predictions_to_json(out, buf)
    answer = json.loads(buf.getvalue(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON answer"))
    assert answer["predictions"][1]["label"] is None and answer["predictions"][0]["error"] is None
    every_row_bad = model.predict(pd.DataFrame({"image": [b"x", b""]}))
    assert list(every_row_bad["decision"]) == ["error", "error"]
    with pytest.raises(ValueError, match="expected an 'image' column"):
        model.predict(pd.DataFrame({"picture": mixed}))


def _with_test_predictions(path: Path, dst: Path, accuracy: float, *, seed: int,
                          n: int = 400) -> Path:
    """A copy of the predictor whose recorded per-image test predictions have this accuracy."""
    import json
    import shutil

    rng = np.random.default_rng(seed)
    shutil.copytree(path, dst)
    y = [CLASSES[i % 3] for i in range(n)]
    right = rng.random(n) < accuracy
    pred = [t if ok else CLASSES[(CLASSES.index(t) + 1) % 3] for t, ok in zip(y, right)]
    (dst / "test_predictions.json").write_text(json.dumps(
        {"metric": "balanced_accuracy", "ids": [f"img{i}" for i in range(n)], "y_true": y,
         "y_pred": pred}))
    return dst


def test_promotion_gate_is_a_paired_test_on_the_same_test_split(mlflow_store, predictor_dir,
                                                               tmp_path):
    from mlflow import MlflowClient

    from jobs.registry import alias_version, promote, register_predictor

    path, _ = predictor_dir
    name = "cifar3-gate"
    tags = {"selection_metric": "balanced_accuracy", "test_split_hash": "split-A"}

    def version(acc, seed, **extra):
        d = _with_test_predictions(path, tmp_path / f"v{seed}", acc, seed=seed)
        return register_predictor(d, name, tags={**tags, **extra})

    v1 = version(0.70, 1)
    r = promote(name)
    assert r.promoted and alias_version(name, "champion") == v1 and "no current champion" in r.reason

    v2 = version(0.60, 2)  # clearly worse on the same 400 images
    r = promote(name)
    assert not r.promoted and alias_version(name, "champion") == v1
    t = MlflowClient().get_model_version(name, v2).tags
    assert "promotion_refused" in t and float(t["promotion_diff"]) < 0
    assert float(t["promotion_diff_low"]) < float(t["promotion_diff"]) < float(t["promotion_diff_high"])
    assert int(t["promotion_n_images"]) == 400

    v3 = version(0.90, 3, test_split_hash="split-B")
    r = promote(name)
    assert not r.promoted and "split" in r.reason

    v4 = version(0.95, 4, selection_metric="accuracy")  # better, but another metric
    r = promote(name, version=v4)
    assert not r.promoted and "accuracy" in r.reason

    r = promote(name, version=v2, force=True)
    assert r.promoted and alias_version(name, "champion") == v2
    assert MlflowClient().get_model_version(name, v2).tags["promotion_reason"].startswith("forced")

    v5 = version(0.75, 5)  # clearly better than the 0.60 champion
    r = promote(name)
    assert r.promoted and alias_version(name, "champion") == v5 and r.previous_champion == v2
    assert v3 != v5

    # a champion registered without test predictions cannot be compared: refuse unless forced
    v6 = register_predictor(path, name, tags=tags)
    assert promote(name, version=v6, force=True).promoted
    v7 = version(0.99, 7)
    r = promote(name, version=v7)
    assert not r.promoted and "--force" in r.reason


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


def test_registering_into_a_run_works_whatever_experiment_the_caller_made_active(mlflow_store, predictor_dir):
    """A caller (a notebook, another test) that made another experiment active does not stop the
    registration into the sweep's run (MLflow refuses to resume a run outside the active one),
    and MLFLOW_EXPERIMENT_ID is not left exported for child processes."""
    import os

    import mlflow

    from jobs.registry import register_predictor

    client = mlflow.MlflowClient()
    sweep_exp = client.create_experiment("sweeps-elsewhere", artifact_location=(mlflow_store / "sweeps").as_uri())
    run_id = client.create_run(sweep_exp).info.run_id
    mlflow.set_experiment(experiment_id=client.create_experiment(
        "someone-else", artifact_location=(mlflow_store / "other").as_uri()))
    before = os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    try:
        version = register_predictor(predictor_dir[0], "cifar3-into-run", run_id=run_id)
        assert client.get_model_version("cifar3-into-run", version).run_id == run_id
        assert "MLFLOW_EXPERIMENT_ID" not in os.environ
    finally:
        if before is not None:
            os.environ["MLFLOW_EXPERIMENT_ID"] = before


def test_predict_each_answers_in_batches_and_a_bad_image_costs_only_itself(predictor_dir):
    from pipeline.batch_predict import predict_each
    from pipeline.images import ImageValidationError
    from pipeline.predictor import Predictor

    path, images = predictor_dir
    predictor = Predictor.load(path, engine="torch")
    want = [predictor.predict_images([b])[0].to_dict() for b in images[:7]]
    # bad images in the first and the last of three batches of 3
    mixed = [images[0], b"not an image", images[1], images[2], images[3], images[4],
             images[5][:200], images[6], b""]
    got = predict_each(predictor, mixed, batch_size=3)
    assert len(got) == len(mixed)
    assert [type(g).__name__ for g in got] == ["Prediction", "ImageValidationError", "Prediction", "Prediction",
                                               "Prediction", "Prediction", "ImageValidationError", "Prediction",
                                               "ImageValidationError"]
    codes = [g.code for g in got if isinstance(g, ImageValidationError)]
    assert codes[0] == "not_image" and codes[1] in ("truncated", "corrupt") and codes[2] == "empty"
    answered = [g.to_dict() for g in got if not isinstance(g, ImageValidationError)]
    for a, w in zip(answered, [want[i] for i in (0, 1, 2, 3, 4, 6)]):
        assert a["label"] == w["label"] and a["decision"] == w["decision"]
        assert abs(a["score"] - w["score"]) < 1e-4
    assert predict_each(predictor, []) == []
    with pytest.raises(ValueError, match="batch_size"):
        predict_each(predictor, images, batch_size=0)


def test_tlpipe_predict_takes_folders(predictor_dir, tmp_path):
    """A folder stands for every image under it (nested folders too; hidden files, tools' folders
    and other files skipped), answered in batches; an unreadable image is an error row."""
    from typer.testing import CliRunner

    from cli.app import app as cli
    from pipeline.predictor import Predictor

    path, images = predictor_dir
    folder = tmp_path / "traffic"
    (folder / "day2" / "@eaDir").mkdir(parents=True)
    for i, data in enumerate(images[:5]):
        (folder / ("day2" if i % 2 else "") / f"img{i}.jpg").write_bytes(data)
    (folder / "day2" / "@eaDir" / "thumb.jpg").write_bytes(images[5])
    (folder / ".img9.jpg").write_bytes(images[6])
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(images[7][:100])
    single = tmp_path / "single.jpg"
    single.write_bytes(images[8])
    r = CliRunner().invoke(cli, ["predict", str(folder), str(single), "--model", str(path), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    expect = ["broken.jpg", "day2/img1.jpg", "day2/img3.jpg", "img0.jpg", "img2.jpg", "img4.jpg"]
    assert [row["image"] for row in rows] == [str(folder / e) for e in expect] + [str(single)]
    assert "error" in rows[0] and "broken.jpg" in rows[0]["error"]
    predictor = Predictor.load(path)
    want = predictor.predict_images([images[i] for i in (1, 3, 0, 2, 4, 8)])
    assert [row["label"] for row in rows[1:]] == [w.label for w in want]

    r = CliRunner().invoke(cli, ["predict", str(folder / "day2"), "--model", str(path), "--json"])
    assert r.exit_code == 0, r.output
    assert [row["image"] for row in json.loads(r.stdout)] == [str(folder / "day2" / f"img{i}.jpg") for i in (1, 3)]
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(cli, ["predict", str(empty), "--model", str(path)])
    assert r.exit_code == 2 and "no image files under" in r.output and ".jpg" in r.output, r.output
