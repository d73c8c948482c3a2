"""The four source adapters (see ``adapters.py``). Importing this module registers them.

Each ``load`` imports its library adapter module (torch, timm, transformers, open_clip) only
when called, so the catalogue and the fingerprints never import torch.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .adapters import SourceAdapter, register_source
from .hashing import local_path
from .hub_cache import HubFiles, strip_hub_prefix

if TYPE_CHECKING:  # pragma: no cover
    from .base import Backbone
    from .spec import BackboneSpec

__all__ = ["OpenClipSource", "PackageSource", "TimmSource", "TransformersSource"]

TRANSFORMERS_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@register_source
class TransformersSource(SourceAdapter):
    name = "transformers"

    def hub_files(self, spec: "BackboneSpec") -> HubFiles:
        return HubFiles(strip_hub_prefix(spec.weights), spec.revision, ("config.json",), TRANSFORMERS_WEIGHTS)

    def save_hint(self, spec: "BackboneSpec") -> str:
        return "AutoModel.from_pretrained(REPO).save_pretrained(DIR)"

    def local_problem(self, spec: "BackboneSpec") -> str:
        p = local_path(spec.weights)
        if not p.exists():
            return super().local_problem(spec)
        if p.is_file():
            return f"{p} is a file; transformers needs the folder written by `save_pretrained(DIR)`"
        if not (p / "config.json").is_file():
            return f"{p} has no config.json: write it with `{self.save_hint(spec)}`"
        if not any((p / f).is_file() for f in TRANSFORMERS_WEIGHTS):
            return f"{p} has a config.json but no model.safetensors / pytorch_model.bin: write it with `{self.save_hint(spec)}`"
        return ""

    def load(self, spec: "BackboneSpec", *, device: str = "cpu", dtype: str | None = None,
             allow_download: bool = False) -> "Backbone":
        from .hf_transformers import load  # torch + transformers

        return load(spec, device=device, dtype=dtype, allow_download=allow_download)


@register_source
class TimmSource(SourceAdapter):
    name = "timm"

    def hub_files(self, spec: "BackboneSpec") -> HubFiles:
        return HubFiles(strip_hub_prefix(spec.weights), spec.revision, (), TIMM_WEIGHTS)

    def save_hint(self, spec: "BackboneSpec") -> str:
        return "timm.models.save_for_hf(model, DIR, safe_serialization=True)"

    def load(self, spec: "BackboneSpec", *, device: str = "cpu", dtype: str | None = None,
             allow_download: bool = False) -> "Backbone":
        from .timm_models import load  # torch + timm

        return load(spec, device=device, dtype=dtype, allow_download=allow_download)


@register_source
class OpenClipSource(SourceAdapter):
    name = "open_clip"

    def hub_files(self, spec: "BackboneSpec") -> HubFiles:
        w = spec.weights
        if w.startswith("hf-hub:") or "/" in w:
            return HubFiles(strip_hub_prefix(w), spec.revision, ("open_clip_config.json",), OPEN_CLIP_WEIGHTS)
        # a pretrained tag of open_clip's own registry: resolve it to its hub file (imports open_clip)
        import open_clip

        cfg = open_clip.get_pretrained_cfg(spec.arch, w)
        hub = (cfg or {}).get("hf_hub", "")
        if not hub:
            raise ValueError(
                f"open_clip has no hub location for model {spec.arch!r} tag {w!r}"
                + (f"; known tags: {open_clip.list_pretrained_tags_by_model(spec.arch)}" if cfg == {} else "")
                + ". Put a local checkpoint file/dir in the spec's weights instead."
            )
        repo, filename = os.path.split(hub)  # 'org/name/' -> default file, 'org/name/file.pt' -> that file
        if filename:
            files = (filename[:-4] + ".safetensors", filename) if filename.endswith((".bin", ".pth")) else (filename,)
        else:
            files = OPEN_CLIP_WEIGHTS
        return HubFiles(repo, spec.revision, (), files)

    def identity_suffix(self, spec: "BackboneSpec") -> str:
        return "" if "/" in spec.weights else f"#{spec.weights}"

    def save_hint(self, spec: "BackboneSpec") -> str:
        return "a folder with open_clip_config.json + open_clip_model.safetensors (`hf download REPO --local-dir DIR`)"

    def load(self, spec: "BackboneSpec", *, device: str = "cpu", dtype: str | None = None,
             allow_download: bool = False) -> "Backbone":
        from .openclip import load  # torch + open_clip

        return load(spec, device=device, dtype=dtype, allow_download=allow_download)


@register_source
class PackageSource(SourceAdapter):
    name = "package"

    def load(self, spec: "BackboneSpec", *, device: str = "cpu", dtype: str | None = None,
             allow_download: bool = False) -> "Backbone":
        from .efficientnet_lite import load  # torch + timm

        return load(spec, device=device, dtype=dtype, allow_download=allow_download)
