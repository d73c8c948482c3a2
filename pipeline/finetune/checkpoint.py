"""Training checkpoints of a `Finetuner` as a folder: `state.safetensors` (trainable weights,
best weights, optimiser moments) + `state.json` (epoch, step, history, early stopping, the
optimiser's param groups). No pickle. Resuming restores everything the next epoch depends on."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .train import Finetuner

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_meta", "STATE_FILE", "META_FILE"]

STATE_FILE = "state.safetensors"
META_FILE = "state.json"
FORMAT = "tlpipe.finetune.checkpoint"


def save_checkpoint(directory: str | os.PathLike, ft: Finetuner, *, extra: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for k, t in ft.trainable_state().items():
        tensors[f"model/{k}"] = t.detach().to("cpu", copy=True).contiguous()
    for k, t in (ft.best_state or {}).items():
        tensors[f"best/{k}"] = t.detach().to("cpu", copy=True).contiguous()
    opt = ft.optimizer.state_dict()
    scalar_keys = []
    for idx, st in opt["state"].items():
        for name, v in st.items():
            t = (v if torch.is_tensor(v) else torch.tensor(v)).detach().to("cpu", copy=True)
            key = f"optim/{idx}/{name}"
            if t.ndim == 0:  # AdamW's step counter
                scalar_keys.append(key)
                t = t.reshape(1)
            tensors[key] = t.contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
    meta = {
        "format": FORMAT, "epoch": ft.epoch, "global_step": ft.global_step, "history": ft.history,
        "best_score": ft.best_score, "best_loss": ft.best_loss, "best_epoch": ft.best_epoch,
        "bad_epochs": ft.bad_epochs, "stopped_early": ft.stopped_early, "attempts": ft.attempts,
        "param_groups": groups, "scalar_optim_keys": scalar_keys, "has_best": ft.best_state is not None,
        "extra": extra or {},
    }
    save_file(tensors, str(d / STATE_FILE))
    tmp = d / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, default=float))
    os.replace(tmp, d / META_FILE)
    return d


def read_checkpoint_meta(directory: str | os.PathLike) -> dict[str, Any]:
    p = Path(directory) / META_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{directory} is not a fine-tune checkpoint (no {META_FILE})")
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{p}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta


def load_checkpoint(directory: str | os.PathLike, ft: Finetuner) -> dict[str, Any]:
    """Restore `ft` from a folder written by `save_checkpoint`; returns its meta."""
    from safetensors.torch import load_file

    meta = read_checkpoint_meta(directory)
    tensors = load_file(str(Path(directory) / STATE_FILE))
    ft.load_trainable_state({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    best = {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")}
    ft.best_state = best if meta.get("has_best") else None
    scalars = set(meta.get("scalar_optim_keys", []))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, idx, name = k.split("/", 2)
            state.setdefault(int(idx), {})[name] = v.reshape(()) if k in scalars else v
    current = ft.optimizer.state_dict()
    if len(current["param_groups"]) != len(meta["param_groups"]):
        raise ValueError("checkpoint optimiser groups do not match this model; it was written for another plan")
    groups = []
    for g_now, g_saved in zip(current["param_groups"], meta["param_groups"]):
        g = dict(g_saved)
        g["params"] = g_now["params"]
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    ft.optimizer.load_state_dict({"state": state, "param_groups": groups})
    ft.epoch, ft.global_step = int(meta["epoch"]), int(meta["global_step"])
    ft.history = list(meta["history"])
    ft.best_score, ft.best_loss, ft.best_epoch = meta["best_score"], meta["best_loss"], int(meta["best_epoch"])
    ft.bad_epochs, ft.stopped_early = int(meta["bad_epochs"]), bool(meta["stopped_early"])
    ft.attempts = list(meta.get("attempts", []))
    ft._set_lr()
    return meta
