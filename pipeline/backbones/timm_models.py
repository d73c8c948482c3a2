"""timm adapter: any timm architecture, weights from a local file/dir or the offline hub cache.

Embedding = timm's pooled pre-logits features (``forward_head(forward_features(x), pre_logits=True)``),
which is what ``num_classes=0`` would return. The ImageNet head, when the checkpoint has one, is
kept for `Backbone.classify`.

Weights never come from a silent random init: ``pretrained=True`` is only ever called with an
explicit local file (``pretrained_cfg_overlay=dict(file=...)``) or a ``local-dir:`` folder, and a
missing file raises `WeightsUnavailableError`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .adapters import LOCAL_FOLDER_HINT
from .base import WeightsUnavailableError, find_checkpoint as _find_checkpoint
from .hashing import is_local_path, local_path
from .spec import BackboneSpec
from .torch_base import TorchBackbone, count_params_m

__all__ = ["load", "TimmFeatures", "build_timm_backbone", "find_checkpoint", "is_cnn"]

_CHECKPOINT_NAMES = (
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pth.tar", ".bin", ".pt")


class TimmFeatures(nn.Module):
    """Normalised float (N, 3, S, S) -> pooled pre-logits features (N, D)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def is_cnn(module: nn.Module) -> bool:
    """Heuristic for channels_last: many spatial convolutions (a ViT has one patch-embed conv)."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1:
            n += 1
            if n > 2:
                return True
    return False


def find_checkpoint(folder: Path) -> Path | None:
    return _find_checkpoint(folder, _CHECKPOINT_NAMES, _CHECKPOINT_SUFFIXES)


def _head_classes(path: Path, classifier: str | None) -> int | None:
    """Number of classes of the checkpoint's head (0 if it has none), read without building a model."""
    if classifier is None:
        return None
    key = f"{classifier}.weight"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if key not in keys:
                return 0
            return int(f.get_slice(key).get_shape()[0])
    from timm.models import load_state_dict

    sd = load_state_dict(str(path))
    return int(sd[key].shape[0]) if key in sd else 0


def build_timm_backbone(spec: BackboneSpec, model: nn.Module, *, device: str, dtype: str | None) -> TorchBackbone:
    model.eval()
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    has_head = getattr(model, "num_classes", 0) > 0 and isinstance(head, nn.Module)
    features = TimmFeatures(model)
    params = count_params_m(model, exclude=head if has_head else None)
    bb = TorchBackbone(
        spec.replace(num_classes=int(getattr(model, "num_classes", 0) or 0)),
        features,
        device=device,
        dtype=dtype,
        classifier=model if has_head else None,
        channels_last=str(device) == "cpu" and is_cnn(model),
        params_m=params,
    )
    return bb


def timm_model_name(spec: BackboneSpec) -> str:
    """``arch.tag`` when the spec's name carries a timm pretrained tag for its arch, else ``arch``."""
    import timm.models as tm

    parsed = spec.parsed
    if parsed.arch == spec.arch and parsed.tag and tm.get_pretrained_cfg(f"{spec.arch}.{parsed.tag}") is not None:
        return f"{spec.arch}.{parsed.tag}"
    return spec.arch


def _classifier_name(name: str) -> str | None:
    import timm.models as tm

    cfg = tm.get_pretrained_cfg(name) or tm.get_pretrained_cfg(name.split(".")[0])
    cls = getattr(cfg, "classifier", None) if cfg is not None else None
    if isinstance(cls, (tuple, list)):
        cls = cls[0] if cls else None
    return cls


def _create_from_file(spec: BackboneSpec, path: Path) -> nn.Module:
    """timm's own loader on an explicit file; the head size follows the checkpoint (0 if it has none)."""
    import timm

    name = timm_model_name(spec)
    if not timm.is_model(name.split(".")[0]):
        raise ValueError(f"{spec.name}: {spec.arch!r} is not a timm architecture (see timm.list_models())")
    kwargs: dict[str, Any] = dict(spec.kwargs)
    overlay: dict[str, Any] = {"file": str(path)}
    n_classes = _head_classes(path, _classifier_name(name))
    if n_classes is not None:
        kwargs["num_classes"] = n_classes
        overlay["num_classes"] = n_classes
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


def _create_from_dir(spec: BackboneSpec, folder: Path) -> nn.Module:
    import timm

    if (folder / "config.json").is_file():
        # timm's own hub format (timm.models.save_for_hf / hf download): config.json + model.safetensors
        if find_checkpoint(folder) is None:
            raise WeightsUnavailableError(
                spec.name,
                f"{folder} has a timm config.json but no checkpoint (model.safetensors / pytorch_model.bin): "
                f"save the model with `timm.models.save_for_hf(model, DIR, safe_serialization=True)`",
            )
        return timm.create_model(f"local-dir:{folder}", pretrained=True, **spec.kwargs)
    ckpt = find_checkpoint(folder)
    if ckpt is None:
        raise WeightsUnavailableError(
            spec.name,
            f"no checkpoint (*.safetensors / *.pth / *.bin) in {folder}: put the weight file there or point the "
            f"spec's weights at the file",
        )
    return _create_from_file(spec, ckpt)


def load(spec: BackboneSpec, *, device: str = "cpu", dtype: str | None = None, allow_download: bool = False) -> TorchBackbone:
    import timm

    w = spec.weights
    if is_local_path(w):
        p = local_path(w)
        if p.is_dir():
            model = _create_from_dir(spec, p)
        elif p.is_file():
            model = _create_from_file(spec, p)
        else:
            raise WeightsUnavailableError(
                spec.name, f"weights path {p} does not exist on this machine: save the model there with "
                           f"`timm.models.save_for_hf(model, DIR)`, or {LOCAL_FOLDER_HINT} for the folder where it is"
            )
    else:
        from .adapters import hub_files_for, not_cached_error
        from .hub_cache import resolve_cached, snapshot_dir

        files = hub_files_for(spec)
        found, missing = resolve_cached(files)
        if missing:
            if not allow_download:
                raise not_cached_error(spec, files, missing)
            model = timm.create_model(f"hf-hub:{files.repo_id}", pretrained=True, **spec.kwargs)
        else:
            folder = snapshot_dir(found)
            assert folder is not None
            if (folder / "config.json").is_file():
                model = timm.create_model(f"local-dir:{folder}", pretrained=True, **spec.kwargs)
            else:
                model = _create_from_file(spec, Path(next(iter(found.values()))))
    return build_timm_backbone(spec, model, device=device, dtype=dtype)
