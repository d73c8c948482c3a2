"""``MultiLabelPredictor``: backbone spec(s) + multi-label head + per-label thresholds + an
optional FAISS support index whose neighbours vote label sets.

Decision per image:
1. every label whose head probability reaches its threshold (``head.thresholds_``) -> the
   answer is that list of {label, score}, best first, decision ``classifier``;
2. none does -> the k nearest support vectors vote: each label's score is the similarity-
   weighted share of the neighbours carrying it (their label sets are stored in the
   ``feature_store.SupportIndex`` as keys, ``"cat|dog"``); labels at or above ``knn_threshold``
   -> decision ``fallback`` (labels only the support set knows can be answered this way);
3. else ``abstain``: an empty label list; ``top_k`` still shows the head's best scores.

Embedding (``embed_images``), drift reference and backbone bundling are the single-label
``pipeline.predictor.Predictor``'s, inherited. ``save(dir)`` writes the same layout (head/,
support/, backbone/, drift/) with ``predictor.json`` of format ``tlpipe.multilabel_predictor``,
which ``Predictor.load`` refuses with a clear error; ``load_any_predictor(dir)`` loads either.
Code serving either kind reads ``task_of(predictor)`` and ``answered_labels(prediction)`` (the
label list of either kind of answer) instead of checking classes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.multilabel.base import indicator
from pipeline.multilabel.heads import load_multilabel_head
from pipeline.multilabel.labelsets import label_key, split_key
from pipeline.multilabel.metrics import tune_thresholds
from pipeline.predictor import Predictor

FORMAT = "tlpipe.multilabel_predictor"
FORMAT_VERSION = 1
DECISIONS = ("classifier", "fallback", "abstain")
#: what a predictor answers (``task_of``): one label per image, or a list of labels
SINGLE_LABEL_TASK = "multiclass"
MULTILABEL_TASK = "multilabel"


@dataclass
class MultiLabelPrediction:
    """One image's answer; plain data (JSON via ``to_dict``)."""

    labels: list[dict]      # [{"label", "score"}] that passed, best first; [] when abstaining
    decision: str           # classifier | fallback | abstain
    top_k: list[dict] = field(default_factory=list)  # the head's best scores, passed or not

    @property
    def label(self) -> str | None:
        """Key of the answered set ("cat|dog"), None on abstention (for single-label plumbing)."""
        return label_key(d["label"] for d in self.labels) if self.labels else None

    @property
    def score(self) -> float:
        return float(self.labels[0]["score"] if self.labels else (self.top_k[0]["score"] if self.top_k else 0.0))

    def to_dict(self) -> dict:
        return {**asdict(self), "label": self.label, "score": self.score}


def vote_label_sets(scores: np.ndarray, keys: np.ndarray) -> list[dict[str, float]]:
    """Per query, {label: similarity-weighted share of the neighbours carrying it}. ``scores``
    are cosine similarities (Q, k), ``keys`` label-set keys (Q, k); negative similarities and
    missing neighbours carry no weight."""
    out = []
    for sims, ks in zip(np.asarray(scores, dtype=np.float64), np.asarray(keys)):
        weights: dict[str, float] = {}
        total = 0.0
        for s, key in zip(sims, ks):
            if not np.isfinite(s) or s <= 0 or key is None:
                continue
            total += float(s)
            for lab in split_key(str(key)):
                weights[lab] = weights.get(lab, 0.0) + float(s)
        out.append({lab: w / total for lab, w in weights.items()} if total > 0 else {})
    return out


