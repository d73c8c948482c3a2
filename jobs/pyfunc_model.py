"""The MLflow pyfunc wrapper of a tlpipe predictor, logged as *models from code*.

MLflow stores this file's source, not a cloudpickle of Python objects; the predictor itself
travels as the `predictor` artifact (JSON + safetensors + FAISS, no pickle). Input: a DataFrame
with an `image` column of base64 strings or raw bytes (or a list of those). Output: one row per
image with label, score, decision, top-k and error; a multi-label model's rows add `labels` (the
list of labels that passed, best first) and `label_scores` (JSON [{label, score}]), `label` being
their key "a|b" (None on abstention).

A row whose image cannot be used (not base64, not an image, truncated, too large) does not fail
the batch: it comes back with decision ``error``, no label, score 0 and the reason in `error`
(None on every other row), so one bad file in a batch-scoring job costs one row, not the job.
"""

from __future__ import annotations

import base64
import binascii
import json

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model

from pipeline.batch_predict import predict_each
from pipeline.multilabel.predictor import MultiLabelPredictor, load_any_predictor


def _as_bytes(item) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, str):
        try:
            return base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"image is neither bytes nor valid base64: {exc}") from exc
    raise TypeError(f"unsupported image value of type {type(item).__name__}; send base64 or bytes")


class TlpipeModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        # a single-label Predictor or a MultiLabelPredictor, by what the artifact holds
        self.predictor = load_any_predictor(context.artifacts["predictor"])

    # The DataFrame hint is for MLflow 3, which otherwise warns "Add type hints to the `predict`
    # method" each time this class is defined (every registration, every pyfunc load). MLflow
    # neither validates nor converts a DataFrame-hinted input, so the dict and list forms below
    # still arrive as sent. (No signature is logged either: one would make MLflow turn the dict
    # into one row holding a list, and reject the list; see `jobs.registry`.)
    def predict(self, context, model_input: pd.DataFrame, params=None):
        if isinstance(model_input, pd.DataFrame):
            if "image" not in model_input.columns:
                raise ValueError(f"expected an 'image' column, got {list(model_input.columns)}")
            images = list(model_input["image"])
        elif isinstance(model_input, dict) and "image" in model_input:
            images = list(model_input["image"])
        else:
            images = list(model_input)
        data, errors = {}, {}
        for i, item in enumerate(images):
            try:
                data[i] = _as_bytes(item)
            except (TypeError, ValueError) as exc:
                errors[i] = exc
        answers = {**errors, **dict(zip(data, predict_each(self.predictor, list(data.values()))))}
        multi = isinstance(self.predictor, MultiLabelPredictor)
        rows: list[dict] = []
        for i in range(len(images)):
            p = answers[i]
            if isinstance(p, Exception):  # an unusable image: its row says why
                rows.append({"label": None, "score": 0.0, "decision": "error", "top_k": "[]",
                             "error": f"row {i}: {p}", "labels": [], "label_scores": "[]"})
            else:  # a multi-label answer's `labels`: the answered set, best first
                rows.append({"label": p.label, "score": p.score, "decision": p.decision,
                             "top_k": json.dumps(p.top_k), "error": None,
                             "labels": [d["label"] for d in p.labels] if multi else None,
                             "label_scores": json.dumps(p.labels) if multi else None})
        columns = ["label", "score", "decision", "top_k", "error"] + (["labels", "label_scores"] if multi else [])
        # text columns as objects: pandas would make them strings whose missing value is NaN, which
        # `mlflow models serve` writes as a bare NaN (not JSON); None stays null
        return pd.DataFrame({c: pd.Series([r[c] for r in rows], dtype=float if c == "score" else object)
                             for c in columns})


set_model(TlpipeModel())
