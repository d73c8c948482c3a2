"""The predictor artifact: backbone spec(s) + head + labels + calibrated thresholds + support index.

The embedding a predictor classifies is the concatenation, in spec order, of each backbone's
embedding exactly as `load_backbone(spec).embed` returns it (the vectors the feature store
caches); with one spec it is that backbone's embedding. Heads across backbones (a probe on the
concatenation, or an `Ensemble` of per-backbone heads on its slices) are ordinary predictors.

Decision per image:
1. the head's top probability ≥ `threshold` (calibrated on validation for a target precision)
   → `classifier`;
2. else a similarity-weighted k-NN vote over the support index (training embeddings plus any
   examples added later, including classes the head has never seen); agreement ≥
   `knn_threshold` → `fallback`;
3. else `abstain`: the label is still the head's best guess (its top class), below every
   calibrated threshold — a caller that must not act on unsure answers checks `decision`, and
   one that needs an answer for every image (or an accuracy) gets one.

`save(dir)` / `load(dir)` mirror each other: `predictor.json` + `head/` (JSON + safetensors) +
`support/` (FAISS + npy + JSON) + `backbone/` (local weights, when a spec has them) + `int8/`
(the quantized model of an INT8 variant, copied into the local cache on load) + `drift/`
(the `pipeline.drift.DriftReference` production monitoring compares traffic with; absent in
predictors saved before it existed, which still load: `reference` is then None). No pickle
anywhere. predictor.json v2 lists `specs`; v1 files (one `spec`) still load.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.calibration import DEFAULT_KNN_THRESHOLD, knn_vote, min_calibration_rows, precision_threshold

FORMAT = "tlpipe.predictor"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # v1: one "spec"; v2: "specs", a list
DECISIONS = ("classifier", "fallback", "abstain")


def preprocessing_key(spec) -> tuple:
    """What `pipeline.preprocess` reads from a spec: specs with equal keys get identical pixels."""
    return (spec.input_size, spec.crop_pct, spec.crop_mode, spec.interpolation)


def preprocessing_groups(specs: Sequence[Any]) -> list[tuple[Any, list[int]]]:
    """[(spec to prepare pixels with, indices of the specs sharing its preprocessing)], in order
    of first appearance: each image is decoded once per group, not once per backbone."""
    groups: dict[tuple, tuple[Any, list[int]]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(preprocessing_key(spec), (spec, []))[1].append(i)
    return list(groups.values())


@dataclass
class Prediction:
    """One image's answer; plain data (JSON via `to_dict`)."""

    label: str | None
    score: float
    decision: str
    top_k: list[dict] = field(default_factory=list)  # [{"label", "score"}], classifier's view

    def to_dict(self) -> dict:
        return asdict(self)


