"""Fine-tuning on Ray Train: LoRA (PEFT) or full fine-tuning of a backbone + the head of its best
linear probe, resumable, tracked, and ranked on the sweep's leaderboard like any probe.

`finetune()` runs a `TorchTrainer` (`ScalingConfig(num_workers, use_gpu)`; DDP over gloo on CPU,
NCCL on GPUs, bf16 autocast on GPUs). Every epoch each worker trains on its shard, validation is
sharded and all-reduced, and rank 0 reports the metrics with a checkpoint (trainable weights,
optimiser, schedule, early stopping, history: `pipeline.finetune.checkpoint`) to
``<root>/ray_results``; Ray keeps the last two. A worker that dies makes Ray Train restart the
group (`FailureConfig(max_failures)`), and the restarted loop resumes from
`ray.train.get_checkpoint()`. After the last epoch (or early stop) rank 0 restores the best
epoch's weights and writes the artifacts (adapter, merged model, head — see
`pipeline.finetune.artifacts`) into a final checkpoint, which the driver copies to `out_dir`.

`finetune_candidate()` is the sweep's side (`tlpipe run DATA --heads linear,knn,lora`): it
fine-tunes, re-extracts the dataset with the merged backbone into the feature store (its
fingerprint follows the merged weights), evaluates the saved head on the same test split with the
same `pipeline.evaluate`, and measures the fine-tuned backbone's own latency — so the result is a
row of the same leaderboard, and `jobs.run.build_predictor` serves it unchanged.

The training data are image files: on a cluster their paths (and `root`) must be on storage every
node sees.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

logger = logging.getLogger(__name__)

#: sweep head labels that schedule a fine-tune instead of a head on cached features
#: keys of a fine-tune head's params that configure the job rather than `FinetuneConfig`
JOB_PARAMS = ("num_workers", "use_gpu", "cpus_per_worker", "max_failures", "data_workers")
CURVE_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_balanced_accuracy",
              "lr", "images_per_s", "epoch_seconds")


@dataclass
class FinetuneJobResult:
    """What one fine-tune produced (plain data)."""

    artifacts_dir: str
    merged_spec: Any                      # BackboneSpec of the merged model (weights resolved)
    info: dict[str, Any]                  # finetune.json
    history: list[dict[str, Any]]         # one row per epoch trained
    attempts: list[dict[str, Any]]        # {attempt, start_epoch, world_size} per (re)start
    best_epoch: int
    train_seconds: float
    ray_path: str = ""
    num_workers: int = 1
    use_gpu: bool = False

    @property
    def resumed(self) -> bool:
        return any(a.get("start_epoch", 0) > 0 for a in self.attempts[1:])

    @property
    def strategy(self) -> str:
        return str(self.info.get("strategy"))


# ----------------------------------------------------------------------------- the worker loop

def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: build, (resume,) train with checkpoints each epoch, save artifacts."""
    import ray.train
    import ray.train.torch
    import torch

    from pipeline.backbones.spec import BackboneSpec
    from pipeline.finetune import (FinetuneConfig, Finetuner, HeadInit, ImageFileDataset,
                                   TrainTransform, build_model, epoch_seed, eval_loader,
                                   load_checkpoint, save_artifacts, save_checkpoint,
                                   steps_per_epoch, train_decode_spec, train_loader)

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    dev = str(device) if device.type == "cuda" else "cpu"
    cfg = FinetuneConfig.from_dict(config["config"])
    if cfg.num_threads or config.get("cpus_per_worker"):
        torch.set_num_threads(int(cfg.num_threads or config["cpus_per_worker"]))
    spec = BackboneSpec.from_dict(config["spec"])
    head_init = HeadInit.from_dict(config["head"])
    torch.manual_seed(cfg.seed)
    model, plan, tspec = build_model(spec, head_init, cfg, device=dev)
    train_module = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model

    tr_paths, tr_labels = config["train"]
    va_paths, va_labels = config["val"]
    train_set = ImageFileDataset(tr_paths, tr_labels, train_decode_spec(tspec),
                                 transform=TrainTransform(tspec.input_size, scale=cfg.scale,
                                                          ratio=cfg.ratio, hflip=cfg.hflip,
                                                          interpolation=tspec.interpolation))
    val_set = ImageFileDataset(va_paths, va_labels, tspec)
    nw = int(config.get("data_workers") or 0)
    pin = dev != "cpu"
    ft = Finetuner(model, cfg, steps_per_epoch=steps_per_epoch(len(train_set), cfg.batch_size, world),
                   device=dev, train_module=train_module)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            load_checkpoint(d, ft)
    ft.attempts.append({"attempt": len(ft.attempts), "start_epoch": ft.epoch, "world_size": world})
    start_epoch = ft.epoch
    fault = config.get("fault") or {}
    val = eval_loader(val_set, batch_size=cfg.batch_size * 2, rank=rank, world_size=world,
                      num_workers=nw, pin_memory=pin) if len(val_set) else None

    while not ft.done:
        torch.manual_seed(epoch_seed(cfg.seed, ft.epoch, rank))
        loader = train_loader(train_set, batch_size=cfg.batch_size, epoch=ft.epoch, seed=cfg.seed,
                              rank=rank, world_size=world, num_workers=nw, pin_memory=pin)
        tm = ft.train_epoch(loader)
        row = ft.end_epoch(tm, ft.evaluate(val) if val is not None else {})
        metrics = {**row, "start_epoch": start_epoch, "attempt": ft.attempts[-1]["attempt"],
                   "final": False, "world_size": world}
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="tlpipe-ft-ckpt-") as tmp:
                save_checkpoint(tmp, ft)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        _maybe_fail(fault, row["epoch"], rank)

    ft.restore_best()
    final = {"final": True, "best_epoch": ft.best_epoch, "epochs_trained": len(ft.history),
             "start_epoch": start_epoch, "attempt": ft.attempts[-1]["attempt"], "world_size": world,
             "stopped_early": ft.stopped_early}
    if rank == 0:
        with tempfile.TemporaryDirectory(prefix="tlpipe-ft-final-") as tmp:
            save_checkpoint(tmp, ft)
            last = ft.history[-1] if ft.history else {}
            best = next((h for h in ft.history if h["epoch"] == ft.best_epoch), last)
            save_artifacts(Path(tmp) / "artifacts", model, plan=plan, cfg=cfg, base_spec=tspec,
                           classes=head_init.classes, history=ft.history,
                           metrics={**{k: v for k, v in best.items() if k.startswith("val_")},
                                    "best_epoch": ft.best_epoch, "stopped_early": ft.stopped_early,
                                    "attempts": ft.attempts, "world_size": world,
                                    "device": dev, "dtype": ft.dtype})
            ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(final)


