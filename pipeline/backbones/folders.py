"""A folder of weights is a backbone: derive its `BackboneSpec` from what the libraries wrote.

Recognised layouts (checked in this order):

- transformers ``save_pretrained``: ``config.json`` with a ``model_type`` (DINOv2, CLIP / CLIP
  vision, SigLIP / SigLIP vision, ViT, ConvNeXt, ResNet) + ``model.safetensors`` /
  ``pytorch_model.bin``; preprocessing from ``preprocessor_config.json`` when present (the image
  processor's size, crop, mean, std, resample), else the model type's defaults at the config's
  image size. CLIP / SigLIP folders with tokenizer files get their text tower (zero-shot).
- open_clip: ``open_clip_config.json`` (model + preprocess cfg) + a checkpoint; or a bare
  checkpoint whose open_clip model name comes from the sidecar / an override (``arch``).
- timm: ``config.json`` with ``architecture`` + ``pretrained_cfg`` (``timm.models.save_for_hf``);
  or a bare checkpoint whose timm model name comes from the sidecar / an override.

The optional sidecar ``tlpipe.json`` (and ``overrides``, e.g. ``tlpipe backbones add ... --set
arch=ViT-B-32``) sets any spec field but ``name`` / ``weights``. Nothing here loads a model or
imports torch; open_clip / timm are imported only to read a named model's default config.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

from .adapters import CHECKPOINT_SUFFIXES
from .base import WeightsUnavailableError, find_checkpoint
from .spec import CLIP_MEAN, CLIP_STD, HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD, BackboneSpec

__all__ = ["SIDECAR", "HF_MODEL_TYPES", "FolderFormatError", "spec_from_folder", "default_name", "spec_overrides"]

#: the optional file beside the weights that names what the files alone cannot (source, arch, ...)
SIDECAR = "tlpipe.json"

#: transformers ``model_type`` -> the adapter's model kind (`hf_transformers.KINDS`)
HF_MODEL_TYPES = {
    "dinov2": "dinov2", "clip": "clip", "clip_vision_model": "clip", "siglip": "siglip",
    "siglip_vision_model": "siglip", "vit": "vit", "convnext": "convnext", "resnet": "resnet",
}
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model")
_HF_POOLING = {"dinov2": "cls", "clip": "image_embeds", "siglip": "pooler", "vit": "cls",
               "convnext": "pooler", "resnet": "pooler"}
_HF_MEAN_STD = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (HALF_MEAN, HALF_STD), "vit": (HALF_MEAN, HALF_STD)}
#: PIL resample codes image-processor configs store -> spec interpolation names
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_OVERRIDABLE = ("family", "source", "arch", "revision", "input_size", "mean", "std", "interpolation", "crop_pct",
                "crop_mode", "pooling", "text", "model_kwargs", "license", "description", "embed_dim",
                "params_m", "num_classes")

FORMAT_NEEDS = (
    "a transformers folder needs config.json with a model_type (" + ", ".join(sorted(set(HF_MODEL_TYPES))) + ") and "
    "model.safetensors or pytorch_model.bin (`model.save_pretrained(DIR)`, plus the image processor / "
    "tokenizer `.save_pretrained(DIR)` for its preprocessing and text tower); an open_clip folder needs "
    "open_clip_config.json and open_clip_model.safetensors, or a checkpoint plus its model name "
    f"({SIDECAR} {{\"source\": \"open_clip\", \"arch\": \"ViT-B-32\"}} or `--set arch=ViT-B-32`); a timm folder needs "
    "config.json with architecture and pretrained_cfg (`timm.models.save_for_hf(model, DIR)`), or a checkpoint "
    f"plus its timm model name ({SIDECAR} {{\"source\": \"timm\", \"arch\": \"resnet50\"}})"
)


class FolderFormatError(WeightsUnavailableError, ValueError):
    """A folder that matches no backbone format (or lacks a file its format needs): what was found,
    and what each format needs."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FolderFormatError(str(path.parent), f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise FolderFormatError(str(path.parent), f"{path} does not hold a JSON object")
    return data


def _found(folder: Path, limit: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "nothing (the folder is empty)"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_-")
    return s if s and s[0].isalnum() else f"m{s}" if s else "model"


def _family_slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "_", text.lower()).strip("_-") or "local"


