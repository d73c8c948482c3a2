"""Drift reference, window bookkeeping and clustering: the pure compute of production monitoring."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.drift import DriftReference, prior_distance
from pipeline.monitoring import DecisionWindows
from pipeline.suggest import min_cohesion, suggest


def _blobs(rng, centers, n, spread=0.15):
    return np.concatenate([c + spread * rng.standard_normal((n, centers.shape[1])) for c in centers])


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4, 32)) * 2  # 3 training classes + 1 never seen
    X = _blobs(rng, centers[:3], 80)
    y = np.repeat(["a", "b", "c"], 80)
    return rng, centers, X, y


def test_reference_flags_new_kinds_not_class_mix(data, tmp_path):
    rng, centers, X, y = data
    ref = DriftReference.fit(X, y, seed=0)
    same = ref.judge(ref.residuals(_blobs(rng, centers[:3], 20)))
    one_class = ref.judge(ref.residuals(_blobs(rng, centers[2:3], 60)))  # class mix moved, not the data
    new = ref.judge(ref.residuals(_blobs(rng, centers[3:], 60)))
    assert not same["drifted"] and not one_class["drifted"]
    assert new["drifted"] and new["score"] > new["threshold"] > same["score"]
    assert ref.threshold(100) < ref.threshold(25)  # bigger windows: less noise, tighter threshold
    assert not ref.judge(ref.residuals(_blobs(rng, centers[3:], 5)))["drifted"]  # too few to judge
    ref.save(tmp_path / "drift")
    assert not any(p.suffix == ".pkl" for p in (tmp_path / "drift").iterdir())
    back = DriftReference.load(tmp_path / "drift")
    Q = _blobs(rng, centers, 5)
    assert np.allclose(back.residuals(Q), ref.residuals(Q)) and back.class_prior == ref.class_prior
    assert DriftReference.fit(X[:10], y[:10]) is None  # too little to calibrate on


def test_predictor_saves_reference_and_old_ones_still_load(data, tmp_path):
    from pipeline.backbones import get_spec
    from pipeline.heads import LinearProbe
    from pipeline.predictor import Predictor

    _, _, X, y = data
    head = LinearProbe(weight_decays=[0.1], max_iter=50, n_threads=1).fit(X, y)
    spec = get_spec("efficientnet/tf_efficientnet_lite0.in1k")
    p = Predictor(spec, head).fit_reference(X, y, seed=3)
    p.save(tmp_path / "new")
    back = Predictor.load(tmp_path / "new")
    assert back.reference is not None and back.reference.seed == 3
    assert np.array_equal(back.reference.sample, p.reference.sample)
    # a predictor.json written before drift references existed has no "has_reference"
    Predictor(spec, head).save(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "predictor.json").read_text())
    cfg.pop("has_reference")
    (tmp_path / "old" / "predictor.json").write_text(json.dumps(cfg))
    assert Predictor.load(tmp_path / "old").reference is None


def test_windows_rates_histogram_prior_and_drift(data):
    rng, centers, X, y = data
    ref = DriftReference.fit(X, y)
    w = DecisionWindows(reference=ref, max_records=1000)
    w.add(["classifier"] * 30, [0.95] * 30, ["a"] * 30, ref.residuals(_blobs(rng, centers[:1], 30)), now=100.0)
    w.add(["abstain"] * 10 + ["fallback"] * 30, [0.35] * 40, ["c"] * 40,
          ref.residuals(_blobs(rng, centers[3:], 40)), now=200.0)
    old = w.summary(1000.0, now=250.0)
    assert old["images"] == 70 and old["decisions"] == {"classifier": 30, "fallback": 30, "abstain": 10}
    assert old["confidence"]["counts"][9] == 30 and old["confidence"]["counts"][3] == 40
    assert old["predicted"] == pytest.approx({"a": 30 / 70, "c": 40 / 70})
    assert old["prior_distance"] == pytest.approx(prior_distance({"a": 30, "c": 40}, ref.class_prior))
    recent = w.summary(60.0, now=250.0)  # only the second batch
    assert recent["images"] == 40 and recent["rates"]["abstain"] == pytest.approx(0.25)
    assert recent["drift"]["drifted"]
    assert w.summary(None, last=30, now=250.0)["images"] == 30
    assert w.summary(10.0, now=1000.0)["images"] == 0
    assert DecisionWindows().summary(60.0)["drift"]["available"] is False


def test_clusters_keep_noise_as_noise():
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((5, 64)) * 3  # 3 known classes, 2 new kinds
    known = _blobs(rng, centers[:3], 30, spread=0.3)
    floor = min_cohesion(known, np.repeat(["a", "b", "c"], 30))
    X = np.concatenate([_blobs(rng, centers[3:4], 25, spread=0.3), _blobs(rng, centers[4:], 12, spread=0.3),
                        rng.standard_normal((15, 64)) * 3])  # and 15 unrelated images
    found = suggest(X, min_cluster_size=5, decisions=["abstain"] * len(X), min_cohesion=floor)
    members = [set(s.members) for s in found]
    assert len(found) == 2 and members[0] == set(range(25))  # largest first, whole and pure
    assert members[1] >= set(range(25, 37)) and len(members[1]) <= 16  # whole, at least 75 % pure
    assert len(set(range(37, 52)) - members[0] - members[1]) >= 10  # unrelated images stay noise
    assert [s.cluster for s in found] == [0, 1] and all(s.cohesion >= floor for s in found)
    assert found[0].decisions == {"abstain": 25}
    assert not suggest(rng.standard_normal((40, 64)), min_cluster_size=5, min_cohesion=floor)  # noise only


def test_a_cluster_of_known_class_images_is_flagged_as_looking_like_it():
    """Captured images of a known class (the model was unsure about them) cluster too; they are
    flagged `looks_like` that class, a cluster of a new kind is not."""
    from feature_store.index import SupportIndex
    from pipeline.suggest import within_class_similarity

    rng = np.random.default_rng(3)
    centers = rng.standard_normal((4, 64)) * 3  # 3 known classes, 1 new kind
    known = _blobs(rng, centers[:3], 40, spread=0.3)
    labels = np.repeat(["a", "b", "c"], 40)
    support = SupportIndex(64)
    support.add(known, labels)
    within = within_class_similarity(support)
    assert set(within) == {"a", "b", "c"} and all(0.5 < v < 1.0 for v in within.values())
    X = np.concatenate([_blobs(rng, centers[3:], 25, spread=0.3), _blobs(rng, centers[:1], 20, spread=0.3)])
    found = suggest(X, support=support, min_cluster_size=5, min_cohesion=min_cohesion(known, labels))
    by_size = {s.size: s for s in found}
    assert set(by_size) == {25, 20}
    assert by_size[20].looks_like == "a" and by_size[20].nearest[0]["label"] == "a"
    assert by_size[25].looks_like is None
