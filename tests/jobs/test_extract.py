"""The extraction job on a real local Ray, real EfficientNet-Lite0 weights and real CIFAR-10 photos."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from feature_store import FeatureStore


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cifar_subsets import copy_cifar_subset  # noqa: E402


@pytest.fixture(scope="module")
def cifar_subset(cifar10_dir, tmp_path_factory) -> Path:
    """ImageFolder with train (30 a class) and test (10 a class) copied from real CIFAR-10."""
    return copy_cifar_subset(cifar10_dir, tmp_path_factory.mktemp("cifar-subset"), {"train": 30, "test": 10})


def _files(ds):
    return [(r.sha256, r.path) for r in ds.records]


def test_extract_knn_cache_and_new_images(ray_local, cifar10_dir, cifar_subset, small_spec, tmp_path):
    from jobs.extract import extract_features
    from pipeline.data import load_dataset
    from pipeline.heads import KNN

    ds = load_dataset(cifar_subset)
    store = FeatureStore(tmp_path / "features")
    (s1,) = extract_features(_files(ds), [small_spec], store=store)
    assert (s1.requested, s1.cached, s1.extracted, s1.failed) == (len(ds.records), 0, len(ds.records), [])
    assert s1.engine == "openvino"  # CNN on CPU takes the OpenVINO fast path (the ONNX export compiled)

    train = ds.split("train") + ds.split("val")
    test = ds.split("test")
    x_tr = store.get(s1.fingerprint, [r.sha256 for r in train])
    x_te = store.get(s1.fingerprint, [r.sha256 for r in test])
    assert x_tr.shape == (len(train), small_spec.embed_dim) and np.isfinite(x_tr).all()
    head = KNN(k=5).fit(x_tr, np.array([r.label for r in train]))
    acc = float(np.mean(head.predict(x_te) == np.array([r.label for r in test])))
    assert acc >= 0.35, f"k-NN accuracy {acc:.2f} is not well above chance (0.10)"

    # Same data again: everything is a cache hit, nothing recomputed.
    (s2,) = extract_features(_files(ds), [small_spec], store=store)
    assert (s2.cached, s2.extracted) == (len(ds.records), 0)

    # A new dataset version with ~10 % new images: only those are extracted, old rows unchanged.
    for cls_dir in sorted((cifar10_dir / "train").iterdir()):
        for p in sorted(cls_dir.glob("*.jpg"))[30:34]:  # not in the subset (it took the first 30)
            shutil.copy(p, cifar_subset / "train" / cls_dir.name / f"new_{p.name}")
    ds2 = load_dataset(cifar_subset)
    new_keys = {r.sha256 for r in ds2.records} - {r.sha256 for r in ds.records}
    (s3,) = extract_features(_files(ds2), [small_spec], store=store)
    assert len(new_keys) >= 35
    assert (s3.extracted, s3.cached) == (len(new_keys), len({r.sha256 for r in ds.records}))
    # one CPU node: the fused layout runs on a plain Ray actor pool; a small delta skips actor start-up
    assert (s1.executor, s3.executor) == ("ray-actors", "inline")
    np.testing.assert_array_equal(store.get(s1.fingerprint, [r.sha256 for r in train]), x_tr)


def test_every_executor_and_layout_agree(ray_local, cifar_subset, small_spec, tmp_path):
    from jobs.extract import extract_features
    from pipeline.data import load_dataset

    ds = load_dataset(cifar_subset)
    files = _files(ds)[:64]
    keys = [k for k, _ in files]
    out = {}
    cases = {"fused": (dict(layout="fused", inline_max=0), "ray-actors"),
             "fused-data": (dict(layout="fused", inline_max=0, ray_executor="data"), "ray-data"),
             "tasks": (dict(layout="tasks", inline_max=0), "ray-data"), "inline": ({}, "inline")}
    for name, (kw, executor) in cases.items():
        (s,) = extract_features(files, [small_spec], store=FeatureStore(tmp_path / name), **kw)
        assert (s.executor, s.extracted) == (executor, len(files))
        out[name] = FeatureStore(tmp_path / name).get(s.fingerprint, keys)
    for name in ("fused-data", "tasks", "inline"):
        np.testing.assert_allclose(out["fused"], out[name], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fused layout"):
        extract_features(files, [small_spec], store=FeatureStore(tmp_path / "x"), layout="tasks",
                         ray_executor="actors")
    with pytest.raises(ValueError, match="ray_executor must be one of"):
        extract_features(files, [small_spec], store=FeatureStore(tmp_path / "x"), ray_executor="dask")


def test_bad_file_is_reported_not_fatal(ray_local, cifar_subset, small_spec, tmp_path):
    from jobs.extract import extract_features

    good = sorted(cifar_subset.glob("train/cat/*.jpg"))[:5]
    bad = tmp_path / "vanished.jpg"
    bad.write_bytes(b"not a jpeg at all")
    from pipeline.images import sha256_bytes

    files = [(sha256_bytes(p.read_bytes()), str(p)) for p in good + [bad]]
    for inline_max in (0, 256):  # through Ray workers, and in process
        (s,) = extract_features(files, [small_spec], store=FeatureStore(tmp_path / f"s{inline_max}"),
                                inline_max=inline_max)
        assert s.extracted == 5 and [f["key"] for f in s.failed] == [files[-1][0]]
        assert "not_image" in s.failed[0]["reason"] or "corrupt" in s.failed[0]["reason"]