def default_name(folder: Path, family: str) -> str:
    """``family/<folder name>`` (the name a folder passed as ``--backbones DIR`` gets)."""
    return f"{_family_slug(family)}/{_slug(folder.name)}"


def spec_overrides(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Checked spec-field overrides (sidecar or ``--set``); unknown fields fail naming the known ones."""
    unknown = sorted(set(raw) - set(_OVERRIDABLE))
    if unknown:
        raise FolderFormatError(where, f"{where}: unknown backbone spec field(s) {unknown}; settable: {list(_OVERRIDABLE)}")
    return dict(raw)


# ---------------------------------------------------------------------------- transformers

def _hf_size(value: Any) -> tuple[int | None, bool]:
    """(pixels, is_shortest_edge) of an image-processor ``size`` / ``crop_size`` entry."""
    if isinstance(value, (int, float)):
        return int(value), True
    if isinstance(value, Mapping):
        if "shortest_edge" in value:
            return int(value["shortest_edge"]), True
        if "height" in value:
            return int(value["height"]), False
    return None, True


def _hf_preprocess(folder: Path, kind: str, config: Mapping[str, Any]) -> dict[str, Any]:
    mean, std = _HF_MEAN_STD.get(kind, (IMAGENET_MEAN, IMAGENET_STD))
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), Mapping) else config
    image_size = vision.get("image_size")
    out: dict[str, Any] = {"mean": mean, "std": std, "interpolation": "bicubic",
                           "input_size": int(image_size) if isinstance(image_size, int) else 224,
                           "crop_pct": 1.0 if kind in ("clip", "siglip", "vit") else 0.875,
                           "crop_mode": "squash" if kind in ("siglip", "vit") else "center"}
    proc_path = folder / "preprocessor_config.json"
    if not proc_path.is_file():
        return out
    proc = _read_json(proc_path)
    if proc.get("image_mean") is not None:
        out["mean"] = tuple(proc["image_mean"])
    if proc.get("image_std") is not None:
        out["std"] = tuple(proc["image_std"])
    if proc.get("resample") in _PIL_RESAMPLE:
        out["interpolation"] = _PIL_RESAMPLE[proc["resample"]]
    size, shortest = _hf_size(proc.get("size"))
    crop, _ = _hf_size(proc.get("crop_size"))
    if proc.get("do_center_crop", crop is not None) and crop:
        out["input_size"] = crop
        out["crop_pct"] = min(1.0, crop / size) if size else 1.0
        out["crop_mode"] = "center" if shortest else "squash"
    elif size:
        out["input_size"], out["crop_pct"] = size, 1.0
        out["crop_mode"] = "center" if shortest else "squash"
    return out


def _hf_embed_dim(kind: str, config: Mapping[str, Any]) -> int:
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), Mapping) else config
    if kind == "clip":
        return int(config.get("projection_dim") or vision.get("projection_dim") or 0)
    if kind in ("convnext", "resnet"):
        sizes = config.get("hidden_sizes") or [0]
        return int(sizes[-1])
    return int(vision.get("hidden_size") or 0)


def _transformers_spec(folder: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    model_type = str(config.get("model_type", ""))
    kind = HF_MODEL_TYPES.get(model_type)
    if kind is None:
        raise FolderFormatError(
            str(folder), f"{folder} is a transformers {model_type!r} model, which tlpipe does not embed with; "
                         f"supported model types: {sorted(HF_MODEL_TYPES)}")
    if not any((folder / f).is_file() for f in _HF_WEIGHTS):
        raise FolderFormatError(
            str(folder), f"{folder} has a transformers config.json ({model_type}) but no weights (found {_found(folder)}): "
                         f"write them with `model.save_pretrained(DIR)`")
    tower = model_type in ("clip", "siglip")
    text = tower and any((folder / f).is_file() for f in _TOKENIZER_FILES)
    note = ""
    if tower and not text:
        note = "; text tower present but no tokenizer files: `AutoProcessor...save_pretrained(DIR)` enables zero-shot"
    return {"source": "transformers", "arch": kind, "family": kind, "pooling": _HF_POOLING[kind], "text": text,
            "embed_dim": _hf_embed_dim(kind, config), **_hf_preprocess(folder, kind, config),
            "description": f"transformers {model_type} from {folder}{note}"}


# ---------------------------------------------------------------------------- open_clip

def _open_clip_preprocess(pre: Mapping[str, Any], image_size: Any) -> dict[str, Any]:
    size = pre.get("size", image_size)
    size = size[0] if isinstance(size, (list, tuple)) else size
    out: dict[str, Any] = {"mean": tuple(pre.get("mean", CLIP_MEAN)), "std": tuple(pre.get("std", CLIP_STD)),
                           "interpolation": pre.get("interpolation", "bicubic"), "crop_pct": 1.0,
                           "crop_mode": "squash" if pre.get("resize_mode") == "squash" else "center"}
    if isinstance(size, int):
        out["input_size"] = size
    return out


def _open_clip_spec(folder: Path, arch: str | None) -> dict[str, Any]:
    ckpt = find_checkpoint(folder, (), CHECKPOINT_SUFFIXES)
    cfg_path = folder / "open_clip_config.json"
    if cfg_path.is_file():
        if ckpt is None:
            raise FolderFormatError(
                str(folder), f"{folder} has open_clip_config.json but no checkpoint (found {_found(folder)}): put "
                             f"open_clip_model.safetensors beside it")
        cfg = _read_json(cfg_path)
        model_cfg = cfg.get("model_cfg") or {}
        vision = model_cfg.get("vision_cfg") or {}
        return {"source": "open_clip", "arch": arch or str(cfg.get("model_name") or "open_clip_config"),
                "family": "clip", "text": "text_cfg" in model_cfg, "embed_dim": int(model_cfg.get("embed_dim") or 0),
                **_open_clip_preprocess(cfg.get("preprocess_cfg") or {}, vision.get("image_size")),
                "description": f"open_clip model from {folder}"}
    if not arch:
        raise FolderFormatError(
            str(folder), f"{folder} holds an open_clip checkpoint but not its model name: add {SIDECAR} "
                         f"{{\"source\": \"open_clip\", \"arch\": \"ViT-B-32\"}} or pass `--set arch=ViT-B-32`")
    import open_clip

    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise FolderFormatError(
            str(folder), f"open_clip has no model named {arch!r} (see open_clip.list_models()); fix `arch` in "
                         f"{SIDECAR} / `--set arch=...`")
    pre = model_cfg.get("preprocess_cfg") or {}
    return {"source": "open_clip", "arch": arch, "family": "clip", "text": "text_cfg" in model_cfg,
            "embed_dim": int(model_cfg.get("embed_dim") or 0),
            **_open_clip_preprocess(pre, (model_cfg.get("vision_cfg") or {}).get("image_size")),
            "description": f"open_clip {arch} checkpoint from {folder}"}


# ---------------------------------------------------------------------------- timm

def _timm_preprocess(cfg: Mapping[str, Any]) -> dict[str, Any]:
    size = cfg.get("input_size") or (3, 224, 224)
    return {"input_size": int(size[-1]), "mean": tuple(cfg.get("mean", IMAGENET_MEAN)),
            "std": tuple(cfg.get("std", IMAGENET_STD)), "interpolation": cfg.get("interpolation") or "bicubic",
            "crop_pct": float(cfg.get("crop_pct", 0.875)),
            "crop_mode": "squash" if cfg.get("crop_mode") == "squash" else "center"}


def _timm_family(arch: str) -> str:
    return _family_slug(arch.split("_")[0])


def _timm_spec(folder: Path, config: Mapping[str, Any] | None, arch: str | None) -> dict[str, Any]:
    if find_checkpoint(folder, (), CHECKPOINT_SUFFIXES) is None:
        raise FolderFormatError(
            str(folder), f"{folder} has no timm checkpoint (found {_found(folder)}): save the model with "
                         f"`timm.models.save_for_hf(model, DIR, safe_serialization=True)`")
    if config is not None:
        arch = arch or str(config["architecture"])
        pcfg = config.get("pretrained_cfg") or {}
        return {"source": "timm", "arch": arch, "family": _timm_family(arch), **_timm_preprocess(pcfg),
                "num_classes": int(config.get("num_classes") or 0),
                "embed_dim": int(config.get("num_features") or 0),
                "description": f"timm {arch} from {folder}"}
    if not arch:
        raise FolderFormatError(
            str(folder), f"{folder} holds a checkpoint but not its timm model name: add {SIDECAR} "
                         f"{{\"source\": \"timm\", \"arch\": \"resnet50\"}} or pass `--set arch=resnet50`")
    import timm
    import timm.models as tm

    if not timm.is_model(arch.split(".")[0]):
        raise FolderFormatError(str(folder), f"{arch!r} is not a timm model name (see timm.list_models())")
    pcfg = tm.get_pretrained_cfg(arch)
    return {"source": "timm", "arch": arch.split(".")[0], "family": _timm_family(arch),
            **_timm_preprocess(pcfg.to_dict() if pcfg is not None else {}),
            "description": f"timm {arch} checkpoint from {folder}"}


# ---------------------------------------------------------------------------- detection

def _sniff_checkpoint_source(folder: Path) -> str | None:
    """'open_clip' / 'timm' from a bare safetensors checkpoint's key names (no tensors read)."""
    ckpt = find_checkpoint(folder, (), (".safetensors",))
    if ckpt is None:
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(ckpt), framework="np") as f:
            keys = list(f.keys())
    except Exception:  # not a readable safetensors file: let the format check say so
        return None
    if any(k.startswith("visual.") for k in keys) and any(k in ("text_projection", "token_embedding.weight") for k in keys):
        return "open_clip"
    return None


