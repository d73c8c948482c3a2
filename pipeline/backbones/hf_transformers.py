"""Hugging Face transformers adapter (DINOv2, CLIP, SigLIP, ConvNeXt, ResNet, ViT).

``spec.arch`` is the model kind; ``spec.weights`` a hub id (read from the local HF cache only,
``local_files_only=True``, unless the caller allows downloads) or a folder written by
``save_pretrained``. What ``embed`` returns per kind:

- ``dinov2``: ``pooler_output`` = the final-layernormed CLS token (D = hidden size). With
  ``pooling="cls_mean"``: CLS concatenated with the mean of the patch tokens (2 x hidden size), the
  DINOv2 paper's linear-probe feature.
- ``clip``: ``CLIPVisionModelWithProjection.image_embeds`` (vision tower + visual projection: the
  joint image-text space, not L2-normalised). ``text_embed`` = ``CLIPTextModelWithProjection.text_embeds``.
- ``siglip``: ``SiglipVisionModel.pooler_output`` (attention-pooling head output, the joint space).
  ``text_embed`` = ``SiglipTextModel.pooler_output`` with max_length padding, as SigLIP was trained.
- ``convnext`` / ``resnet``: ``pooler_output`` (global average pool; ConvNeXt adds its layernorm), flattened.
- ``vit``: final-layernormed CLS token of ``ViTModel`` (no pooler layer).

Any checkpoint key the model would have to initialise randomly is an error, never a warning.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from .adapters import LOCAL_FOLDER_HINT
from .base import WeightsUnavailableError
from .hashing import is_local_path, local_path
from .spec import BackboneSpec
from .torch_base import TorchBackbone, count_params_m

__all__ = ["load", "KINDS", "HFImageFeatures"]

KINDS = ("dinov2", "clip", "siglip", "convnext", "resnet", "vit")
_POOLINGS = {
    "dinov2": ("", "cls", "cls_mean"),
    "clip": ("", "image_embeds"),
    "siglip": ("", "pooler"),
    "convnext": ("", "pooler"),
    "resnet": ("", "pooler"),
    "vit": ("", "cls"),
}


class HFImageFeatures(nn.Module):
    """Normalised float (N, 3, S, S) -> (N, D) for one transformers vision model."""

    def __init__(self, model: nn.Module, kind: str, pooling: str = ""):
        super().__init__()
        self.model = model
        self.kind = kind
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        if self.kind == "clip":
            return out.image_embeds
        if self.kind == "dinov2":
            cls = out.pooler_output
            if self.pooling == "cls_mean":
                n_reg = int(getattr(self.model.config, "num_register_tokens", 0) or 0)
                patches = out.last_hidden_state[:, 1 + n_reg:]
                return torch.cat([cls, patches.mean(dim=1)], dim=1)
            return cls
        if self.kind == "vit":
            return out.last_hidden_state[:, 0]
        # siglip, convnext, resnet
        return out.pooler_output.flatten(1)


def _model_classes(kind: str) -> tuple[Any, Any | None, dict[str, Any]]:
    import transformers as tf

    if kind == "dinov2":
        return tf.Dinov2Model, None, {}
    if kind == "clip":
        return tf.CLIPVisionModelWithProjection, tf.CLIPTextModelWithProjection, {}
    if kind == "siglip":
        return tf.SiglipVisionModel, tf.SiglipTextModel, {}
    if kind == "convnext":
        return tf.ConvNextModel, None, {}
    if kind == "resnet":
        return tf.ResNetModel, None, {}
    if kind == "vit":
        return tf.ViTModel, None, {"add_pooling_layer": False}
    raise ValueError(f"unknown transformers model kind {kind!r}: spec.arch must be one of {KINDS}")


def _source(spec: BackboneSpec) -> tuple[str, str | None]:
    """(path-or-hub-id, revision) to hand to from_pretrained."""
    w = spec.weights
    if is_local_path(w):
        p = local_path(w)
        if not p.is_dir() or not (p / "config.json").is_file():
            raise WeightsUnavailableError(
                spec.name,
                f"{p} is not a transformers model folder (no config.json): write it with "
                f"`model.save_pretrained(DIR)` (or `hf download <repo> --local-dir DIR`), then {LOCAL_FOLDER_HINT}",
            )
        return str(p), None
    return (w[len("hf-hub:"):] if w.startswith("hf-hub:") else w), spec.revision


def _cache_dir(where: str) -> str | None:
    """The HF hub cache as the environment names it now (None for a local folder)."""
    import os

    from .hub_cache import hub_cache_dir

    return None if os.path.isdir(where) else hub_cache_dir()


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' per-key load report / progress bars; we check the loading info ourselves."""
    from transformers.utils import logging as tf_logging

    level = tf_logging.get_verbosity()
    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()


