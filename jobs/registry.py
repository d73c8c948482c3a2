"""The MLflow model registry side: register a predictor, move aliases, gate promotion.

A registered model is named after the dataset; each winner is a new version carrying alias
`challenger`. `promote` moves `champion` to it only when it beats the current champion on the
same test split (same dataset hash), unless forced — and records why in the version's tags.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
PREDICTOR_ARTIFACT = "predictor"


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("mlflow", "torch", "torchvision", "timm", "transformers", "open_clip_torch",
                 "onnxruntime", "faiss-cpu", "safetensors", "pillow", "numpy", "pandas"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return reqs


def register_predictor(predictor_dir: str | Path, model_name: str, *, run_id: str | None = None,
                       alias: str = "challenger", tags: dict | None = None) -> str:
    """Log `predictor_dir` as a pyfunc model (from code) and register it; returns the version.

    Logs into run `run_id` when given (the sweep's parent run), else a new run.
    """
    import mlflow
    from mlflow import MlflowClient

    predictor_dir = Path(predictor_dir)
    if not (predictor_dir / "predictor.json").is_file():
        raise FileNotFoundError(f"{predictor_dir} holds no saved predictor (predictor.json)")
    with tempfile.TemporaryDirectory() as tmp:
        if predictor_dir.name != PREDICTOR_ARTIFACT:  # MLflow keeps the folder's own name
            shutil.copytree(predictor_dir, Path(tmp) / PREDICTOR_ARTIFACT)
            predictor_dir = Path(tmp) / PREDICTOR_ARTIFACT
        with mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(
                run_name=f"register-{model_name}"):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_CODE),
                artifacts={PREDICTOR_ARTIFACT: str(predictor_dir)},
                registered_model_name=model_name, pip_requirements=_pip_requirements(),
            )
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in (tags or {}).items():
        client.set_model_version_tag(model_name, version, key, str(value))
    client.set_registered_model_alias(model_name, alias, version)
    return version


def alias_version(model_name: str, alias: str) -> str | None:
    """The version an alias points at, or None when the alias (or model) does not exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient().get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def predictor_path(model_name: str, version: str, dst: str | Path | None = None) -> Path:
    """Download a registered version and return the directory of its saved predictor."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{model_name}/{version}", dst_path=str(dst) if dst else None))
    path = local / "artifacts" / PREDICTOR_ARTIFACT
    if not (path / "predictor.json").is_file():
        raise FileNotFoundError(f"models:/{model_name}/{version} has no {PREDICTOR_ARTIFACT} artifact")
    return path


@dataclass
class PromotionResult:
    promoted: bool
    version: str
    previous_champion: str | None
    reason: str


def promote(model_name: str, *, version: str | None = None, force: bool = False) -> PromotionResult:
    """Move `champion` to `version` (default: the `challenger`) if it beats the champion."""
    from mlflow import MlflowClient

    from pipeline.select import promotion_decision

    client = MlflowClient()
    version = str(version or alias_version(model_name, "challenger") or "")
    if not version:
        raise ValueError(f"model {model_name!r} has no challenger; run `tlpipe run` first or pass --version")
    challenger = client.get_model_version(model_name, version)
    champ_version = alias_version(model_name, "champion")
    champion = client.get_model_version(model_name, champ_version) if champ_version else None
    metric_name = challenger.tags.get("selection_metric", "metric")
    ok, reason = promotion_decision(
        _metric(challenger), _metric(champion) if champion else None, force=force,
        metric_name=metric_name, challenger_split=challenger.tags.get("test_split_hash"),
        champion_split=champion.tags.get("test_split_hash") if champion else None,
    )
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if ok and champ_version == version:
        return PromotionResult(False, version, champ_version, f"version {version} is already champion")
    if ok:
        client.set_registered_model_alias(model_name, "champion", version)
        client.set_model_version_tag(model_name, version, "promotion_reason", reason)
        client.set_model_version_tag(model_name, version, "promoted_at", stamp)
        if champ_version:
            client.set_model_version_tag(model_name, champ_version, "replaced_by", version)
    else:
        client.set_model_version_tag(model_name, version, "promotion_refused", f"{stamp}: {reason}")
    return PromotionResult(ok, version, champ_version, reason)


def _metric(mv) -> float | None:
    value = mv.tags.get("metric_value") if mv is not None else None
    return float(value) if value not in (None, "") else None