def _maybe_fail(fault: Mapping[str, Any], epoch: int, rank: int) -> None:
    """Fault injection for the resume test: kill this worker once, after epoch N's checkpoint."""
    if not fault or int(fault.get("after_epoch", -1)) != epoch or int(fault.get("rank", 0)) != rank:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    import ray.train

    # a checkpoint counts once the controller has registered it: wait for that, then die
    ray.train.get_all_reported_checkpoints(timeout_s=120)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"killed after epoch {epoch} at {time.time()}\n")
    os._exit(1)


# ----------------------------------------------------------------------------- the driver side

def _probe_of(probe: Any):
    if isinstance(probe, (str, os.PathLike)):
        from pipeline.heads import load_head

        probe = load_head(probe)
    return probe


def _label_codes(records: Sequence[Any], classes: Sequence[str]) -> tuple[list[str], list[int]]:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({r.label for r in records if r.label not in index})
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not among the probe's classes {list(classes)[:10]}: fit "
                         "the linear probe on the same dataset first")
    return [r.path for r in records], [index[r.label] for r in records]


def finetune(dataset: Any, spec: Any, probe: Any, *, root: str | os.PathLike,
             config: Any = None, out_dir: str | os.PathLike | None = None,
             num_workers: int | None = None, use_gpu: bool | None = None,
             cpus_per_worker: int | None = None, max_failures: int = 1,
             data_workers: int | None = None, run_name: str | None = None,
             fault: Mapping[str, Any] | None = None, train_records: Sequence[Any] | None = None,
             val_records: Sequence[Any] | None = None) -> FinetuneJobResult:
    """Fine-tune `spec` on `dataset`'s train split (early stopping on val) with Ray Train.

    probe: the fitted `LinearProbe` (or its saved dir) the head starts from; its classes define the
    label order. config: a `FinetuneConfig` (or dict). num_workers: Ray Train workers (default:
    the GPUs, else 1); use_gpu: default = the cluster has a GPU. max_failures: worker-group
    restarts (each resumes from the last checkpoint). data_workers: DataLoader processes per
    worker (default: none on CPU, up to 4 decoding processes per GPU worker).
    fault: {"after_epoch", "marker"[, "rank"]} kills a worker once after that epoch (tests).
    run_name names the Ray Train run under ``<root>/ray_results``: reusing the name of an
    interrupted run resumes it. Artifacts land in `out_dir` (default
    ``<root>/finetunes/<run name>``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.ray_runtime import cluster_has_gpu, ensure_ray
    from pipeline.backbones import get_spec
    from pipeline.finetune import FinetuneConfig, head_init_from_probe, read_finetune_info, read_merged_spec

    cfg = config if isinstance(config, FinetuneConfig) else FinetuneConfig.from_dict(dict(config or {}))
    spec = get_spec(spec)
    probe = _probe_of(probe)
    head_init = head_init_from_probe(probe)
    train = list(train_records if train_records is not None else dataset.split("train"))
    val = list(val_records if val_records is not None else dataset.split("val"))
    if not train:
        raise ValueError("the dataset has no train split to fine-tune on")
    resources = ensure_ray()
    use_gpu = cluster_has_gpu() if use_gpu is None else bool(use_gpu)
    if num_workers is None:
        num_workers = max(1, int(resources.get("GPU", 0))) if use_gpu else 1
    if cpus_per_worker is None:
        cpus_per_worker = max(1, min(8, int(resources.get("CPU", 1)) // max(1, num_workers)))
    if data_workers is None:
        data_workers = min(4, max(0, int(cpus_per_worker) - 1)) if use_gpu else 0
    root = Path(root).expanduser().resolve()
    run_name = run_name or f"finetune-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    out = Path(out_dir) if out_dir is not None else root / "finetunes" / run_name
    train_loop_config = {
        "spec": spec.to_dict(), "head": head_init.to_dict(), "config": cfg.to_dict(),
        "train": _label_codes(train, head_init.classes), "val": _label_codes(val, head_init.classes),
        "fault": dict(fault) if fault else None, "cpus_per_worker": int(cpus_per_worker),
        "data_workers": int(data_workers),
    }
    trainer = TorchTrainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config=train_loop_config,
        scaling_config=ScalingConfig(num_workers=int(num_workers), use_gpu=use_gpu,
                                     resources_per_worker={"CPU": float(cpus_per_worker),
                                                           **({"GPU": 1.0} if use_gpu else {})}),
        run_config=RunConfig(name=run_name, storage_path=str(root / "ray_results"),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=int(max_failures))),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray Train raises once max_failures restarts are used up
        raise RuntimeError(f"fine-tuning {spec.name} failed: {type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    seconds = time.perf_counter() - t0
    if result.error is not None:
        raise RuntimeError(f"fine-tuning {spec.name} failed: {result.error}") from result.error
    if result.checkpoint is None or not (result.metrics or {}).get("final"):
        raise RuntimeError(f"fine-tuning {spec.name} ended without its final checkpoint "
                           f"(last metrics: {result.metrics})")
    with result.checkpoint.as_directory() as d:
        src = Path(d) / "artifacts"
        if not src.is_dir():
            raise RuntimeError(f"the final checkpoint {d} holds no artifacts/ folder")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, out)
    info = read_finetune_info(out)
    attempts = list(info.get("metrics", {}).get("attempts") or [])
    return FinetuneJobResult(
        artifacts_dir=str(out), merged_spec=read_merged_spec(out), info=info,
        history=list(info.get("history") or []), attempts=attempts,
        best_epoch=int(info.get("metrics", {}).get("best_epoch", -1)), train_seconds=seconds,
        ray_path=str(getattr(result, "path", "") or ""), num_workers=int(num_workers),
        use_gpu=use_gpu)


# ----------------------------------------------------------------------------- MLflow

def curves(history: Sequence[Mapping[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    """(epoch, {metric: value}) per epoch, for MLflow step-wise logging."""
    out = []
    for row in history:
        out.append((int(row["epoch"]), {k: row[k] for k in CURVE_KEYS if row.get(k) is not None}))
    return out


def finetune_params(res: FinetuneJobResult) -> dict[str, Any]:
    info = res.info
    cfg = info.get("config", {})
    return {
        "finetune.method": info.get("method"), "finetune.strategy": info.get("strategy"),
        "finetune.note": info.get("plan", {}).get("note", "")[:480],
        "finetune.merged_spec": res.merged_spec.name, "finetune.input_size": res.merged_spec.input_size,
        "finetune.trainable_params": info.get("trainable_params"),
        "finetune.num_workers": res.num_workers, "finetune.use_gpu": res.use_gpu,
        **{f"finetune.{k}": v for k, v in cfg.items()},
    }


def log_finetune(res: FinetuneJobResult, *, run_id: str, log_weights_mb: float = 200.0) -> None:
    """Curves (one step per epoch), params, attempts and the artifacts of a fine-tune on a run."""
    from jobs.tracking import log_dir, log_json, log_metrics, log_params, log_tags

    log_params(finetune_params(res), run_id=run_id)
    for epoch, values in curves(res.history):
        log_metrics(values, run_id=run_id, step=epoch)
    last = res.history[-1] if res.history else {}
    log_metrics({"best_epoch": res.best_epoch, "epochs_trained": len(res.history),
                 "train_seconds": res.train_seconds, "attempts": len(res.attempts),
                 "train_images_per_s": last.get("images_per_s"),
                 "adapter_mb": res.info.get("adapter_bytes", 0) / 1e6,
                 "merged_mb": res.info.get("merged_bytes", 0) / 1e6,
                 "trainable_params_m": (res.info.get("trainable_params") or 0) / 1e6},
                run_id=run_id)
    log_tags({"tlpipe.finetune_strategy": res.strategy, "tlpipe.finetune_dir": res.artifacts_dir,
              "tlpipe.finetune_resumed": res.resumed}, run_id=run_id)
    log_json({"attempts": res.attempts, "history": res.history}, "finetune/history.json", run_id=run_id)
    d = Path(res.artifacts_dir)
    if (d / "finetune.json").is_file():
        log_json(json.loads((d / "finetune.json").read_text()), "finetune/finetune.json", run_id=run_id)
    for sub in ("adapter", "head"):
        if (d / sub).is_dir():
            log_dir(d / sub, f"finetune/{sub}", run_id=run_id)
    if res.info.get("merged_bytes", 0) / 1e6 <= log_weights_mb:
        log_dir(d / "merged", "finetune/merged", run_id=run_id)


# ----------------------------------------------------------------------------- the sweep's side

def _config_for(method: str, params: Mapping[str, Any], seed: int):
    from pipeline.finetune import FinetuneConfig

    cfg_params = {k: v for k, v in params.items() if k not in JOB_PARAMS}
    cfg_params.setdefault("seed", seed)
    return FinetuneConfig.from_dict({**cfg_params, "method": method})


def finetune_candidate(dataset: Any, ref: Any, hc: Any, *, probe: Any, root: Path, store: Any,
                       out_dir: Path, classes: Sequence[str], selection_metric: str,
                       n_bootstrap: int, seed: int, hardest_k: int, latency_repeats: int = 5,
                       latency_device: str = "cpu", run_name: str | None = None
                       ) -> tuple[Any, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Fine-tune one backbone for the sweep; returns (FeatureSetRef of the merged backbone,
    its latency, the candidate result in `pipeline.sweep.candidate.fit_evaluate`'s format + curves, the
    feature info for `_log_candidate`). Never raises: a failure is a ``status: failed`` result."""
    from jobs.extract import extract_features
    from pipeline.devices import default_dtype
    from pipeline.heads import load_head
    from pipeline.sweep.candidate import evaluate_head
    from pipeline.sweep.features import backbone_latency, plan_features, read_features, split_records
    from pipeline.sweep.plan import FeatureSetRef

    info: dict[str, Any] = {"test_records": []}
    try:
        params = dict(hc.params)
        cfg = _config_for(hc.head, params, seed)
        res = finetune(dataset, ref.spec, probe, root=root, config=cfg, out_dir=out_dir,
                       num_workers=params.get("num_workers"), use_gpu=params.get("use_gpu"),
                       cpus_per_worker=params.get("cpus_per_worker"),
                       max_failures=int(params.get("max_failures", 1)),
                       data_workers=params.get("data_workers"),
                       run_name=run_name)
        merged = res.merged_spec
        (stats,) = extract_features([(r.sha256, r.path) for r in dataset.records], [merged], store=store)
        dtype = "float32" if stats.engine != "torch" else default_dtype(latency_device)
        ft_ref = FeatureSetRef(backbone=ref.backbone, fingerprint=stats.fingerprint, family=ref.family,
                               params_m=merged.params_m, engine=stats.engine, text=False, spec=merged,
                               dtype=dtype)
        splits = split_records(dataset)
        kept, reason = plan_features(store, ft_ref, splits)
        if reason:
            raise RuntimeError(f"after fine-tuning: {reason}")
        if not kept["val"]:
            raise RuntimeError("a fine-tune is scored on the validation split, and this dataset "
                               "has none with embeddings; add val/ images")
        data, info = read_features(store, ft_ref, kept, splits)
        head = load_head(Path(res.artifacts_dir) / "head")
        result = evaluate_head(head, data, classes, fit_seconds=res.train_seconds,
                               selection_metric=selection_metric, n_bootstrap=n_bootstrap,
                               seed=seed, hardest_k=hardest_k, latency_repeats=latency_repeats)
        result["selection"] = _val_selection(head, data, classes, selection_metric)
        lat, lat_reason = backbone_latency(ft_ref, None, latency_device, latency_repeats)
        if lat_reason:
            lat = {"error": lat_reason}
        result["finetune"] = res
        result["fitted"] = {**result.get("fitted", {}), "finetune_strategy": res.strategy,
                            "finetune_best_epoch": res.best_epoch}
        return ft_ref, lat, result, info
    except Exception as exc:  # recorded as a FAILED candidate, the sweep goes on
        logger.warning("fine-tune %s of %s failed: %s: %s", hc.label, ref.backbone, type(exc).__name__, exc)
        return ref, {}, {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()}, info


