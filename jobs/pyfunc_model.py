"""The MLflow pyfunc wrapper of a tlpipe predictor, logged as *models from code*.

MLflow stores this file's source, not a cloudpickle of Python objects; the predictor itself
travels as the `predictor` artifact (JSON + safetensors + FAISS, no pickle). Input: a DataFrame
with an `image` column of base64 strings or raw bytes (or a list of those). Output: one row per
image with label, score, decision and top-k; a multi-label model's rows add `labels` (the list
of labels that passed, best first) and `label_scores` (JSON [{label, score}]), `label` being
their key "a|b" (None on abstention).
"""

from __future__ import annotations

import base64
import binascii
import json

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model


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
        from pipeline.multilabel.predictor import load_any_predictor

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
        preds = self.predictor.predict_images([_as_bytes(x) for x in images])
        rows = [{"label": p.label, "score": p.score, "decision": p.decision,
                 "top_k": json.dumps(p.top_k)} for p in preds]
        if preds and hasattr(preds[0], "labels"):  # multi-label: the answered set, best first
            for row, p in zip(rows, preds):
                row["labels"] = [d["label"] for d in p.labels]
                row["label_scores"] = json.dumps(p.labels)
        return pd.DataFrame(rows)


set_model(TlpipeModel())