class Predictor:
    """Classify images or embeddings with abstention and a k-NN fallback.

    Args:
        spec: the BackboneSpec the head's features come from, or a list of them: the head then
            reads their embeddings concatenated in that order.
        head: a fitted head (sklearn contract, `save`/`load`).
        threshold: minimum top probability for a `classifier` decision.
        support: a `feature_store.SupportIndex` of labelled embeddings, or None (no fallback).
        knn_k, knn_threshold: the fallback's neighbours and minimum vote agreement.
        top_k: how many classifier scores each prediction lists.
        info: free-form JSON metadata (model name, version, metrics, dataset hash, ...).
    """

    def __init__(self, spec, head, *, threshold: float = 0.0, support=None, knn_k: int = 10,
                 knn_threshold: float = DEFAULT_KNN_THRESHOLD, top_k: int = 5,
                 info: dict | None = None) -> None:
        if getattr(head, "classes_", None) is None:
            raise ValueError("the predictor needs a fitted head (head.classes_ is missing)")
        specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
        if not specs:
            raise ValueError("the predictor needs at least one backbone spec; pass spec=BackboneSpec "
                             "or a non-empty list of them")
        self.specs = specs
        self.head = head
        self.threshold = float(threshold)
        self.support = support
        self.knn_k = int(knn_k)
        self.knn_threshold = float(knn_threshold)
        self.top_k = int(top_k)
        self.info = dict(info or {})
        self.reference = None  # pipeline.drift.DriftReference: the training embeddings drift is judged against
        self._backbones: list = [None] * len(specs)
        self.engine = "auto"
        self.device = "cpu"

    # ------------------------------------------------------------------ classes
    @property
    def classes(self) -> list[str]:
        """Classes the head knows, in its column order."""
        return [str(c) for c in self.head.classes_]

    @property
    def support_only_classes(self) -> list[str]:
        """Classes present only in the support index (added after training: need retraining)."""
        if self.support is None or not len(self.support):
            return []
        return sorted(set(map(str, self.support.labels)) - set(self.classes))

    def vote_threshold(self, label: str, known: set[str] | None = None) -> float:
        """The agreement a fallback vote for `label` needs. `knn_threshold` was calibrated on
        images of the head's classes that the classifier passed on; a class added to the support
        set after training (`support_only_classes`) has no such data, so its vote needs the
        majority default at most — otherwise a calibrated near-unanimity would keep an accepted
        class from ever being answered."""
        if label in (known if known is not None else set(self.classes)):
            return self.knn_threshold
        return min(self.knn_threshold, DEFAULT_KNN_THRESHOLD)

    def support_class_sizes(self) -> dict[str, int]:
        """{label: examples in the support index}, for the fallback's vote (see `knn_vote`)."""
        if self.support is None or not len(self.support):
            return {}
        return self.support.label_counts()

    # ------------------------------------------------------------------ calibration
    def calibrate(self, X_val, y_val, *, target_precision: float = 0.9,
                  knn_target_precision: float | None = None) -> "Predictor":
        """Set `threshold` (and `knn_threshold`) on validation embeddings for a target precision.

        The fallback threshold is calibrated on the validation samples the classifier passes on,
        with the support index as it is now (it must not contain these validation samples).
        """
        y_val = np.asarray([str(y) for y in y_val])
        proba = self.head.predict_proba(X_val)
        classes = np.asarray(self.classes)
        top = proba.argmax(axis=1)
        conf = proba[np.arange(len(proba)), top]
        self.threshold = precision_threshold(conf, classes[top] == y_val,
                                             target_precision=target_precision)
        passed = conf < self.threshold
        knn_target = knn_target_precision or target_precision
        # too few uncertain rows to show the target precision: the majority default stays
        vote_calibrated = bool(self.support is not None and len(self.support)
                               and passed.sum() >= min_calibration_rows(knn_target))
        if vote_calibrated:
            scores, labels, _ = self.support.search(np.asarray(X_val)[passed], self.knn_k)
            vote, agreement = knn_vote(scores, labels, self.support_class_sizes())
            self.knn_threshold = precision_threshold(agreement, vote == y_val[passed],
                                                     target_precision=knn_target)
        self.info["calibration"] = {
            "target_precision": target_precision, "threshold": self.threshold,
            "knn_threshold": self.knn_threshold, "val_samples": int(len(y_val)),
            "knn_threshold_calibrated": vote_calibrated,
            "val_coverage": float(1 - passed.mean()),
        }
        return self

    def fit_reference(self, X_train, y_train, *, seed: int = 0) -> "Predictor":
        """Keep a seeded sample of training embeddings + a drift threshold calibrated on held-out
        ones (`pipeline.drift`), saved with the predictor for production monitoring."""
        from pipeline.drift import DriftReference

        self.reference = DriftReference.fit(X_train, y_train, seed=seed)
        return self

    # ------------------------------------------------------------------ prediction
    def predict_embeddings(self, X, *, top_k: int | None = None) -> list[Prediction]:
        X = np.asarray(X, dtype=np.float32)
        proba = self.head.predict_proba(X)
        k = max(1, min(int(top_k or self.top_k), proba.shape[1]))
        order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
        classes = self.classes
        out: list[Prediction] = []
        low = [i for i in range(len(X)) if proba[i, order[i, 0]] < self.threshold]
        votes: dict[int, tuple[Any, float]] = {}
        if low and self.support is not None and len(self.support):
            scores, labels, _ = self.support.search(X[low], self.knn_k)
            vote, agreement = knn_vote(scores, labels, self.support_class_sizes())
            votes = {i: (vote[j], float(agreement[j])) for j, i in enumerate(low)}
        known = set(classes)
        for i in range(len(X)):
            tops = [{"label": classes[c], "score": float(proba[i, c])} for c in order[i]]
            p = tops[0]["score"]
            if p >= self.threshold:
                out.append(Prediction(tops[0]["label"], p, "classifier", tops))
                continue
            label, agreement = votes.get(i, (None, 0.0))
            if label is not None and agreement >= self.vote_threshold(str(label), known):
                out.append(Prediction(str(label), agreement, "fallback", tops))
            else:
                out.append(Prediction(tops[0]["label"], p, "abstain", tops))
        return out

    @property
    def spec(self):
        """The first backbone spec (the only one of a single-backbone predictor)."""
        return self.specs[0]

    def _backbone_at(self, i: int):
        if self._backbones[i] is None:
            from pipeline.backbones import load_backbone

            self._backbones[i] = load_backbone(self.specs[i], engine=self.engine, device=self.device)
        return self._backbones[i]

    @property
    def backbone(self):
        """The first spec's backbone (loaded on first use)."""
        return self._backbone_at(0)

    @property
    def backbones(self) -> list:
        """Every spec's backbone, in spec order (loaded on first use)."""
        return [self._backbone_at(i) for i in range(len(self.specs))]

    def embed_images(self, images: Sequence[Any], *, max_pixels: int | None = None) -> np.ndarray:
        """Images (bytes, paths or PIL images) → (N, D) embeddings: each backbone's embedding of
        the image with its spec's preprocessing, concatenated in spec order."""
        from pipeline.images import DEFAULT_MAX_PIXELS, open_image
        from pipeline.preprocess import prepare

        parts: list[np.ndarray | None] = [None] * len(self.specs)
        for spec, members in preprocessing_groups(self.specs):
            pixels = []
            for img in images:
                if not hasattr(img, "convert"):
                    img = open_image(img, max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
                                     draft_size=(spec.resize_size, spec.resize_size))
                pixels.append(prepare(img, spec))
            batch = np.stack(pixels)
            for i in members:
                parts[i] = self._backbone_at(i).embed(batch)
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def predict_images(self, images: Sequence[Any], *, top_k: int | None = None) -> list[Prediction]:
        return self.predict_embeddings(self.embed_images(images), top_k=top_k)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.head.save(d / "head")
        if self.support is not None:
            self.support.save(d / "support")
        if self.reference is not None:
            self.reference.save(d / "drift")
        specs, bundled = [], {}
        for i, s in enumerate(self.specs):
            spec = s.to_dict()
            local = Path(str(s.weights))
            if not str(s.weights).startswith(("pypi:", "hf-hub:")) and local.exists():
                # local weights (a fine-tuned backbone) travel inside the artifact, path kept
                # relative; one folder per spec so equal file names cannot collide
                src = local.resolve()
                if src not in bundled:
                    sub = d / "backbone" if len(self.specs) == 1 else d / "backbone" / str(i)
                    dest = src if src.is_relative_to(sub.resolve()) else sub / local.name
                    bundled[src] = self._bundle(local, dest)
                spec["weights"] = bundled[src].relative_to(d.resolve()).as_posix()
            specs.append(spec)
        config = {
            "format": FORMAT, "version": FORMAT_VERSION, "specs": specs,
            "classes": self.classes, "threshold": self.threshold, "knn_k": self.knn_k,
            "knn_threshold": self.knn_threshold, "top_k": self.top_k,
            "has_support": self.support is not None, "has_reference": self.reference is not None,
            "info": self.info,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        config["variants"] = [{"backbone": s.name, "precision": s.precision, "input_size": s.input_size}
                              for s in self.specs]
        self._bundle_int8(d)
        (d / "predictor.json").write_text(json.dumps(config, indent=2, default=str))
        return d

    def _bundle_int8(self, d: Path) -> None:
        """INT8 specs' quantized models travel in ``int8/``: serving elsewhere has no calibration
        images to make them again."""
        from pipeline.backbones.quantize import bundle_int8

        for s in self.specs:
            if s.precision == "int8" and not bundle_int8(s, d / "int8"):
                raise FileNotFoundError(f"{s.name}: its INT8 model is not in the cache to save with the "
                                        "predictor; extract the variant again on this machine first")

    @staticmethod
    def _bundle(local: Path, dest: Path) -> Path:
        if local.resolve() != dest.resolve():
            if local.is_dir():
                shutil.copytree(local, dest, dirs_exist_ok=True)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(local, dest)
        return dest.resolve()

    @classmethod
    def load(cls, directory: str | os.PathLike, *, engine: str = "auto",
             device: str = "cpu") -> "Predictor":
        from feature_store.index import SupportIndex
        from pipeline.backbones.spec import BackboneSpec
        from pipeline.heads import load_head

        d = Path(directory)
        cfg_path = d / "predictor.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{d} is not a saved predictor (no predictor.json); "
                                    "create one with Predictor.save(dir)")
        cfg = json.loads(cfg_path.read_text())
        version = cfg.get("version")
        if cfg.get("format") != FORMAT or version not in READABLE_VERSIONS:
            newer = isinstance(version, int) and version > FORMAT_VERSION and cfg.get("format") == FORMAT
            raise ValueError(f"{cfg_path}: format {cfg.get('format')} v{version} is not {FORMAT} "
                             f"v{'/'.join(map(str, READABLE_VERSIONS))}"
                             + ("; it was written by a newer tlpipe, upgrade to load it" if newer else ""))
        head = load_head(d / "head")
        support = SupportIndex.load(d / "support") if cfg.get("has_support") else None
        specs = []
        for raw in (cfg["specs"] if version >= 2 else [cfg["spec"]]):
            spec = dict(raw)
            if str(spec["weights"]).startswith("backbone/"):  # bundled local weights, relative to d
                spec["weights"] = str(d / spec["weights"])
            specs.append(BackboneSpec.from_dict(spec))
        pred = cls(specs, head, threshold=cfg["threshold"],
                   support=support, knn_k=cfg["knn_k"], knn_threshold=cfg["knn_threshold"],
                   top_k=cfg["top_k"], info=cfg.get("info"))
        if pred.classes != cfg["classes"]:
            raise ValueError(f"{d}: head classes {pred.classes} differ from predictor.json "
                             f"{cfg['classes']}; the artifact is inconsistent, re-save it")
        for spec in specs:  # INT8 models saved with it go where every load_backbone finds them
            if spec.precision == "int8" and (d / "int8").is_dir():
                from pipeline.backbones.quantize import adopt_bundled

                adopt_bundled(spec, d / "int8")
        if cfg.get("has_reference"):
            from pipeline.drift import DriftReference

            pred.reference = DriftReference.load(d / "drift")
        pred.engine, pred.device = engine, device
        return pred