def _derive(folder: Path, wanted: Mapping[str, Any]) -> dict[str, Any]:
    source, arch = wanted.get("source"), wanted.get("arch")
    config_path = folder / "config.json"
    config = _read_json(config_path) if config_path.is_file() else None
    if source in (None, "transformers") and config is not None and "model_type" in config:
        return _transformers_spec(folder, config)
    if source in (None, "open_clip") and (folder / "open_clip_config.json").is_file():
        return _open_clip_spec(folder, arch)
    if source in (None, "timm") and config is not None and "architecture" in config:
        return _timm_spec(folder, config, arch)
    if source == "open_clip" or (source is None and _sniff_checkpoint_source(folder) == "open_clip"):
        return _open_clip_spec(folder, arch)
    if source == "timm" or (source is None and arch):
        return _timm_spec(folder, None, arch)
    if source == "transformers":
        raise FolderFormatError(
            str(folder), f"{folder} has no transformers config.json with a model_type (found {_found(folder)}): "
                         f"{FORMAT_NEEDS}")
    raise FolderFormatError(str(folder), f"{folder} matches no backbone format: found {_found(folder)}; {FORMAT_NEEDS}")


def spec_from_folder(path: str | Path, *, name: str | None = None, family: str | None = None,
                     overrides: Mapping[str, Any] | None = None) -> BackboneSpec:
    """The spec of the weights in ``path`` (see the module docstring). ``overrides`` win over the
    sidecar, which wins over what the files say. Raises `FolderFormatError` (one line: what was
    found, what each format needs) or `WeightsUnavailableError` for a path that is not there."""
    folder = Path(path).expanduser().resolve()
    if not folder.exists():
        raise WeightsUnavailableError(
            name or str(path), f"backbone folder {folder} does not exist on this machine: copy the weights "
                               f"there (on a cluster: onto storage every node mounts at the same path)")
    if not folder.is_dir():
        raise FolderFormatError(
            str(path), f"{folder} is a file; a backbone is the folder holding it (with its config): {FORMAT_NEEDS}")
    sidecar = spec_overrides(_read_json(folder / SIDECAR), str(folder / SIDECAR)) if (folder / SIDECAR).is_file() else {}
    wanted = {**sidecar, **spec_overrides(overrides or {}, "--set")}
    fields = _derive(folder, wanted)
    if not any(f.is_file() and f.name.endswith(CHECKPOINT_SUFFIXES) for f in folder.iterdir()):
        raise FolderFormatError(str(folder), f"{folder} holds no weight file (*.safetensors, *.bin, *.pth): {FORMAT_NEEDS}")
    fields.update(wanted)
    if family:
        fields["family"] = family
    fields["family"] = _family_slug(str(fields.get("family") or "local"))
    try:
        return BackboneSpec(name=name or default_name(folder, fields["family"]), weights=str(folder), **fields)
    except (TypeError, ValueError) as e:
        raise FolderFormatError(str(folder), f"{folder}: the derived spec is invalid ({e}); fix it with `--set FIELD=VALUE`") from e
