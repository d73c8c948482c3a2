"""Fine-tuning a backbone + linear head: LoRA (PEFT) or full, linear-probe-then-fine-tune.

Pure torch / PEFT (no Ray, no MLflow): `jobs.finetune` runs it on Ray Train.

* `FinetuneConfig` — the recipe; `plan_targets` / `TargetPlan` — what trains per family;
* `build_model` — backbone + adapters + head from a fitted LinearProbe (`head_init_from_probe`);
* `ImageFileDataset`, `TrainTransform`, `BatchMixer` — data and augmentation;
* `Finetuner` — optimiser, schedule, epochs, early stopping; `fit_local` runs it in-process;
* `save_checkpoint` / `load_checkpoint` — resumable training state;
* `save_artifacts` / `load_finetuned` / `read_merged_spec` — adapter, merged model, head.
"""

from .artifacts import load_finetuned, read_finetune_info, read_merged_spec, save_artifacts
from .augment import BatchMixer, TrainTransform
from .checkpoint import load_checkpoint, save_checkpoint
from .config import FinetuneConfig
from .data import ImageFileDataset, eval_loader, steps_per_epoch, train_decode_spec, train_loader
from .model import (
    FinetuneModel,
    HeadInit,
    build_model,
    head_init_from_probe,
    merged_features,
    probe_from_linear,
)
from .targets import TargetPlan, find_stages, plan_targets
from .train import Finetuner, epoch_seed, fit_local, predict_logits

__all__ = [
    "BatchMixer",
    "FinetuneConfig",
    "FinetuneModel",
    "Finetuner",
    "HeadInit",
    "ImageFileDataset",
    "TargetPlan",
    "TrainTransform",
    "build_model",
    "epoch_seed",
    "eval_loader",
    "find_stages",
    "fit_local",
    "head_init_from_probe",
    "load_checkpoint",
    "load_finetuned",
    "merged_features",
    "plan_targets",
    "predict_logits",
    "probe_from_linear",
    "read_finetune_info",
    "read_merged_spec",
    "save_artifacts",
    "save_checkpoint",
    "steps_per_epoch",
    "train_decode_spec",
    "train_loader",
]