class MultiLabelPredictor(Predictor):
    """Classify images or embeddings into label sets, with a k-NN fallback and abstention.

    Args:
        spec: BackboneSpec or list of them (embeddings concatenated in order).
        head: a fitted ``MultiLabelHead`` (its ``thresholds_`` decide).
        support: a ``feature_store.SupportIndex`` labelled with label-set keys, or None.
        knn_k, knn_threshold: the fallback's neighbours and minimum weighted share per label.
        top_k: how many head scores each prediction lists.
    """

    task = MULTILABEL_TASK

    def __init__(self, spec, head, *, support=None, knn_k: int = 10, knn_threshold: float = 0.5,
                 top_k: int = 5, info: dict | None = None) -> None:
        if getattr(head, "thresholds_", None) is None:
            raise ValueError("the multi-label predictor needs a fitted multi-label head "
                             "(head.thresholds_ is missing)")
        super().__init__(spec, head, threshold=0.0, support=support, knn_k=knn_k,
                         knn_threshold=knn_threshold, top_k=top_k, info=info)

    @property
    def support_only_classes(self) -> list[str]:
        """Labels present only in the support index's label sets (added after training)."""
        if self.support is None or not len(self.support):
            return []
        seen = {lab for key in set(map(str, self.support.labels)) for lab in split_key(key)}
        return sorted(seen - set(self.classes))

    @property
    def thresholds(self) -> dict[str, float]:
        return {c: float(t) for c, t in zip(self.classes, self.head.thresholds_)}

    def calibrate(self, X_val, Y_val, **_: Any) -> "MultiLabelPredictor":
        """Re-tune the head's per-label thresholds on validation embeddings (never test)."""
        X_val = np.asarray(X_val, dtype=np.float32)
        _, M = indicator(Y_val, len(X_val), self.classes)
        self.head.set_thresholds(tune_thresholds(M, self.head.predict_proba(X_val)), source="calibrate")
        self.info["calibration"] = {"val_samples": int(len(M)), "thresholds": self.thresholds}
        return self

    def predict_embeddings(self, X, *, top_k: int | None = None) -> list[MultiLabelPrediction]:
        X = np.asarray(X, dtype=np.float32)
        proba = self.head.predict_proba(X)
        passed = proba >= np.asarray(self.head.thresholds_)[None, :]
        k = max(1, min(int(top_k or self.top_k), proba.shape[1]))
        order = np.argsort(-proba, axis=1, kind="stable")
        classes = self.classes
        low = np.flatnonzero(~passed.any(axis=1))
        votes: dict[int, dict[str, float]] = {}
        if len(low) and self.support is not None and len(self.support):
            scores, keys, _ = self.support.search(X[low], self.knn_k)
            votes = dict(zip(low.tolist(), vote_label_sets(scores, keys)))
        out = []
        for i in range(len(X)):
            tops = [{"label": classes[c], "score": float(proba[i, c])} for c in order[i, :k]]
            if passed[i].any():
                labs = [{"label": classes[c], "score": float(proba[i, c])} for c in order[i] if passed[i, c]]
                out.append(MultiLabelPrediction(labs, "classifier", tops))
                continue
            vote = votes.get(i, {})
            labs = sorted(({"label": lab, "score": float(v)} for lab, v in vote.items()
                           if v >= self.knn_threshold), key=lambda d: (-d["score"], d["label"]))
            out.append(MultiLabelPrediction(labs, "fallback" if labs else "abstain", tops))
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        d = super().save(directory)  # head/, support/, drift/, backbone/ and predictor.json
        cfg = json.loads((d / "predictor.json").read_text())
        cfg.pop("threshold", None)
        cfg.update({"format": FORMAT, "version": FORMAT_VERSION, "task": MULTILABEL_TASK,
                    "thresholds": self.thresholds})
        (d / "predictor.json").write_text(json.dumps(cfg, indent=2, default=str))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, *, engine: str = "auto",
             device: str = "cpu") -> "MultiLabelPredictor":
        from feature_store.index import SupportIndex
        from pipeline.backbones.spec import BackboneSpec

        d = Path(directory)
        cfg = read_predictor_config(d)
        if cfg.get("format") != FORMAT or cfg.get("version") != FORMAT_VERSION:
            raise ValueError(f"{d / 'predictor.json'}: format {cfg.get('format')} v{cfg.get('version')} "
                             f"is not {FORMAT} v{FORMAT_VERSION}; load it with load_any_predictor")
        head = load_multilabel_head(d / "head")
        support = SupportIndex.load(d / "support") if cfg.get("has_support") else None
        specs = []
        for raw in cfg["specs"]:
            spec = dict(raw)
            if str(spec["weights"]).startswith("backbone/"):  # bundled local weights, relative to d
                spec["weights"] = str(d / spec["weights"])
            specs.append(BackboneSpec.from_dict(spec))
        pred = cls(specs, head, support=support, knn_k=cfg["knn_k"], knn_threshold=cfg["knn_threshold"],
                   top_k=cfg["top_k"], info=cfg.get("info"))
        if pred.classes != cfg["classes"]:
            raise ValueError(f"{d}: head classes {pred.classes} differ from predictor.json "
                             f"{cfg['classes']}; the artifact is inconsistent, re-save it")
        # mirrors Predictor.load: INT8 models saved with it go where every load_backbone finds them
        for spec in specs:
            if getattr(spec, "precision", None) == "int8" and (d / "int8").is_dir():
                from pipeline.backbones.quantize import adopt_bundled

                adopt_bundled(spec, d / "int8")
        if cfg.get("has_reference"):
            from pipeline.drift import DriftReference

            pred.reference = DriftReference.load(d / "drift")
        pred.engine, pred.device = engine, device
        return pred


def read_predictor_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "predictor.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved predictor (no predictor.json); "
                                "create one with Predictor.save(dir) or MultiLabelPredictor.save(dir)")
    return json.loads(path.read_text())


def is_multilabel_predictor(directory: str | os.PathLike) -> bool:
    return read_predictor_config(directory).get("format") == FORMAT


def task_of(predictor) -> str:
    """``"multilabel"`` for a ``MultiLabelPredictor``, ``"multiclass"`` for a single-label one."""
    return getattr(predictor, "task", SINGLE_LABEL_TASK)


def answered_labels(prediction) -> list[dict]:
    """The [{label, score}] a prediction answers: a multi-label one's passing labels; a
    single-label one's label, or [] when it abstains (its label is then only the head's guess)."""
    labels = getattr(prediction, "labels", None)
    if labels is not None:
        return list(labels)
    if prediction.decision == "abstain" or prediction.label is None:
        return []
    return [{"label": prediction.label, "score": float(prediction.score)}]


def load_any_predictor(directory: str | os.PathLike, *, engine: str = "auto", device: str = "cpu"):
    """A ``MultiLabelPredictor`` or a single-label ``Predictor``, by what the folder holds."""
    if is_multilabel_predictor(directory):
        return MultiLabelPredictor.load(directory, engine=engine, device=device)
    return Predictor.load(directory, engine=engine, device=device)


__all__ = ["DECISIONS", "FORMAT", "MULTILABEL_TASK", "MultiLabelPrediction", "MultiLabelPredictor",
           "SINGLE_LABEL_TASK", "answered_labels", "is_multilabel_predictor", "load_any_predictor",
           "read_predictor_config", "task_of", "vote_label_sets"]
