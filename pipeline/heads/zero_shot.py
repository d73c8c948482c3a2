"""ZeroShot: CLIP-style classification by similarity to class-name text embeddings.

``fit(X, y)`` learns nothing from X: it records ``classes_`` (sorted unique y), builds one
prompt per (class, template) -- ``template.format(class_name)`` -- embeds them with the
``text_embedder`` callable (``list[str] -> (N, D) float32``, e.g. a CLIP text tower), and stores
the L2-normalised mean prompt embedding of each class. X is only checked for shape: its width
must equal the text embedding width (same CLIP model for images and text). After ``save`` /
``load`` no text tower is needed: the class embeddings travel in arrays.safetensors (the
``text_embedder`` callable itself is not saved; a loaded head has ``text_embedder=None`` and
needs one again only to be refitted).

Logits = ``logit_scale * cos(image embedding, class embedding)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pipeline.heads.base import Head, check_features, check_labels, encode_labels
from pipeline.heads.errors import HeadInputError
from pipeline.heads.extmath import l2_normalize
from pipeline.heads.registry import register

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
)


def default_class_name(label) -> str:
    """Readable name from a folder-style label: 't_shirt' / 'T-Shirt' -> 't shirt'."""
    return str(label).replace("_", " ").replace("-", " ").strip().lower()


@register
class ZeroShot(Head):
    """Zero-shot classifier from class-name prompts.

    Parameters
    ----------
    class_names: None (names derived from labels: underscores/dashes -> spaces, lower case)
        or a mapping {label: natural-language name}; labels missing from it use the default.
    templates: prompt templates with one ``{}`` (None = DEFAULT_TEMPLATES).
    text_embedder: callable list[str] -> (N, D) float array; required by fit, not saved.
    logit_scale: multiplier on cosine similarities (CLIP's learned value is ~100).
    """

    _unsaved_params = ("text_embedder",)

    def __init__(self, class_names=None, templates=None, text_embedder=None, logit_scale=100.0):
        self.class_names = class_names
        self.templates = templates
        self.text_embedder = text_embedder
        self.logit_scale = logit_scale

    def _names(self) -> list[str]:
        mapping = self.class_names
        if mapping is not None and not isinstance(mapping, Mapping):
            raise ValueError(
                "class_names must be None or a mapping {label: name} "
                f"(got {type(mapping).__name__}); a list would be ambiguous about order"
            )
        mapping = {str(k): v for k, v in (mapping or {}).items()}  # JSON keys are strings
        return [str(mapping.get(str(c), default_class_name(c))) for c in self.classes_.tolist()]

    def fit(self, X, y) -> "ZeroShot":
        if self.text_embedder is None or not callable(self.text_embedder):
            raise ValueError(
                "ZeroShot.fit needs text_embedder: a callable list[str] -> (N, D) array "
                "(e.g. the text tower of the same CLIP model that produced X)"
            )
        templates = list(self.templates) if self.templates is not None else list(DEFAULT_TEMPLATES)
        bad = [t for t in templates if "{}" not in t]
        if not templates or bad:
            raise ValueError(f"every template needs a '{{}}' placeholder; bad: {bad or templates}")
        X = check_features(X)
        y = check_labels(y, X.shape[0])
        self.classes_, _ = encode_labels(y)
        names = self._names()
        prompts = [t.format(n) for n in names for t in templates]
        emb = np.asarray(self.text_embedder(prompts), dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(prompts):
            raise ValueError(
                f"text_embedder returned shape {emb.shape} for {len(prompts)} prompts; "
                "expected (n_prompts, embed_dim)"
            )
        if not np.isfinite(emb).all():
            raise ValueError("text_embedder returned NaN/inf")
        if emb.shape[1] != X.shape[1]:
            raise HeadInputError(
                f"image features have {X.shape[1]} dims but text embeddings have "
                f"{emb.shape[1]}: use image and text towers of the same CLIP model"
            )
        per_class = l2_normalize(emb).reshape(len(names), len(templates), -1).mean(axis=1)
        self.text_embeddings_ = l2_normalize(per_class)  # (C, D)
        self.class_prompts_ = names
        self.n_features_in_ = int(X.shape[1])
        return self

    def _logits(self, X: np.ndarray) -> np.ndarray:
        return np.float32(self.logit_scale) * (l2_normalize(X) @ self.text_embeddings_.T)

    def _state(self):
        return {"text_embeddings": self.text_embeddings_}, {"class_prompts": self.class_prompts_}

    def _set_state(self, arrays, state, path):
        self.text_embeddings_ = arrays["text_embeddings"]
        self.class_prompts_ = list(state.get("class_prompts", []))
