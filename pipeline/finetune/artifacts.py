"""What a fine-tune leaves behind, in one folder:

```
finetune.json        method, plan (strategy), config, base spec, merged spec name, history, metrics
adapter/             LoRA: PEFT `save_pretrained` (adapter_config.json + adapter_model.safetensors);
                     unfrozen stages: unfrozen.safetensors + adapter_config.json; full: absent
merged/spec.json     a BackboneSpec whose weights are merged/weights (relative; resolved on read)
merged/weights/      the backbone with adapters merged, in its library's own format (timm state
                     dict / transformers save_pretrained / open_clip checkpoint + config)
head/                a pipeline.heads LinearProbe (identity standardisation) = the trained head
```

`read_merged_spec(dir)` gives a spec that `pipeline.backbones.load_backbone` loads like any other
(its fingerprint follows the merged weights' content), so the serving `Predictor` takes
``(read_merged_spec(dir), load_head(dir / "head"))`` unchanged. `load_finetuned(dir,
use="adapter")` rebuilds the same model from the base weights + the adapter instead.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import FinetuneConfig
from .model import FinetuneModel, count_trainable, merged_features, probe_from_linear
from .targets import TargetPlan

__all__ = ["save_artifacts", "read_finetune_info", "read_merged_spec", "load_finetuned",
           "merged_spec_name", "save_merged_backbone", "FORMAT", "INFO_FILE"]

FORMAT = "tlpipe.finetune"
FORMAT_VERSION = 1
INFO_FILE = "finetune.json"
UNFROZEN_FILE = "unfrozen.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def merged_spec_name(spec: Any, method: str, digest: str) -> str:
    """``family/<arch>-<method>.<tag>-<digest8>``: a valid backbone name, distinct per weights.
    The arch part differs from the library arch, so nothing mistakes the name for a pretrained tag."""
    p = spec.parsed
    tag = f"{p.tag}-{digest[:8]}" if p.tag else digest[:8]
    family = p.family or spec.family
    arch_tag = f"{p.arch}-{method}.{tag}"
    return f"{family}/{arch_tag}" if family else arch_tag


def _clone_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def _save_timm(features: nn.Module, wdir: Path) -> None:
    from safetensors.torch import save_file

    model = getattr(features, "model", None)
    if model is None:
        raise TypeError(f"expected timm features (TimmFeatures with .model), got {type(features).__name__}")
    sd = model.state_dict()
    cls = model.get_classifier() if hasattr(model, "get_classifier") else None
    drop = ""
    if isinstance(cls, nn.Module) and any(True for _ in cls.parameters()):
        drop = next((n for n, m in model.named_modules() if m is cls), "")
    if drop:  # the ImageNet classifier is not part of the embedding path
        sd = {k: v for k, v in sd.items() if not (k == drop or k.startswith(drop + "."))}
    save_file(_clone_state(sd), str(wdir / "model.safetensors"), metadata={"format": "pt"})


def _save_transformers(features: nn.Module, wdir: Path) -> None:
    model = getattr(features, "model", None)
    if model is None or not hasattr(model, "save_pretrained"):
        raise TypeError(f"expected transformers features (HFImageFeatures), got {type(features).__name__}")
    model.save_pretrained(str(wdir), safe_serialization=True)


def _save_open_clip(features: nn.Module, base_spec: Any, wdir: Path) -> dict[str, Any]:
    """The full open_clip model (its loader builds the whole CLIP) with the image tower replaced."""
    import open_clip
    from safetensors.torch import save_file

    from pipeline.backbones.openclip import resolve_pretrained

    model_name, pretrained, extra = resolve_pretrained(base_spec, False)
    full = open_clip.create_model(model_name, pretrained=pretrained, precision="fp32", device="cpu",
                                  require_pretrained=True, **{**extra, **base_spec.kwargs})
    sd = dict(full.state_dict())
    for k, v in features.state_dict().items():  # OpenClipImageFeatures keys are "visual.*" like CLIP's
        if k not in sd:
            raise KeyError(f"merged image-tower key {k!r} is not in the open_clip model {model_name}")
        sd[k] = v
    save_file(_clone_state(sd), str(wdir / "open_clip_model.safetensors"))
    if model_name.startswith("local-dir:"):
        src = Path(model_name[len("local-dir:"):])
        for f in src.iterdir():  # config + tokenizer files, not the old checkpoint
            if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt", ".pth")):
                shutil.copy2(f, wdir / f.name)
    return {"force_quick_gelu": True} if extra.get("force_quick_gelu") else {}


def save_merged_backbone(features: nn.Module, base_spec: Any, directory: str | os.PathLike, *,
                         method: str) -> Any:
    """Write merged weights under ``directory/weights`` + ``directory/spec.json``; returns the spec
    (weights = the absolute weights dir)."""
    from pipeline.backbones.spec import weights_identity

    d = Path(directory)
    wdir = d / "weights"
    if wdir.exists():
        shutil.rmtree(wdir)
    wdir.mkdir(parents=True)
    kwargs = dict(base_spec.kwargs)
    source = base_spec.source
    if source in ("timm", "package"):
        _save_timm(features, wdir)
        source = "timm"
    elif source == "transformers":
        _save_transformers(features, wdir)
    elif source == "open_clip":
        kwargs.update(_save_open_clip(features, base_spec, wdir))
    else:  # pragma: no cover - BackboneSpec validates source
        raise ValueError(f"no merged export for source {source!r}")
    spec = base_spec.replace(source=source, weights=str(wdir), revision=None, num_classes=0,
                             text=False, model_kwargs=tuple(sorted(kwargs.items())))
    digest = weights_identity(spec).rsplit(":", 1)[-1]
    spec = spec.replace(name=merged_spec_name(base_spec, method, digest),
                        description=f"{base_spec.name} fine-tuned ({method}), adapters merged")
    on_disk = spec.to_dict()
    on_disk["weights"] = "weights"  # relative: the folder can move
    (d / "spec.json").write_text(json.dumps(on_disk, indent=2))
    return spec


def save_artifacts(directory: str | os.PathLike, model: FinetuneModel, *, plan: TargetPlan,
                   cfg: FinetuneConfig, base_spec: Any, classes, history=None,
                   metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write adapter/, merged/, head/ and finetune.json (see the module docstring); returns the
    info dict written to finetune.json (with ``merged_spec`` as a dict)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    adapter_dir = d / "adapter"
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    adapter_kind = None
    if plan.uses_lora:
        model.features.save_pretrained(str(adapter_dir), safe_serialization=True)
        adapter_kind = "peft_lora"
    elif plan.strategy == "unfreeze_last_stages":
        from safetensors.torch import save_file

        adapter_dir.mkdir(parents=True)
        keys = [k for k in _features_keys(model)]
        sd = model.features.state_dict()
        save_file(_clone_state({k: sd[k] for k in keys}), str(adapter_dir / UNFROZEN_FILE))
        (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps(
            {"format": "tlpipe.unfrozen", "modules": list(plan.unfrozen), "keys": len(keys)}, indent=2))
        adapter_kind = "unfrozen_stages"
    merged = merged_features(model)
    merged_spec = save_merged_backbone(merged, base_spec, d / "merged", method=cfg.method)
    head = probe_from_linear(model.head.weight.detach().cpu().numpy(),
                             model.head.bias.detach().cpu().numpy(), classes,
                             info={"method": cfg.method, "strategy": plan.strategy})
    head.save(d / "head")
    total = sum(p.numel() for p in model.features.parameters())
    info = {
        "format": FORMAT, "version": FORMAT_VERSION, "method": cfg.method, "strategy": plan.strategy,
        "plan": plan.to_dict(), "config": cfg.to_dict(), "base_spec": base_spec.to_dict(),
        "merged_spec": merged_spec.to_dict(), "classes": [str(c) for c in classes],
        "adapter": adapter_kind, "trainable_params": count_trainable(model.features),
        "backbone_params": int(total), "head_params": int(model.head.weight.numel() + model.head.bias.numel()),
        "adapter_bytes": _dir_bytes(adapter_dir), "merged_bytes": _dir_bytes(d / "merged"),
        "history": list(history or []), "metrics": dict(metrics or {}),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    on_disk = dict(info)
    on_disk["merged_spec"] = dict(info["merged_spec"], weights="merged/weights")
    (d / INFO_FILE).write_text(json.dumps(on_disk, indent=2, default=float))
    return info


def _features_keys(model: FinetuneModel) -> list[str]:
    """Keys of the feature module's state that training changed (trainable params + their buffers)."""
    from .model import trainable_state_keys

    return [k[len("features."):] for k in trainable_state_keys(model) if k.startswith("features.")]


