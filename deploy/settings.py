"""Serving settings: one Pydantic model, read when a replica starts (never at import).

Precedence, lowest first: field defaults < environment variables < explicit overrides (the
arguments of `deploy.app.build_app` / the `args` of `deploy/serve.yaml`).

Environment variables (read by `load_settings`, at call time):

| variable                              | field                    |
|---------------------------------------|--------------------------|
| ``TLPIPE_SERVE_<FIELD>`` (upper case) | any field below          |
| ``TLPIPE_HOME``                       | ``state_root`` fallback  |
| ``MLFLOW_TRACKING_URI``               | ``tracking_uri`` fallback|

Hardware (`device`, `dtype`, `gpus_per_replica`, `gpu_max_batch_size`, `gpu_batch_wait_timeout_s`) is
decided where the application is BUILT (`deploy.app.build_app`: the ``num_gpus`` Ray must reserve
and the batch defaults are deployment options, fixed before any replica starts); the replicas run
what the builder resolved (the rules: `deploy.backbone.resolve_backbone_device` / `backbone_dtype`).

The admin token should come from the environment (a Kubernetes secret), not from a config file:
Serve configs and bind arguments are visible to anyone who can read the cluster's config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator

from deploy.backbone import DEVICE_CHOICES, DTYPE_CHOICES, DeviceError, resolve_backbone_device
from pipeline.backbones.registry import ENGINE_CHOICES, GRAPH_ENGINES
from pipeline.monitoring import DEFAULT_LAST, DEFAULT_WINDOWS_S
from pipeline.settings import DEFAULT_STATE_ROOT

ENV_PREFIX = "TLPIPE_SERVE_"


class SettingsError(ValueError):
    """Serving settings that do not validate; the message names the field and the fix."""


class ServeSettings(BaseModel):
    """Limits and wiring of one serving replica."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, description="NAME@alias, NAME/version, models:/..., or a saved predictor dir")
    tracking_uri: str | None = Field(None, description="MLflow tracking/registry URI (default: the state root's)")
    state_root: str = Field(DEFAULT_STATE_ROOT, description="tlpipe state root; serving state lives in <root>/serve/")
    admin_token: SecretStr | None = Field(None, description="Bearer token for the admin routes (None: disabled)")
    max_request_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="largest accepted request body")
    max_images_per_request: int = Field(32, ge=1, le=1024)
    max_pixels: int = Field(40_000_000, ge=1, description="largest decoded image (width x height)")
    max_examples_per_request: int = Field(64, ge=1, le=4096, description="admin: images per add call")
    poll_interval_s: float = Field(10.0, ge=0.0, description="registry alias poll period (0: never poll)")
    engine: str = Field("auto", description=f"backbone engine, one of {ENGINE_CHOICES}")
    decode_threads: int = Field(2, ge=1, le=64, description="threads decoding + preparing images")
    device: str = Field("auto", description=f"backbone device, one of {DEVICE_CHOICES}; auto: cuda when a CUDA "
                        "GPU is visible where the app is built (name cuda explicitly on a cluster)")
    dtype: str = Field("auto", description=f"backbone precision on cuda, one of {DTYPE_CHOICES}; auto: bfloat16 "
                       "where the GPU supports it, else float16 (autocast). CPU runs float32")
    # 1: one replica per GPU; a fraction packs several backbone replicas onto one GPU
    gpus_per_replica: float = Field(1.0, gt=0.0, le=8.0, description="num_gpus of each backbone replica on cuda")
    # a GPU's forward pass grows far less than linearly with the batch: batch wider than on CPU and
    # wait a little for company (tune with bench/gpu_serve.py); the CPU defaults are BackboneConfig's
    gpu_max_batch_size: int = Field(64, ge=1, le=256, description="@serve.batch max_batch_size on cuda")
    gpu_batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=1.0,
                                            description="@serve.batch longest wait for company on cuda")
    top_k: int | None = Field(None, ge=1, le=1000, description="default top_k (None: the predictor's)")
    monitor: bool = Field(True, description="drift and decision monitoring (GET /v1/monitor, gauges on /metrics)")
    monitor_windows_s: tuple[float, ...] = Field(DEFAULT_WINDOWS_S, min_length=1,
                                                 description="sliding windows the monitor summarises, seconds")
    monitor_last: int | None = Field(DEFAULT_LAST, ge=1, description="also summarise the last N images (None: no)")
    capture: str | None = Field(None, description="capture fallback/abstain images + embeddings here: a folder, "
                                "an fsspec URL, or 'auto' (<state_root>/serve/<model>/capture); None: off")
    capture_max_bytes: int = Field(2 * 1024**3, ge=1, description="capture size bound (oldest records go first)")
    capture_max_age_s: float = Field(30 * 86400.0, gt=0, description="capture age bound")
    capture_sample: float = Field(0.0, ge=0.0, le=1.0, description="share of the other answers captured too")
    capture_queue: int = Field(256, ge=1, description="records waiting for the writer; more are dropped")

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        if v not in ENGINE_CHOICES:
            raise ValueError(f"engine must be one of {ENGINE_CHOICES}, got {v!r}")
        return v

    @field_validator("device", "dtype", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    # cross-field rules as field validators (fields validate in declaration order: engine, device,
    # dtype), so an error quotes this field's input, never the others' (the admin token)
    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str, info: ValidationInfo) -> str:
        if v not in DEVICE_CHOICES:
            raise ValueError(f"device must be one of {DEVICE_CHOICES}")
        if v == "cuda" and info.data.get("engine") in GRAPH_ENGINES:
            raise ValueError(f"engine={info.data['engine']!r} runs on CPU; use engine 'torch' or 'auto' "
                             "with device cuda")
        return v

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str, info: ValidationInfo) -> str:
        if v not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}")
        if info.data.get("device") == "cpu" and v not in ("auto", "float32"):
            raise ValueError(f"dtype={v!r} is for device cuda; the CPU engines run float32")
        return v

    @field_validator("monitor_windows_s", mode="before")
    @classmethod
    def _windows_list(cls, v: Any) -> Any:
        return [x for x in str(v).replace(",", " ").split()] if isinstance(v, str) else v

    @field_validator("model", "tracking_uri", "capture", mode="before")
    @classmethod
    def _blank_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("admin_token", mode="before")
    @classmethod
    def _blank_token_is_none(cls, v: Any) -> Any:
        if isinstance(v, SecretStr):
            v = v.get_secret_value()
        return None if v is None or (isinstance(v, str) and not v.strip()) else v

    # ------------------------------------------------------------------ derived
    @property
    def resolved_tracking_uri(self) -> str:
        """`tracking_uri`, else ``sqlite:///<state_root>/mlflow.db`` (as `tlpipe run` writes)."""
        if self.tracking_uri:
            return self.tracking_uri
        return f"sqlite:///{Path(self.state_root).expanduser().resolve() / 'mlflow.db'}"

    def serve_dir(self, model_key: str) -> Path:
        """``<state_root>/serve/<model key>``: downloads, support examples and their index."""
        return Path(self.state_root).expanduser().resolve() / "serve" / model_key

    def capture_url(self, model_key: str) -> str | None:
        """Where captured traffic goes (None: capture off); 'auto' is the model's serving dir."""
        if self.capture is None:
            return None
        return str(self.serve_dir(model_key) / "capture") if self.capture == "auto" else self.capture

    def backbone_device(self, *, require: bool = True) -> str:
        """'cpu' or 'cuda' for `device` on this machine (`deploy.backbone.resolve_backbone_device`);
        a `SettingsError` naming the fix when cuda is asked for and `require`d but not there.
        'auto' with a CPU engine (onnx, openvino) is the CPU."""
        if self.device == "auto" and self.engine in GRAPH_ENGINES:
            return "cpu"
        try:
            return resolve_backbone_device(self.device, require=require)
        except DeviceError as exc:
            raise SettingsError(str(exc)) from None

    def public(self) -> dict:
        """The settings without the secret (for /v1/model and logs)."""
        d = self.model_dump(exclude={"admin_token"})
        d["admin_enabled"] = self.admin_token is not None
        return d


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ServeSettings.model_fields:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            out[name] = environ[key]
    if "state_root" not in out and environ.get("TLPIPE_HOME"):
        out["state_root"] = environ["TLPIPE_HOME"]
    if "tracking_uri" not in out and environ.get("MLFLOW_TRACKING_URI"):
        out["tracking_uri"] = environ["MLFLOW_TRACKING_URI"]
    return out


def load_settings(overrides: Mapping[str, Any] | None = None, *,
                  environ: Mapping[str, str] | None = None) -> ServeSettings:
    """Defaults < ``TLPIPE_SERVE_*`` environment < `overrides` (None values are ignored)."""
    values = _from_env(os.environ if environ is None else environ)
    values.update({k: v for k, v in dict(overrides or {}).items() if v is not None})
    try:
        return ServeSettings(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']} (got {e.get('input')!r})"
            if "admin_token" not in e["loc"] else f"admin_token: {e['msg']}"
            for e in exc.errors())
        raise SettingsError(
            f"invalid serving settings: {problems}. Fix the argument or the {ENV_PREFIX}<FIELD> "
            "environment variable") from None