def _from_pretrained(cls: Any, spec: BackboneSpec, where: str, revision: str | None, allow_download: bool, **kwargs):
    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(
                where,
                revision=revision,
                local_files_only=not allow_download,
                cache_dir=_cache_dir(where),
                dtype=torch.float32,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below as an error, with the keys named
                **kwargs,
            )
    except OSError as e:
        from .adapters import download_hint

        raise WeightsUnavailableError(
            spec.name,
            f"weights for {spec.name} are not on this machine (offline hub; transformers could not load "
            f"{where!r}: {str(e).splitlines()[0]}): {download_hint(spec)}",
        ) from e
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in (info.get("mismatched_keys") or []))
    if missing or mismatched:
        raise ValueError(
            f"{spec.name}: the checkpoint at {where!r} does not fit {cls.__name__} "
            f"(missing {missing[:8]}{'...' if len(missing) > 8 else ''}, mismatched {mismatched[:8]}); refusing to "
            f"initialise those weights randomly. Check spec.arch ({spec.arch!r}) matches the checkpoint."
        )
    return model.eval()


def _text_encoder(spec: BackboneSpec, text_cls: Any, where: str, revision: str | None,
                  allow_download: bool, device: str) -> Callable[[list[str]], torch.Tensor]:
    """Lazily loads tokenizer + text tower on first use (they are not needed for image features)."""
    state: dict[str, Any] = {}

    def encode(prompts: list[str]) -> torch.Tensor:
        if not state:
            from transformers import AutoTokenizer

            try:
                with _quiet_transformers():
                    tok = AutoTokenizer.from_pretrained(where, revision=revision, local_files_only=not allow_download,
                                                        cache_dir=_cache_dir(where))
            except (OSError, ValueError) as e:
                raise WeightsUnavailableError(
                    spec.name,
                    f"{spec.name}: no tokenizer at {where!r} ({str(e).splitlines()[0]}): save it next to the model "
                    f"with `AutoProcessor.from_pretrained(REPO).save_pretrained(DIR)`",
                ) from e
            model = _from_pretrained(text_cls, spec, where, revision, allow_download).to(device)
            state["tok"], state["model"] = tok, model
        tok, model = state["tok"], state["model"]
        max_len = int(getattr(model.config, "max_position_embeddings", 77) or 77)
        if spec.arch == "siglip":
            batch = tok(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
        else:
            batch = tok(prompts, padding=True, max_length=max_len, truncation=True, return_tensors="pt")
        inputs = {"input_ids": batch["input_ids"].to(device)}
        if spec.arch != "siglip" and "attention_mask" in batch:
            inputs["attention_mask"] = batch["attention_mask"].to(device)
        out = model(**inputs)
        return out.text_embeds if spec.arch == "clip" else out.pooler_output

    return encode


def _check_model_type(spec: BackboneSpec, where: str, revision: str | None) -> None:
    """Refuse a checkpoint of another model type before transformers builds (and randomly fills) it."""
    import json
    import os

    if os.path.isdir(where):
        cfg_path: str | None = os.path.join(where, "config.json")
    else:
        from .hub_cache import cached_file

        cfg_path = cached_file(where, "config.json", revision)
    if not cfg_path or not os.path.isfile(cfg_path):
        return
    try:
        model_type = str(json.loads(open(cfg_path, encoding="utf-8").read()).get("model_type", ""))
    except (OSError, ValueError):
        return
    if model_type and not model_type.startswith(spec.arch):
        raise ValueError(
            f"{spec.name}: the checkpoint at {where!r} is a {model_type!r} model, but this spec loads "
            f"{spec.arch!r} (spec.arch); use a {spec.arch} checkpoint, or pass the folder as `--backbones DIR` "
            f"so its spec comes from its own config.json"
        )


def load(spec: BackboneSpec, *, device: str = "cpu", dtype: str | None = None, allow_download: bool = False) -> TorchBackbone:
    kind = spec.arch
    vision_cls, text_cls, extra = _model_classes(kind)
    if spec.pooling not in _POOLINGS[kind]:
        raise ValueError(f"{spec.name}: pooling {spec.pooling!r} is not supported for {kind}; use one of {_POOLINGS[kind]}")
    where, revision = _source(spec)
    _check_model_type(spec, where, revision)
    model = _from_pretrained(vision_cls, spec, where, revision, allow_download, **extra, **spec.kwargs)
    features = HFImageFeatures(model, kind, spec.pooling)
    text = _text_encoder(spec, text_cls, where, revision, allow_download, str(device)) if (spec.text and text_cls) else None
    cnn = kind in ("convnext", "resnet")
    return TorchBackbone(
        spec,
        features,
        device=device,
        dtype=dtype,
        channels_last=cnn and str(device) == "cpu",
        text_encoder=text,
        params_m=count_params_m(model),
    )
