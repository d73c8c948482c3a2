"""open_clip adapter: CLIP-family image towers (OpenCLIP ViT, EVA02-CLIP, ...) + text tower.

``spec.arch`` is the open_clip model config name (``ViT-B-32``, ``EVA02-B-16``); ``spec.weights`` is

- ``hf-hub:org/repo`` (or ``org/repo``): resolved in the local HF cache only, loaded as
  ``local-dir:<snapshot>`` (open_clip_config.json + open_clip_model.safetensors);
- a local folder in open_clip's hub format (``open_clip_config.json`` + checkpoint), or a folder /
  file holding just a checkpoint for ``spec.arch``;
- an open_clip pretrained tag (``laion2b_s34b_b79k``), resolved through open_clip's pretrained
  registry to its hub file, again from the local cache only.

Loading always passes ``require_pretrained=True``: open_clip would otherwise warn and return a
randomly initialised model. ``embed`` = ``model.visual(x)`` = ``encode_image`` without L2
normalisation; ``text_embed`` = ``encode_text`` (also unnormalised).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .adapters import LOCAL_FOLDER_HINT
from .base import WeightsUnavailableError, find_checkpoint
from .hashing import is_local_path, local_path
from .spec import BackboneSpec
from .torch_base import TorchBackbone, count_params_m

__all__ = ["load", "resolve_pretrained", "OpenClipImageFeatures"]

_log = logging.getLogger(__name__)
_CKPT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


class OpenClipImageFeatures(nn.Module):
    """Normalised float (N, 3, S, S) -> image embeddings (N, D) (the image tower only)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.visual(x)
        if isinstance(out, (tuple, list)):  # towers that also return tokens
            out = out[0]
        return out


_CKPT_NAMES = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin",
)


def _find_ckpt(folder: Path) -> Path | None:
    return find_checkpoint(folder, _CKPT_NAMES, _CKPT_SUFFIXES)


def resolve_pretrained(spec: BackboneSpec, allow_download: bool) -> tuple[str, str | None, dict[str, Any]]:
    """(model_name for create_model, pretrained file or None, extra create_model kwargs)."""
    w = spec.weights
    if is_local_path(w):
        p = local_path(w)
        if p.is_dir():
            ckpt = _find_ckpt(p)
            if ckpt is None:
                raise WeightsUnavailableError(
                    spec.name, f"no open_clip checkpoint (*.safetensors / *.bin / *.pt) in {p}: save one with "
                               f"`torch.save(model.state_dict(), DIR/'open_clip_pytorch_model.bin')` or "
                               f"`open_clip.push_to_hf_hub`-style folder, then {LOCAL_FOLDER_HINT}",
                )
            if (p / "open_clip_config.json").is_file():
                return f"local-dir:{p}", None, {}
            return spec.arch, str(ckpt), {}
        if p.is_file():
            return spec.arch, str(p), {}
        raise WeightsUnavailableError(
            spec.name, f"weights path {p} does not exist on this machine: copy the open_clip folder there, "
                       f"or {LOCAL_FOLDER_HINT} for the folder where it is"
        )

    from .adapters import hub_files_for, not_cached_error
    from .hub_cache import resolve_cached, snapshot_dir

    files = hub_files_for(spec)
    found, missing = resolve_cached(files)
    tag_cfg: dict[str, Any] = {}
    is_tag = not (w.startswith("hf-hub:") or "/" in w)
    if is_tag:
        import open_clip

        tag_cfg = open_clip.get_pretrained_cfg(spec.arch, w) or {}
    extra = {"force_quick_gelu": True} if tag_cfg.get("quick_gelu") else {}
    if missing:
        if not allow_download:
            raise not_cached_error(spec, files, missing)
        if is_tag:
            return spec.arch, w, extra  # open_clip downloads the tag itself
        return f"hf-hub:{files.repo_id}", None, {}
    if is_tag:
        return spec.arch, next(p for n, p in found.items() if n in files.any_of), extra
    folder = snapshot_dir(found)
    return f"local-dir:{folder}", None, {}


def _check_preprocess(spec: BackboneSpec, model: nn.Module) -> None:
    cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {}
    size = cfg.get("size")
    size = size[0] if isinstance(size, (tuple, list)) else size
    if size and int(size) != spec.input_size:
        _log.warning("%s: open_clip model expects %s px but spec.input_size is %s", spec.name, size, spec.input_size)
    for key in ("mean", "std"):
        if key in cfg and tuple(round(float(v), 6) for v in cfg[key]) != tuple(round(v, 6) for v in getattr(spec, key)):
            _log.warning("%s: open_clip preprocess %s %s differs from the spec's %s (the spec's is used)",
                         spec.name, key, cfg[key], getattr(spec, key))




def load(spec: BackboneSpec, *, device: str = "cpu", dtype: str | None = None, allow_download: bool = False) -> TorchBackbone:
    import open_clip

    model_name, pretrained, extra = resolve_pretrained(spec, allow_download)
    kwargs = {**extra, **spec.kwargs}
    try:
        model = open_clip.create_model(
            model_name, pretrained=pretrained, precision="fp32", device="cpu", require_pretrained=True, **kwargs
        )
    except FileNotFoundError as e:
        raise WeightsUnavailableError(spec.name, f"{spec.name}: open_clip could not find its files ({e})") from e
    model.eval()
    _check_preprocess(spec, model)
    features = OpenClipImageFeatures(model.visual)
    text: Callable[[list[str]], torch.Tensor] | None = None
    if spec.text and hasattr(model, "encode_text"):
        text = _text_encoder(spec, model, model_name, str(device))
    return TorchBackbone(
        spec,
        features,
        device=device,
        dtype=dtype,
        text_encoder=text,
        params_m=count_params_m(model.visual),
    )


def _text_encoder(spec: BackboneSpec, model: nn.Module, model_name: str, device: str) -> Callable[[list[str]], torch.Tensor]:
    state: dict[str, Any] = {}

    def encode(prompts: list[str]) -> torch.Tensor:
        if not state:
            import open_clip

            try:
                state["tok"] = open_clip.get_tokenizer(model_name)
            except Exception as e:  # HF tokenizers need their files locally
                raise WeightsUnavailableError(
                    spec.name, f"{spec.name}: open_clip tokenizer for {model_name!r} is not available offline ({e}); "
                               f"put the tokenizer files in the model folder, then {LOCAL_FOLDER_HINT}",
                ) from e
            model.to(device)
        tokens = state["tok"](prompts).to(device)
        return model.encode_text(tokens)

    return encode