def _val_selection(head: Any, data: Mapping[str, Any], classes: Sequence[str],
                   metric: str) -> dict[str, Any]:
    """A fine-tune's selection score: its predictions on the validation rows (fine-tuning all
    folds would cost k fine-tunes); the fine-tune trains on the train split only."""
    import numpy as np

    from pipeline.sweep.cv import align_proba, metric_from_proba

    val = np.flatnonzero(np.asarray(data["folds"])[0] >= 0)
    y = np.asarray(data["y"])[val]
    proba = align_proba(np.asarray(head.predict_proba(np.asarray(data["X"])[val])), head.classes_,
                        classes).astype(np.float32)
    return {"ids": [data["ids"][i] for i in val], "y": [str(v) for v in y], "proba": proba,
            "score": metric_from_proba(metric, y, proba, classes), "std": None,
            "fold_scores": [], "chosen": {}}


def sweep_finetunes(dataset: Any, refs: Sequence[Any], ft_cfgs: Sequence[Any],
                    probe_dirs: Mapping[str, str | None], *, root: Path, store: Any, sweep_dir: Path,
                    classes: Sequence[str], skipped: list[dict[str, str]], selection_metric: str,
                    n_bootstrap: int, seed: int, hardest_k: int, latency_repeats: int = 5,
                    latency_device: str = "cpu"):
    """For `jobs.sweep.run_sweep`: yields (candidate name, FeatureSetRef, HeadConfig, feature info,
    backbone latency, result) per (backbone, fine-tune head), one fine-tune at a time. The head
    starts from the sweep's linear probe of that backbone (`probe_dirs`), else from a LinearProbe
    fitted here on its cached embeddings."""
    from pipeline.sweep.plan import candidate_name, slug

    for ref in refs:
        for hc in ft_cfgs:
            name = candidate_name(ref.backbone, hc.label)
            if ref.spec is None:
                skipped.append({"backbone": ref.backbone, "head": hc.label,
                                "reason": "fine-tuning needs the backbone's spec and weights (pass "
                                          "FeatureSetRef.from_spec(spec))"})
                continue
            try:
                probe = probe_dirs.get(ref.backbone) or fit_probe_for(store, ref, dataset, seed=seed)
            except Exception as exc:
                yield name, ref, hc, {"test_records": []}, {}, {
                    "status": "failed", "error": f"no linear probe to start from: {type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()}
                continue
            out_dir = Path(sweep_dir) / "candidates" / slug(name) / "finetune"
            ft_ref, lat, result, info = finetune_candidate(
                dataset, ref, hc, probe=probe, root=root, store=store, out_dir=out_dir,
                classes=classes, selection_metric=selection_metric, n_bootstrap=n_bootstrap,
                seed=seed, hardest_k=hardest_k, latency_repeats=latency_repeats,
                latency_device=latency_device, run_name=f"{Path(sweep_dir).name}-{slug(name)}")
            yield name, ft_ref, hc, info, lat, result


def fit_probe_for(store: Any, ref: Any, dataset: Any, *, seed: int = 0):
    """A LinearProbe on the backbone's cached train embeddings (selected on val) — the head a
    fine-tune starts from when the sweep has no linear probe of its own for this backbone."""
    from pipeline.heads import LinearProbe
    from pipeline.sweep.features import plan_features, read_features, split_records

    splits = split_records(dataset)
    kept, reason = plan_features(store, ref, splits)
    if reason:
        raise RuntimeError(reason)
    data, _ = read_features(store, ref, kept, splits)
    train = data["folds"][0] < 0
    kw = {"X_val": data["X"][~train], "y_val": data["y"][~train]} if (~train).any() else {}
    return LinearProbe(seed=seed).fit(data["X"][train], data["y"][train], **kw)


__all__ = ["FinetuneJobResult", "curves", "finetune", "finetune_candidate",
           "fit_probe_for", "log_finetune", "sweep_finetunes",
           "train_loop_per_worker"]
