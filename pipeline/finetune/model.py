"""The model a fine-tune trains: uint8 normalisation + the backbone's feature module (with PEFT
LoRA adapters, or some / all of it unfrozen) + a linear head initialised from the linear probe.

Linear-probe-then-fine-tune: the head starts as the fitted `pipeline.heads.LinearProbe`, with its
feature standardisation folded into the weights, so epoch 0 predicts exactly what the probe
predicted and the backbone starts adapting from a head that already works.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.backbones.torch_base import Uint8Normalize

from .config import FinetuneConfig
from .targets import TargetPlan, is_norm, plan_targets

__all__ = [
    "FinetuneModel",
    "HeadInit",
    "head_init_from_probe",
    "probe_from_linear",
    "build_model",
    "apply_plan",
    "merged_features",
    "trainable_state_keys",
    "count_trainable",
]


class HeadInit:
    """A linear head in raw-feature space: logits = features @ weight.T + bias; columns = classes."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, classes: Sequence[Any]):
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)  # (C, D)
        self.bias = np.ascontiguousarray(bias, dtype=np.float32)      # (C,)
        self.classes = [str(c) for c in classes]
        if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[0],) or \
                len(self.classes) != self.weight.shape[0]:
            raise ValueError(f"head weight {self.weight.shape}, bias {self.bias.shape} and "
                             f"{len(self.classes)} classes do not agree")

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, len(self.classes))
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(self.weight))
            lin.bias.copy_(torch.from_numpy(self.bias))
        return lin

    def to_dict(self) -> dict[str, Any]:  # for Ray configs (plain lists)
        return {"weight": self.weight.tolist(), "bias": self.bias.tolist(), "classes": self.classes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeadInit":
        return cls(np.asarray(d["weight"], np.float32), np.asarray(d["bias"], np.float32), d["classes"])


def head_init_from_probe(probe: Any) -> HeadInit:
    """Fold a fitted LinearProbe's standardisation into one linear layer on raw features.

    probe logits = ((x - mean) / std) @ coef + intercept = x @ (coef / std[:, None]) +
    (intercept - (mean / std) @ coef).
    """
    for attr in ("coef_", "intercept_", "scaler_", "classes_"):
        if not hasattr(probe, attr):
            raise ValueError(f"the head to start from must be a fitted pipeline.heads.LinearProbe "
                             f"(missing {attr}); got {type(probe).__name__}")
    coef = np.asarray(probe.coef_, dtype=np.float64)           # (D, C), standardised space
    mean = np.asarray(probe.scaler_.mean, dtype=np.float64)
    std = np.asarray(probe.scaler_.std, dtype=np.float64)
    w = coef / std[:, None]
    b = np.asarray(probe.intercept_, dtype=np.float64) - (mean / std) @ coef
    return HeadInit(w.T, b, list(probe.classes_))


def probe_from_linear(weight: np.ndarray, bias: np.ndarray, classes: Sequence[Any], *,
                      info: dict[str, Any] | None = None):
    """A fitted `LinearProbe` (identity standardisation) computing features @ weight.T + bias —
    what the fine-tuned model's head is saved as, so `Predictor` serves it unchanged."""
    from pipeline.heads import LinearProbe
    from pipeline.heads.base import Standardizer

    weight = np.asarray(weight, dtype=np.float32)
    d = weight.shape[1]
    head = LinearProbe(standardize=False)
    head.classes_ = np.asarray([str(c) for c in classes], dtype=str)
    if list(head.classes_) != sorted(head.classes_):
        raise ValueError(f"classes must be sorted like a fitted head's classes_, got {list(classes)}")
    head.n_features_in_ = int(d)
    head.scaler_ = Standardizer(np.zeros(d, np.float32), np.ones(d, np.float32))
    head.coef_ = np.ascontiguousarray(weight.T, dtype=np.float32)
    head.intercept_ = np.ascontiguousarray(bias, dtype=np.float32)
    head.sweep_results_ = []
    head.best_params_ = {"fine_tuned": True, **(info or {})}
    return head


class FinetuneModel(nn.Module):
    """uint8 pixels -> normalise -> feature module -> linear head.

    ``forward`` takes *normalised* float images (augmentations such as MixUp work on those);
    ``normalize`` maps uint8 (N, 3, S, S) to them. Norm layers listed in ``frozen_norms`` stay
    in eval mode when the model trains (their statistics are part of the frozen backbone).
    """

    def __init__(self, features: nn.Module, head: nn.Linear, *, mean, std,
                 channels_last: bool = False, frozen_norms: Sequence[str] = ()):
        super().__init__()
        self.normalize = Uint8Normalize(mean, std)
        self.features = features
        self.head = head
        self.channels_last = bool(channels_last)
        self.frozen_norms = tuple(frozen_norms)

    def train(self, mode: bool = True) -> "FinetuneModel":
        super().train(mode)
        if mode and self.frozen_norms:
            named = dict(self.features.named_modules())
            for n in self.frozen_norms:
                named[n].eval()
        return self

    def prepare_input(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.normalize(pixels)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def apply_plan(features: nn.Module, plan: TargetPlan, cfg: FinetuneConfig) -> tuple[nn.Module, list[str]]:
    """Freeze / unfreeze / add adapters per `plan`; returns (module to train, frozen norm names).

    The names of frozen norm layers are relative to the returned module (PEFT wraps it).
    """
    for p in features.parameters():
        p.requires_grad_(False)
    if plan.uses_lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(int(cfg.seed))  # adapter init, identical on every worker
        lcfg = LoraConfig(r=int(cfg.lora_r), lora_alpha=float(cfg.lora_alpha),
                          lora_dropout=float(cfg.lora_dropout), bias="none",
                          target_modules=list(plan.lora_modules))
        features = get_peft_model(features, lcfg)
    else:
        for name, m in features.named_modules():
            if any(name == u or name.startswith(u + ".") or u == "" for u in plan.unfrozen):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(True)
    frozen_norms = []
    if cfg.norm_frozen:
        for name, m in features.named_modules():
            if is_norm(m):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)
                frozen_norms.append(name)
    return features, frozen_norms


def _drop_unused(model: FinetuneModel, input_size: int) -> list[str]:
    """Freeze trainable parameters the forward pass never touches (an unused ImageNet classifier
    inside the feature module...): DDP refuses parameters that get no gradient."""
    was_training = model.training
    model.eval()
    x = torch.zeros(2, 3, input_size, input_size)
    if model.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    model.zero_grad(set_to_none=True)
    model(x).float().sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in model.named_parameters():
        if n in unused:
            p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return unused


def build_model(spec: Any, head_init: HeadInit, cfg: FinetuneConfig, *,
                device: str = "cpu") -> tuple[FinetuneModel, TargetPlan, Any]:
    """Load the backbone (torch engine, float32, CPU first), plan and apply the targets, attach the
    head. Returns (model on `device`, plan, the spec trained at: input_size / embed_dim filled)."""
    from pipeline.backbones import get_spec, load_backbone

    spec = get_spec(spec)
    if cfg.input_size:
        spec = spec.replace(input_size=int(cfg.input_size))
    backbone = load_backbone(spec, engine="torch", device="cpu", dtype="float32")
    if backbone.embed_dim != head_init.in_features:
        raise ValueError(
            f"the linear probe was fitted on {head_init.in_features}-d features but {spec.name} gives "
            f"{backbone.embed_dim}-d ones: fit the probe on this backbone's embeddings")
    features = backbone.torch_module()
    plan = plan_targets(features, cfg)
    features, frozen_norms = apply_plan(features, plan, cfg)
    channels_last = bool(getattr(backbone, "_channels_last", False))
    model = FinetuneModel(features, head_init.to_linear(), mean=spec.mean, std=spec.std,
                          channels_last=channels_last, frozen_norms=frozen_norms)
    unused = _drop_unused(model, spec.input_size)
    if unused:
        plan = TargetPlan(plan.strategy, plan.lora_modules, plan.unfrozen,
                          plan.note + f"; {len(unused)} parameters unused by the forward pass stay frozen")
    if count_trainable(model.features) == 0:
        raise ValueError(f"nothing in {spec.name}'s backbone would train under plan {plan.strategy!r} "
                         f"({plan.note}); pass target_modules or method='full'")
    return model.to(device), plan, backbone.spec


def merged_features(model: FinetuneModel) -> nn.Module:
    """The feature module with adapters merged in (a copy; the training model is untouched)."""
    features = copy.deepcopy(model.features).cpu().eval()
    if hasattr(features, "merge_and_unload"):
        features = features.merge_and_unload()
    for p in features.parameters():
        p.requires_grad_(False)
    return features


def trainable_state_keys(model: nn.Module) -> list[str]:
    """state_dict keys that change when training: trainable parameters plus the buffers
    (BatchNorm statistics) of modules that hold trainable parameters."""
    keys = []
    for mod_name, m in model.named_modules():
        own = list(m.named_parameters(recurse=False))
        if not any(p.requires_grad for _, p in own):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        keys += [prefix + n for n, p in own if p.requires_grad]
        skip = getattr(m, "_non_persistent_buffers_set", set())
        keys += [prefix + n for n, b in m.named_buffers(recurse=False) if b is not None and n not in skip]
    return keys


def count_trainable(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad))
