"""The MLflow model registry side: register a predictor, move aliases, gate promotion.

A registered model is named after the dataset; each winner is a new version carrying alias
`challenger`. `promote` moves `champion` to it only when it beats the current champion on the
same test split (same dataset hash), unless forced — and records why in the version's tags.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
PREDICTOR_ARTIFACT = "predictor"
#: the per-image test predictions `jobs.run` stores inside the predictor (the promotion gate's input)
TEST_PREDICTIONS = "test_predictions.json"


#: pip for the model's conda environment when this environment has none to pin (uv makes venvs
#: without pip): a floor that installs the `==` pins below
PIP_FALLBACK = "pip>=24.0"


def _conda_env(pip_requirements: list[str]) -> dict:
    """The model's environment, written by us rather than left to MLflow: MLflow pins the pip
    of the logging environment and, when there is none (a uv venv), logs "Failed to resolve
    installed pip version" at every registration and writes an unversioned `pip`. Here pip is
    always declared: the installed version as MLflow would (`<=`, conda-forge lags PyPI), else
    `PIP_FALLBACK`."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    try:
        pip = f"pip<={version('pip')}"
    except PackageNotFoundError:
        pip = PIP_FALLBACK
    return {"name": "mlflow-env", "channels": ["conda-forge"],
            "dependencies": [f"python={platform.python_version()}", pip, {"pip": pip_requirements}]}


class _DropNoSignatureNotice(logging.Filter):
    """Drops MLflow's "Failed to infer model signature: Type hint ... cannot be used to infer
    model signature" record (logger `mlflow.pyfunc`, WARNING, once per registration).

    Informational: the model has no signature on purpose. Its input is a DataFrame, a dict or a
    list of base64 strings or bytes (`jobs.pyfunc_model`); a signature would make MLflow reshape
    the dict and reject the list. Installed only around `log_model`, for that one message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to infer model signature: Type hint")


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("mlflow", "torch", "torchvision", "timm", "transformers", "open_clip_torch",
                 "onnxruntime", "faiss-cpu", "safetensors", "pillow", "pillow-heif", "numpy", "pandas"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return reqs


def prepare_registration() -> None:
    """Build now what MLflow's requirement check reads at this process's first registration (a
    map of every installed distribution's modules: about a second of CPU), so that `tlpipe run`
    can do it on a thread while the sweep's tasks run instead of after them. Mismatch warnings,
    if any, are left to the registration itself."""
    from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches

    log = logging.getLogger("mlflow.utils.requirements_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        warn_dependency_requirement_mismatches(_pip_requirements())
    finally:
        log.setLevel(level)


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
        no_signature = _DropNoSignatureNotice()
        logging.getLogger("mlflow.pyfunc").addFilter(no_signature)
        if run_id:  # MLflow refuses to resume a run outside the active experiment (one the caller set)
            use_experiment(MlflowClient().get_run(run_id).info.experiment_id)
        try:
            with mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(
                    run_name=f"register-{model_name}"):
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=str(PYFUNC_CODE),
                    artifacts={PREDICTOR_ARTIFACT: str(predictor_dir)},
                    registered_model_name=model_name, conda_env=_conda_env(_pip_requirements()),
                )
        finally:
            logging.getLogger("mlflow.pyfunc").removeFilter(no_signature)
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in (tags or {}).items():
        client.set_model_version_tag(model_name, version, key, str(value))
    client.set_registered_model_alias(model_name, alias, version)
    return version


def use_experiment(experiment_id: str) -> None:
    """Make `experiment_id` MLflow's active experiment, without `set_experiment`'s side effect on
    the environment (it also exports MLFLOW_EXPERIMENT_ID, which child processes would inherit)."""
    import mlflow

    before = os.environ.get("MLFLOW_EXPERIMENT_ID")
    mlflow.set_experiment(experiment_id=experiment_id)
    if before is None:
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    else:
        os.environ["MLFLOW_EXPERIMENT_ID"] = before


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


def promote(model_name: str, *, version: str | None = None, force: bool = False,
            margin: float = 0.005) -> PromotionResult:
    """Move `champion` to `version` (default: the `challenger`) when a paired comparison on the
    same test split shows it is not worse than the champion (within `margin`) — or when forced."""
    from mlflow import MlflowClient

    from pipeline.select import promotion_decision

    client = MlflowClient()
    version = str(version or alias_version(model_name, "challenger") or "")
    if not version:
        raise ValueError(f"model {model_name!r} has no challenger; run `tlpipe run` first or pass --version")
    challenger = client.get_model_version(model_name, version)
    champ_version = alias_version(model_name, "champion")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if champ_version == version:
        return PromotionResult(False, version, champ_version, f"version {version} is already champion")
    champion = client.get_model_version(model_name, champ_version) if champ_version else None
    ch_pred, y_true = test_predictions(model_name, version)
    # {} (not None) for a champion registered without predictions: the gate refuses, not promotes
    cp_pred = (test_predictions(model_name, champ_version)[0] or {}) if champion else None
    decision = promotion_decision(
        ch_pred, cp_pred, y_true, force=force,
        metric_name=_promotion_metric(challenger.tags),
        champion_metric_name=_promotion_metric(champion.tags, None) if champion else None,
        margin=margin, challenger_split=challenger.tags.get("test_split_hash"),
        champion_split=champion.tags.get("test_split_hash") if champion else None)
    reason = decision.reason
    for key, value in decision.to_tags().items():
        client.set_model_version_tag(model_name, version, key, str(value))
    if decision.promote:
        client.set_registered_model_alias(model_name, "champion", version)
        client.set_model_version_tag(model_name, version, "promotion_reason", reason)
        client.set_model_version_tag(model_name, version, "promoted_at", stamp)
        if champ_version:
            client.set_model_version_tag(model_name, champ_version, "replaced_by", version)
    else:
        client.set_model_version_tag(model_name, version, "promotion_refused", f"{stamp}: {reason}")
    return PromotionResult(decision.promote, version, champ_version, reason)


def _promotion_metric(tags: dict, default: str | None = "balanced_accuracy") -> str | None:
    """The metric the gate compares test predictions with: the selection metric, except for a
    multi-label version (tag tlpipe.task=multilabel) whose predictions are label-set keys
    ("a|b"): accuracy on them is the subset accuracy."""
    if tags.get("tlpipe.task") == "multilabel":
        return "accuracy"
    return tags.get("selection_metric", default)


def test_predictions(model_name: str, version: str) -> tuple[dict[str, str] | None, dict[str, str] | None]:
    """({test image id: predicted label}, {id: true label}) recorded with a registered version,
    or (None, None) for a version registered without them."""
    import json

    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{model_name}/{version}/artifacts/{PREDICTOR_ARTIFACT}/{TEST_PREDICTIONS}")
    except (MlflowException, OSError):
        return None, None
    data = json.loads(Path(path).read_text())
    return dict(zip(data["ids"], data["y_pred"])), dict(zip(data["ids"], data["y_true"]))
