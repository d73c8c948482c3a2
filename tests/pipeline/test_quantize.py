"""INT8 and input-size variants of a backbone on real EfficientNet-Lite0 weights and real
clothing-small photos: extraction makes them like any backbone (own fingerprint, own features),
INT8 stays close to fp32, calibration is deterministic, a predictor serves the INT8 model it won
with, also where the cache never saw it."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from feature_store import FeatureStore  # noqa: E402
from pipeline.backbones import get_spec  # noqa: E402

BASE = "efficientnet/tf_efficientnet_lite0.in1k"
SIZE = 160  # a size variant keeps the test fast and exercises both axes at once
CALIBRATION = 32  # images (the product calibrates on up to 300)


def _pick(ds, split: str, per_class: int):
    by: dict[str, list] = {}
    for r in sorted(ds.split(split), key=lambda r: r.sha256):
        by.setdefault(r.label, []).append(r)
    return [r for rs in by.values() for r in rs[:per_class]]


@pytest.fixture(scope="module")
def variants(clothing_small_dir, tmp_path_factory):
    """fp32@160 and int8@160 extracted by the real job (inline, no Ray) into a fresh cache."""
    from jobs.extract import extract_features
    from pipeline.data import load_dataset

    cache = tmp_path_factory.mktemp("int8-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLPIPE_CACHE_DIR", str(cache))
        ds = load_dataset(clothing_small_dir, seed=0)
        train, test = _pick(ds, "train", 16), _pick(ds, "test", 8)
        files = [(r.sha256, r.path) for r in train + test]
        store = FeatureStore(tmp_path_factory.mktemp("features"))
        names = [f"{BASE}@{SIZE}", f"{BASE}@{SIZE}-int8"]
        calibration = [(r.sha256, r.path) for r in train[::5]][:CALIBRATION]
        stats = extract_features(files, names, store=store, calibration=calibration)
        yield {"cache": cache, "store": store, "stats": stats, "train": train, "test": test,
               "calibration": calibration, "mp": mp}


def test_variants_have_own_fingerprints_and_features(variants):
    fp32, int8 = variants["stats"]
    assert (fp32.backbone, int8.backbone) == (f"{BASE}@{SIZE}", f"{BASE}@{SIZE}-int8")
    assert fp32.engine == int8.engine == "openvino" and fp32.extracted == int8.extracted == 24 * 10
    assert len(variants["calibration"]) == CALIBRATION
    spec8 = get_spec(int8.backbone)  # the calibrated spec extraction remembered (the sweep's lookup)
    assert spec8.precision == "int8" and len(spec8.calibration) == 64 and spec8.input_size == SIZE
    assert int8.fingerprint == spec8.fingerprint_for("openvino", "float32")
    base = get_spec(BASE)
    fps = {base.fingerprint_for("openvino"), fp32.fingerprint, int8.fingerprint,
           spec8.replace(calibration="0" * 64).fingerprint_for("openvino"),
           get_spec(f"{BASE}@int8").replace(calibration=spec8.calibration).fingerprint_for("openvino")}
    assert len(fps) == 5  # size, precision and calibration sample each make a feature set
    assert "precision" not in base.fingerprint_payload("openvino")  # fp32 fingerprints as before
    # the size variant really runs at 160 px: its graph takes 160x160 and its preprocessing makes it
    from pipeline.backbones import load_backbone
    from pipeline.preprocess import load_pixels

    bb = load_backbone(f"{BASE}@{SIZE}", engine="openvino")
    assert bb.input_size == SIZE and load_pixels(variants["test"][0].path, bb.spec).shape == (3, SIZE, SIZE)
    assert get_spec(f"{BASE}@{SIZE}").resize_size == int(SIZE / base.crop_pct)


def test_int8_close_to_fp32_and_agrees_on_test_split(variants):
    from pipeline.heads import LinearProbe

    store, (fp32, int8) = variants["store"], variants["stats"]
    tr = [r.sha256 for r in variants["train"]]
    te = [r.sha256 for r in variants["test"]]
    a, b = store.get(fp32.fingerprint, te), store.get(int8.fingerprint, te)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.mean() >= 0.98 and cos.min() >= 0.85, (cos.mean(), cos.min())
    y_tr = np.array([r.label for r in variants["train"]])
    y_te = np.array([r.label for r in variants["test"]])
    p32 = LinearProbe().fit(store.get(fp32.fingerprint, tr), y_tr).predict(a)
    p8 = LinearProbe().fit(store.get(int8.fingerprint, tr), y_tr).predict(b)
    assert np.mean(p32 == p8) >= 0.85, np.mean(p32 == p8)
    assert np.mean(p8 == y_te) >= np.mean(p32 == y_te) - 0.1  # no collapse on a small split


def test_calibration_is_deterministic(variants, tmp_path):
    from pipeline.backbones.quantize import calibration_id, calibration_sample, ensure_int8, find_int8

    spec8 = get_spec(f"{BASE}@{SIZE}-int8")
    files = list(variants["calibration"])
    shuffled = random.Random(1).sample(files, len(files))
    sample = calibration_sample(shuffled, n=CALIBRATION)
    assert sample == calibration_sample(files, n=CALIBRATION)  # the same images in any order
    assert calibration_id([k for k, _ in sample]) == spec8.calibration
    first = find_int8(spec8, "openvino")
    # a second machine: the same fp32 export, the same sample -> the same key and the same model
    other = tmp_path / "cache"
    shutil.copytree(variants["cache"] / "onnx", other / "onnx",
                    ignore=lambda d, names: [n for n in names if ".int8-" in n or n.endswith(".blob")])
    _, again = ensure_int8(spec8, "openvino", cache_dir=other, calibration_paths=[p for _, p in sample])
    assert again.name == first.name
    assert again.with_suffix(".bin").read_bytes() == first.with_suffix(".bin").read_bytes()
    meta = json.loads(again.with_suffix(".json").read_text())
    assert meta["calibration_images"] == CALIBRATION and meta["nncf"] and meta["cosine_to_fp32_mean"] >= 0.95
    # made once: a later call is a cache hit even without calibration images
    assert ensure_int8(spec8, "openvino", cache_dir=other)[1] == again
    # one made by other tool versions (a bundled predictor) serves when no calibration images are at hand
    foreign = again.with_name(again.name.replace(again.stem.rsplit("-", 1)[1], "0123456789ab"))
    for suffix in (".bin", ".json", ".xml"):
        again.with_suffix(suffix).rename(foreign.with_suffix(suffix))
    assert ensure_int8(spec8, "openvino", cache_dir=other)[1] == foreign


def test_predictor_round_trips_and_serves_int8(variants, tmp_path, monkeypatch):
    from pipeline.backbones.openvino_runtime import OpenVinoBackbone
    from pipeline.heads import LinearProbe
    from pipeline.predictor import Predictor

    store, (_, int8) = variants["store"], variants["stats"]
    spec8 = get_spec(int8.backbone)
    y = np.array([r.label for r in variants["train"]])
    head = LinearProbe().fit(store.get(int8.fingerprint, [r.sha256 for r in variants["train"]]), y)
    d = Predictor(spec8, head).save(tmp_path / "predictor")
    cfg = json.loads((d / "predictor.json").read_text())
    assert cfg["variants"] == [{"backbone": spec8.name, "precision": "int8", "input_size": SIZE}]
    assert any(p.suffix == ".xml" for p in (d / "int8").iterdir())
    # served on a machine whose cache never saw this model nor the fp32 export
    monkeypatch.setenv("TLPIPE_CACHE_DIR", str(tmp_path / "fresh-cache"))
    loaded = Predictor.load(d)
    assert loaded.spec == spec8
    test = variants["test"][:6]
    emb = loaded.embed_images([r.path for r in test])
    assert isinstance(loaded.backbone, OpenVinoBackbone) and loaded.backbone.path.suffix == ".xml"
    np.testing.assert_allclose(emb, store.get(int8.fingerprint, [r.sha256 for r in test]), rtol=1e-4, atol=1e-4)
    assert [p.label for p in loaded.predict_images([r.path for r in test])] == list(
        head.predict(store.get(int8.fingerprint, [r.sha256 for r in test])))


def test_variant_names_and_errors():
    from pipeline.backbones import load_backbone
    from pipeline.backbones.quantize import QuantizationUnavailable
    from pipeline.backbones.variants import expand, parse_precisions, parse_sizes

    assert get_spec(f"{BASE}@224").name == BASE  # its own size is the plain backbone
    assert get_spec("tf_efficientnet_lite0.in1k@int8").name == f"{BASE}@int8"
    names = [s.name for s in expand([get_spec(BASE)], parse_sizes("160,224"), parse_precisions("fp32,int8"))]
    assert names == [f"{BASE}@160", f"{BASE}@160-int8", BASE, f"{BASE}@int8"]
    with pytest.raises(ValueError, match="--precision"):
        parse_precisions("fp16")
    with pytest.raises(KeyError, match="variant suffix"):
        get_spec(f"{BASE}@tiny")
    with pytest.raises(ValueError, match="not engine='torch'"):
        load_backbone(f"{BASE}@int8", engine="torch")
    with pytest.raises(QuantizationUnavailable, match="calibration"):
        load_backbone(get_spec(f"{BASE}@int8").replace(calibration="f" * 64), engine="openvino")


def test_variant_pairs_compares_each_variant_with_its_reference():
    from pipeline.variant_pairs import reference_backbone, variant_pairs

    assert reference_backbone(f"{BASE}@160-int8") == f"{BASE}@160"
    assert reference_backbone(f"{BASE}@int8") == BASE and reference_backbone(f"{BASE}@160") == BASE
    assert reference_backbone(BASE) is None and reference_backbone(f"{BASE}@int8+x") is None
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(200)]
    y = {i: str(rng.integers(3)) for i in ids}
    ref_pred = {i: (y[i] if rng.random() < 0.9 else "x") for i in ids}
    int8_pred = dict(ref_pred, **{i: "x" for i in ids[:10]})  # 10 more mistakes than fp32
    rows = [{"name": "a", "backbone": BASE, "head": "linear", "latency_ms_b1": 20.0},
            {"name": "b", "backbone": f"{BASE}@int8", "head": "linear", "latency_ms_b1": 10.0},
            {"name": "c", "backbone": f"{BASE}@int8", "head": "knn", "latency_ms_b1": 10.0}]
    (row,) = variant_pairs(rows, y, {"a": ref_pred, "b": int8_pred, "c": int8_pred}, metric="accuracy")
    assert (row["candidate"], row["reference"], row["n"], row["speedup"]) == ("b", "a", 200, 2.0)
    wrong = sum(ref_pred[i] == y[i] for i in ids[:10])
    assert row["diff"] == pytest.approx(-wrong / 200) and row["low"] <= row["diff"] <= row["high"]
