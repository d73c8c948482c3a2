"""The loader front door: `load_backbone` (torch / onnx / openvino / auto) over the catalogue.

The catalogue (named specs, `get_spec`, `list_specs`, `weights_available`; see ``catalogue.py``)
and the torch loader (``loader.py``) are re-exported here.
"""
from __future__ import annotations

from ..devices import resolve_device
from .base import Backbone
from .catalogue import get_spec, list_specs, register
from .loader import load_torch_backbone, weights_available
from .onnx_runtime import OnnxBackbone, load_onnx_backbone, onnx_path
from .openvino_runtime import OpenVinoBackbone, load_openvino_backbone
from .quantize import ensure_int8
from .spec import ENGINES, BackboneSpec

__all__ = [
    "ENGINE_CHOICES", "default_cpu_engine", "get_spec", "list_specs", "load_backbone", "load_torch_backbone",
    "register", "weights_available",
]

ENGINE_CHOICES = ENGINES + ("auto",)
GRAPH_ENGINES = ("openvino", "onnx")  # run the exported uint8-in graph on CPU, fastest first


def load_backbone(
    spec_or_name: BackboneSpec | str,
    *,
    device: str = "cpu",
    engine: str = "torch",
    dtype: str | None = None,
    allow_download: bool = False,
    cache_dir: str | None = None,
    intra_op_num_threads: int | None = None,
    weights: str | None = None,
) -> Backbone:
    """Load a backbone for inference.

    engine: "torch" (eager), "onnx" (export once, cached under ``cache_dir`` by fingerprint, run in
    onnxruntime; CPU), "openvino" (the same export compiled by OpenVINO's CPU plugin, checked once
    against onnxruntime), or "auto" (on CPU the fastest installed of openvino / onnx, falling back
    to torch with a warning if the export fails; torch on CUDA). ``weights`` overrides
    ``spec.weights`` (a local dir/file). Unavailable weights raise `WeightsUnavailableError` (cause
    + fix) unless ``allow_download`` is set; nothing is ever randomly initialised.

    An INT8 variant (``spec.precision == "int8"``, see ``quantize.py``) runs only on a graph
    engine ("auto" picks one, never torch); its quantized model must be in the cache (extraction
    makes it from the calibration images; a saved predictor brings its own).
    """
    spec = get_spec(spec_or_name)
    if weights is not None:
        spec = spec.replace(weights=str(weights))
    if engine not in ENGINE_CHOICES:
        raise ValueError(f"engine must be one of {ENGINE_CHOICES}, got {engine!r}")
    device = _resolve_device(device)
    if engine in GRAPH_ENGINES + ("auto",) and device == "cpu" and dtype not in (None, "float32"):
        if engine != "auto":
            raise ValueError(f"engine={engine!r} runs float32; got dtype={dtype!r} (use engine='torch' for {dtype})")
        engine = "torch"  # auto + an explicit low-precision dtype: only torch can honour it
    if engine in GRAPH_ENGINES and device != "cpu":
        raise ValueError(f"engine={engine!r} runs on CPU; use engine='torch' on {device}")
    kwargs = dict(cache_dir=cache_dir, intra_op_num_threads=intra_op_num_threads, allow_download=allow_download)
    if spec.precision != "fp32":
        if engine == "torch" or device != "cpu":
            raise ValueError(f"{spec.name} is a {spec.precision} variant: it runs on CPU with engine "
                             f"'openvino' or 'onnx' (or 'auto'), not engine={engine!r} on {device}")
        if engine == "auto":
            engine = default_cpu_engine()
            if engine not in GRAPH_ENGINES:
                raise ValueError(f"{spec.name}: INT8 needs openvino or onnxruntime installed")
        return _load_graph(engine, spec, **kwargs)
    if engine == "auto":
        engine = default_cpu_engine() if device == "cpu" else "torch"
        if engine in GRAPH_ENGINES:
            if onnx_path(spec, cache_dir).is_file():
                return _load_graph(engine, spec, **kwargs)
            torch_backbone = load_torch_backbone(spec, device="cpu", dtype="float32", allow_download=allow_download)
            try:
                return _load_graph(engine, spec, torch_backbone=torch_backbone, **kwargs)
            except Exception as e:  # export problems: eager torch still gives the right numbers
                import logging

                logging.getLogger(__name__).warning(
                    "%s: %s export failed (%s: %s); using eager torch", spec.name, engine, type(e).__name__, e)
                return torch_backbone
    if engine in GRAPH_ENGINES:
        return _load_graph(engine, spec, **kwargs)
    return load_torch_backbone(spec, device=device, dtype=dtype, allow_download=allow_download)


def default_cpu_engine() -> str:
    """What engine="auto" runs on CPU: openvino, else onnx, else torch (whichever is installed)."""
    if _installed("openvino"):
        return "openvino"
    return "onnx" if _installed("onnxruntime") else "torch"


def _load_graph(engine: str, spec: BackboneSpec, **kwargs) -> Backbone:
    if spec.precision == "int8":
        spec, path = ensure_int8(spec, engine, cache_dir=kwargs.get("cache_dir"),
                                 allow_download=bool(kwargs.get("allow_download")),
                                 torch_backbone=kwargs.get("torch_backbone"))
        options = dict(intra_op_num_threads=kwargs.get("intra_op_num_threads"),
                       allow_download=bool(kwargs.get("allow_download")))
        if engine == "openvino":  # checked against fp32 when it was quantized, not against ORT
            return OpenVinoBackbone(spec, path, verify=False, **options)
        return OnnxBackbone(spec, path, **options)
    if engine == "openvino":
        return load_openvino_backbone(spec, **kwargs)
    return load_onnx_backbone(spec, **kwargs)


def _resolve_device(device: str) -> str:
    return resolve_device(device)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
