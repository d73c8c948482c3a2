"""Pydantic request/response models of the HTTP API (v1). They are the OpenAPI schema at /docs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Decision = Literal["classifier", "fallback", "abstain"]
Task = Literal["multiclass", "multilabel"]  # pipeline.multilabel.predictor.task_of


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------- requests
class ImagesJSON(_Model):
    """Images as base64 strings (standard alphabet; a ``data:image/...;base64,`` prefix is allowed)."""

    images: list[str] = Field(..., min_length=1, description="base64-encoded image files")
    top_k: int | None = Field(None, ge=1, le=1000, description="classifier scores to list per image")


# ---------------------------------------------------------------------------- responses
class ScoredLabel(_Model):
    label: str
    score: float


class ImagePrediction(_Model):
    index: int = Field(..., description="position of the image in the request")
    filename: str | None = Field(None, description="multipart file name, when given")
    label: str | None = Field(..., description="the answer; with decision abstain, the head's best guess "
                                               "below every calibrated threshold (do not act on it unreviewed). "
                                               "A multi-label model: the key of `labels` ('cat|dog'), null on abstain")
    score: float = Field(..., description="classifier probability, or k-NN vote agreement for fallback "
                                          "(multi-label: the first label's score, or the head's best on abstain)")
    labels: list[ScoredLabel] = Field(..., description="the labels answered, best first: a multi-label model's "
                                      "labels that passed their per-label thresholds (or the fallback's vote "
                                      "shares), a single-label model's one label; [] on abstain")
    decision: Decision
    top_k: list[ScoredLabel] = Field(..., description="the classifier's top scores (its view)")
    model: str = Field(..., description="name@version that answered")
    latency_ms: float = Field(..., description="time from request arrival to this answer")


class PredictResponse(_Model):
    model: str
    task: Task = Field(..., description="multiclass (one label per image) or multilabel (a list)")
    predictions: list[ImagePrediction]
    latency_ms: float


class ModelInfo(_Model):
    model: str = Field(..., description="name@version being served")
    name: str
    version: str
    served_as: str = Field(..., description="its {name} in /v1/models/{name}/... (the registered name)")
    reference: str = Field(..., description="what the server follows (e.g. NAME@champion)")
    alias: str | None = Field(None, description="the registry alias followed (None: a pinned version or a dir)")
    source: str = Field(..., description="where the version was loaded from")
    loaded_at: str
    fingerprint: str = Field(..., description="backbone fingerprint: models with the same one share the "
                             "backbone and its forward passes")
    backbone: str = Field(..., description="the first (or only) backbone")
    backbones: list[str] = Field(..., description="every backbone, in the order their embeddings are concatenated")
    engine: str
    input_size: int
    embed_dim: int
    head: str
    classes: list[str]
    task: Task = Field(..., description="multiclass (one label per image) or multilabel (a list)")
    threshold: float | None = Field(..., description="minimum top probability for a classifier answer "
                                    "(multiclass; null for multilabel: see `thresholds`)")
    thresholds: dict[str, float] | None = Field(None, description="multilabel: each label's minimum "
                                                "probability to be answered (null for multiclass)")
    knn_threshold: float
    knn_k: int
    top_k: int
    support_size: int = Field(..., description="vectors in the artifact's support index")
    added_examples: int = Field(..., description="support examples added through the API")
    poll_interval_s: float
    info: dict


class ModelSummary(_Model):
    name: str = Field(..., description="route name: /v1/models/{name}/predict")
    reference: str
    alias: str | None = None
    ready: bool
    model: str | None = Field(None, description="name@version being served (None while loading)")
    version: str | None = None
    classes: list[str] | None = None
    task: Task | None = None
    backbones: list[str] | None = None
    fingerprint: str | None = None


class ModelsResponse(_Model):
    models: list[ModelSummary]
    shared_backbones: list[dict] = Field(..., description="each distinct backbone fingerprint and the models "
                                         "whose requests share its forward passes")


class ClassInfo(_Model):
    name: str
    in_head: bool = Field(..., description="the classifier head was trained on it")
    support_examples: int = Field(..., description="vectors in the support index (artifact + added); "
                                  "multilabel: the vectors whose label set holds it")
    added_examples: int = Field(..., description="examples added through the API")
    needs_retraining: bool = Field(..., description="answerable only by the fallback until retrained")


class ClassesResponse(_Model):
    model: str
    classes: list[ClassInfo]


class AddedExample(_Model):
    id: int
    sha256: str
    path: str = Field(..., description="where the image is kept, relative to the support store")
    duplicate: bool = Field(False, description="this class already had this exact image")


class AddExamplesResponse(_Model):
    model: str
    class_name: str = Field(..., serialization_alias="class")
    added: list[AddedExample]
    needs_retraining: bool


class DeleteResponse(_Model):
    model: str
    class_name: str = Field(..., serialization_alias="class")
    removed: list[int]


class ReloadResponse(_Model):
    changed: bool
    model: str
    previous: str | None


class MonitorResponse(BaseModel):
    """Production monitoring of this replica, per model version it served (see deploy/monitor.py)."""

    model_config = ConfigDict(extra="allow")
    current: str | None = Field(None, description="the version being served")
    enabled: bool = Field(..., description="decision/drift windows are kept (setting `monitor`)")
    models: dict = Field(..., description="per version: windows with decision rates, confidence histogram, "
                         "predicted-class mix vs training prior, drift score vs calibrated threshold")
    capture: dict | None = Field(None, description="capture writer counters (None: capture off)")


class Health(_Model):
    status: str
    model: str | None = None
    detail: str | None = None


class ErrorResponse(_Model):
    error: str = Field(..., description="short machine-readable code, e.g. not_an_image")
    message: str = Field(..., description="what went wrong and how to fix it")
    details: list[dict] = Field(default_factory=list)