def read_finetune_info(directory: str | os.PathLike) -> dict[str, Any]:
    p = Path(directory) / INFO_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{directory} holds no fine-tune ({INFO_FILE} missing); write one with "
                                "pipeline.finetune.save_artifacts")
    info = json.loads(p.read_text())
    if info.get("format") != FORMAT or int(info.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{p}: format {info.get('format')} v{info.get('version')} is not {FORMAT} "
                         f"v<={FORMAT_VERSION}")
    return info


def read_merged_spec(directory: str | os.PathLike) -> Any:
    """The merged backbone's BackboneSpec, weights resolved to this folder's merged/weights."""
    from pipeline.backbones.spec import BackboneSpec

    d = Path(directory).resolve()
    mdir = d / "merged" if (d / "merged" / "spec.json").is_file() else d
    p = mdir / "spec.json"
    if not p.is_file():
        raise FileNotFoundError(f"no merged/spec.json under {directory}: not a fine-tune folder, or it "
                                "was saved without its merged model")
    data = json.loads(p.read_text())
    w = Path(data["weights"])
    data["weights"] = str(w if w.is_absolute() else mdir / w)
    return BackboneSpec.from_dict(data)


def load_finetuned(directory: str | os.PathLike, *, use: str = "merged", device: str = "cpu",
                   engine: str = "torch"):
    """(Backbone, head) of a saved fine-tune.

    use="merged": the merged weights through `load_backbone` (any engine). use="adapter": the
    base backbone's weights + the saved adapter (PEFT LoRA, unmerged, or the unfrozen stages) —
    the model the adapter alone reproduces; torch engine.
    """
    from pipeline.backbones import load_backbone
    from pipeline.backbones.spec import BackboneSpec
    from pipeline.backbones.torch_base import TorchBackbone
    from pipeline.heads import load_head

    d = Path(directory)
    info = read_finetune_info(d)
    head = load_head(d / "head")
    if use == "merged":
        return load_backbone(read_merged_spec(d), device=device, engine=engine), head
    if use != "adapter":
        raise ValueError(f"use must be 'merged' or 'adapter', got {use!r}")
    if info.get("adapter") is None:
        raise ValueError(f"{d} is a {info.get('method')} fine-tune without an adapter; load it with "
                         "use='merged'")
    base = BackboneSpec.from_dict(info["base_spec"])
    bb = load_backbone(base, engine="torch", device="cpu", dtype="float32")
    features = bb.torch_module()
    if info["adapter"] == "peft_lora":
        from peft import PeftModel

        features = PeftModel.from_pretrained(features, str(d / "adapter"), is_trainable=False)
    else:
        from safetensors.torch import load_file

        result = features.load_state_dict(load_file(str(d / "adapter" / UNFROZEN_FILE)), strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{d}/adapter does not fit {base.name}: unexpected {result.unexpected_keys[:5]}")
    backbone = TorchBackbone(base, features, device=device, dtype=None,
                             channels_last=bool(getattr(bb, "_channels_last", False)),
                             params_m=bb.params_m)
    return backbone, head

