"""Which modules a fine-tune trains, per family: the `TargetPlan`.

* ViT family (any model with attention projections): LoRA on the ``nn.Linear`` query / key /
  value projections (timm ``qkv``, transformers ``query``/``key``/``value`` or
  ``q_proj``/``k_proj``/``v_proj``), or on ``nn.MultiheadAttention`` blocks (open_clip towers).
* CNNs: PEFT's LoRA on ``nn.Conv2d`` supports ungrouped convolutions (grouped / depthwise ones
  cannot be merged), so the 1x1 and dense convolutions — and any ``nn.Linear`` (ConvNeXt MLPs) —
  of the last ``cnn_last_stages`` stages plus the layers after them (EfficientNet's
  ``conv_head``) get adapters. When none qualifies, or ``cnn_lora=False``, those stages are
  unfrozen instead: strategy ``unfreeze_last_stages``, recorded in the result.
* ``method="full"``: everything trains.

Stages are found by name: the shallowest family of siblings named ``blocks.N`` / ``stages.N`` /
``layers.N`` / ``stage.N`` / ``layerN`` (timm EfficientNet / MobileNet / ConvNeXt / ResNet,
transformers ResNet / ConvNeXt).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from .config import FinetuneConfig

__all__ = ["TargetPlan", "plan_targets", "find_stages", "ATTENTION_PROJECTIONS", "STRATEGIES"]

ATTENTION_PROJECTIONS = ("qkv", "q_proj", "k_proj", "v_proj", "query", "key", "value")
STRATEGIES = ("lora_attention", "lora_conv", "unfreeze_last_stages", "full", "lora_explicit")

_STAGE_RES = (
    re.compile(r"^(?P<prefix>(?:.*\.)?(?:blocks|stages|layers|stage))\.(?P<idx>\d+)$"),
    re.compile(r"^(?P<prefix>(?:.*\.)?layer)(?P<idx>\d+)$"),
)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class TargetPlan:
    """What trains besides the head.

    strategy: one of STRATEGIES. lora_modules: full module names given to PEFT's
    ``LoraConfig(target_modules=...)``. unfrozen: module-name prefixes trained in full (the
    fallback, or "" = the whole backbone for method "full"). note: a sentence for the record.
    """

    strategy: str
    lora_modules: tuple[str, ...] = ()
    unfrozen: tuple[str, ...] = ()
    note: str = ""

    @property
    def uses_lora(self) -> bool:
        return bool(self.lora_modules)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora_modules"], d["unfrozen"] = list(self.lora_modules), list(self.unfrozen)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TargetPlan":
        return cls(strategy=d["strategy"], lora_modules=tuple(d.get("lora_modules") or ()),
                   unfrozen=tuple(d.get("unfrozen") or ()), note=d.get("note", ""))


def _is_mha(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention) and getattr(m, "_qkv_same_embed_dim", True)


def find_stages(module: nn.Module) -> list[str]:
    """Names of the backbone's stages in order (empty when none is recognised)."""
    groups: dict[str, dict[int, str]] = {}
    for name, _ in module.named_modules():
        for rx in _STAGE_RES:
            m = rx.match(name)
            if m:
                groups.setdefault(m.group("prefix"), {})[int(m.group("idx"))] = name
                break
    groups = {p: g for p, g in groups.items() if len(g) >= 2}
    if not groups:
        return []
    prefix = min(groups, key=lambda p: (p.count("."), -len(groups[p]), p))
    return [groups[prefix][i] for i in sorted(groups[prefix])]


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _tail_modules(module: nn.Module, stages: list[str]) -> list[str]:
    """Siblings registered after the stages that hold convolutions or norms (EfficientNet's
    conv_head + bn2; not pooling, not the classifier)."""
    head, _, tail = stages[-1].rpartition(".")
    if tail.isdigit():  # "<...>.blocks.6": the container holds the Sequential "blocks"
        holder, _, child = head.rpartition(".")
    else:               # "<...>.layer4": the container holds "layer4" itself
        holder, child = head, tail
    container = module.get_submodule(holder) if holder else module
    names = [n for n, _ in container.named_children()]
    if child not in names:
        return []
    out = []
    for n in names[names.index(child) + 1:]:
        sub = getattr(container, n)
        if is_norm(sub) or any(isinstance(m, nn.Conv2d) for m in sub.modules()):
            out.append(f"{holder}.{n}" if holder else n)
    return out


def plan_targets(module: nn.Module, cfg: FinetuneConfig) -> TargetPlan:
    """The TargetPlan for this feature module under `cfg` (see the module docstring)."""
    if cfg.method == "full":
        return TargetPlan("full", unfrozen=("",), note="full fine-tuning: every parameter trains")
    named = dict(module.named_modules())
    if cfg.target_modules:
        found = [n for n in named if any(n == t or n.endswith("." + t) for t in cfg.target_modules)]
        if not found:
            raise ValueError(f"none of target_modules {list(cfg.target_modules)} names a module of this "
                             f"backbone; e.g. {[n for n in list(named)[1:12]]}")
        return TargetPlan("lora_explicit", lora_modules=tuple(found),
                          note=f"LoRA on {len(found)} modules named by target_modules")
    attn = [n for n, m in named.items()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in ATTENTION_PROJECTIONS]
    if not attn:
        attn = [n for n, m in named.items() if _is_mha(m)]
    if attn:
        return TargetPlan("lora_attention", lora_modules=tuple(attn),
                          note=f"LoRA on {len(attn)} attention projections")
    stages = find_stages(module)
    if not stages:
        raise ValueError(
            "cannot place LoRA on this backbone: it has no attention projections and no recognisable "
            "stages (blocks.N / stages.N / layerN); pass FinetuneConfig(target_modules=[...]) naming "
            "the modules to adapt, or method='full'")
    k = min(int(cfg.cnn_last_stages), len(stages))
    region = tuple(stages[-k:]) + tuple(_tail_modules(module, stages))
    convs = []
    if cfg.cnn_lora:
        for n, m in named.items():
            if not _within(n, region):
                continue
            if (isinstance(m, nn.Conv2d) and m.groups == 1) or isinstance(m, nn.Linear):
                convs.append(n)
    if convs:
        return TargetPlan("lora_conv", lora_modules=tuple(convs),
                          note=f"LoRA on {len(convs)} ungrouped conv / linear layers of the last {k} "
                               f"stage(s) {list(stages[-k:])} and the layers after them")
    why = "cnn_lora=False" if not cfg.cnn_lora else "no ungrouped conv / linear layer there takes LoRA"
    return TargetPlan("unfreeze_last_stages", unfrozen=region,
                      note=f"last {k} stage(s) {list(region)} unfrozen instead of LoRA ({why})")


def is_norm(m: nn.Module) -> bool:
    return isinstance(m, _NORMS) or type(m).__name__.lower().endswith(("norm", "norm2d", "batchnormact2d"))
