"""ONNX fast path: export a torch backbone once (normalisation fused, uint8 input, dynamic batch),
cache the ``.onnx`` under ``<cache_dir>/onnx/<fingerprint>.op<opset>.onnx``, run it in onnxruntime.

The graph takes uint8 ``pixels`` (N, 3, S, S) -- 4x less data to ship than float -- and returns
float32 ``embeddings`` (N, D). Session: graph optimisation ALL, ``intra_op_num_threads``
configurable (default: the CPUs this process may use), one inter-op thread, no thread spinning
(``allow_spinning=True`` to turn it back on).

The cache key is ``spec.fingerprint_for("onnx", "float32")``, so a changed spec field or changed
local weights produce a new file; a cached file is used without loading the torch model at all.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from pipeline.settings import cache_dir as default_cache_dir

from . import loader
from .base import Backbone
from .spec import BackboneSpec

if TYPE_CHECKING:  # pragma: no cover
    from .torch_base import TorchBackbone

__all__ = ["OnnxBackbone", "ExportedGraphBackbone", "ensure_onnx", "export_onnx", "onnx_path", "default_cache_dir",
           "load_onnx_backbone", "session", "write_atomic", "DEFAULT_OPSET", "INPUT_NAME"]

DEFAULT_OPSET = 17
INPUT_NAME = "pixels"
OUTPUT_NAME = "embeddings"
_log = logging.getLogger(__name__)




def onnx_path(spec: BackboneSpec, cache_dir: str | os.PathLike | None = None, *, opset: int = DEFAULT_OPSET) -> Path:
    """The fp32 export of ``spec`` (of its fp32 base for an INT8 variant: quantization starts there)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "onnx" / f"{spec.as_fp32().fingerprint_for('onnx', 'float32')}.op{opset}.onnx"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def session(path: Path, intra_op_num_threads: int, providers: Sequence[str] | None = None,
             allow_spinning: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # Spinning worker threads win a little on an idle machine but steal the CPU that JPEG decode
    # threads (and other workers) need on a small box; measured faster AND cheaper off on 2 cores.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(intra_op_num_threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers or ["CPUExecutionProvider"]))


def _verify(backbone: "TorchBackbone", path: Path, min_cosine: float = 0.999) -> float:
    """Run the exported graph on 3 random images (a batch size it was not traced with) vs torch."""
    size = backbone.spec.input_size
    x = np.random.default_rng(0).integers(0, 256, (3, 3, size, size), dtype=np.uint8)
    ref = backbone.embed(x).astype(np.float64)
    got = session(path, 1).run(None, {INPUT_NAME: x})[0].astype(np.float64)
    if got.shape != ref.shape:
        raise RuntimeError(f"exported ONNX returns {got.shape} for 3 images, torch {ref.shape}")
    denom = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    cos = np.where(denom > 0, (ref * got).sum(1) / np.maximum(denom, 1e-30), 1.0)
    if not np.isfinite(got).all() or cos.min() < min_cosine:
        raise RuntimeError(f"exported ONNX disagrees with torch (min row cosine {cos.min():.5f} < {min_cosine})")
    return float(cos.min())


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path` and rename it over: readers see all of it or nothing."""
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_onnx(backbone: "TorchBackbone", path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                verify: bool = True) -> Path:
    """Export ``backbone`` (uint8 in, normalisation fused, dynamic batch) to ``path``; returns the path.

    Uses the TorchScript-based exporter (fast, single file); falls back to the torch.export-based
    (dynamo) exporter if that fails. With ``verify`` the graph must reproduce the torch embeddings
    (row cosine >= 0.999) at a batch size it was not traced with before it is published. The
    ``.json`` sidecar is written first and the ``.onnx`` is moved into place last, atomically.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = backbone.fused_uint8_module().cpu().eval()
    size = backbone.spec.input_size
    dummy = torch.zeros((2, 3, size, size), dtype=torch.uint8)
    fd, tmp_name = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.onnx", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    exporter = "torchscript"
    t0 = time.perf_counter()
    # nn.MultiheadAttention's inference fast path (_native_multi_head_attention) has no ONNX symbolic
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        try:
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module, (dummy,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    opset_version=opset, do_constant_folding=True, dynamo=False,
                )
        except Exception as first:  # some graphs only trace with torch.export
            _log.info("TorchScript ONNX export failed (%s); trying the dynamo exporter", first)
            exporter = "dynamo"
            batch = torch.export.Dim("batch", min=1, max=4096)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module, (dummy,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_shapes=({0: batch},), opset_version=max(opset, 18), dynamo=True,
                    external_data=False, verbose=False,
                )
        if mha is not None and fastpath is not None:
            mha.set_fastpath_enabled(fastpath)
        export_seconds = round(time.perf_counter() - t0, 3)
        min_cos = _verify(backbone, tmp) if verify else None
        meta = {
            "spec": backbone.spec.to_dict(),
            "fingerprint": backbone.spec.fingerprint_for("onnx", "float32"),
            "torch_fingerprint": backbone.spec.fingerprint,
            "opset": opset,
            "exporter": exporter,
            "torch_version": torch.__version__,
            "export_seconds": export_seconds,
            "verified_min_cosine": min_cos,
            "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["batch", 3, size, size]},
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", backbone.spec.embed_dim]},
        }
        write_atomic(_sidecar(path), json.dumps(meta, indent=2).encode())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if mha is not None and fastpath is not None:
            mha.set_fastpath_enabled(fastpath)
        if tmp.exists():
            tmp.unlink()
    return path


class ExportedGraphBackbone(Backbone):
    """A backbone run from the exported uint8-in graph by a CPU runtime. CLIP text towers, ImageNet
    classifier heads and fine-tuning stay in torch, loaded lazily only if asked for."""

    spec: BackboneSpec
    _allow_download: bool = False
    _torch: "TorchBackbone | None" = None

    def _setup(self, spec: BackboneSpec, path: str | os.PathLike, intra_op_num_threads: int | None,
               batch_size: int, allow_download: bool) -> None:
        from ..devices import cpu_count

        self.spec = spec
        self.path = Path(path)
        self.device = "cpu"
        self.dtype = "float32"
        self.batch_size = int(batch_size)
        self.intra_op_num_threads = int(intra_op_num_threads or cpu_count())
        self._allow_download = allow_download
        self._torch = None

    @classmethod
    def from_export(cls, spec: BackboneSpec, *, cache_dir: str | os.PathLike | None = None,
                    allow_download: bool = False, torch_backbone: "TorchBackbone | None" = None,
                    opset: int = DEFAULT_OPSET, **engine_options: Any):
        """The cached, verified ONNX export for ``spec`` (made from the torch backbone on first
        use) run by this engine; ``engine_options`` go to the engine's constructor."""
        spec, path = ensure_onnx(spec, cache_dir=cache_dir, allow_download=allow_download,
                                 torch_backbone=torch_backbone, opset=opset)
        return cls(spec, path, allow_download=allow_download, **engine_options)

    def _adopt_embed_dim(self, dim: Any) -> None:
        if not self.spec.embed_dim and isinstance(dim, int) and dim > 0:
            self.spec = self.spec.replace(embed_dim=dim)

    def _torch_backbone(self) -> "TorchBackbone":
        if self._torch is None:
            self._torch = loader.load_torch_backbone(self.spec, device="cpu", dtype="float32",
                                              allow_download=self._allow_download)  # type: ignore[assignment]
        return self._torch  # type: ignore[return-value]

    @property
    def supports_text(self) -> bool:
        return bool(self.spec.text)

    def text_embed(self, prompts: Sequence[str]) -> np.ndarray:
        if not self.spec.text:
            return super().text_embed(prompts)
        return self._torch_backbone().text_embed(prompts)

    @property
    def has_classifier(self) -> bool:
        return self.spec.num_classes > 0

    def classify(self, pixels: Any) -> np.ndarray:
        if self.spec.num_classes <= 0:
            return super().classify(pixels)
        return self._torch_backbone().classify(pixels)

    def torch_module(self):
        return self._torch_backbone().torch_module()


class OnnxBackbone(ExportedGraphBackbone):
    """A backbone run by onnxruntime (CPU). Same ``embed`` contract as the torch engine."""

    engine = "onnx"

    def __init__(
        self,
        spec: BackboneSpec,
        path: str | os.PathLike,
        *,
        intra_op_num_threads: int | None = None,
        batch_size: int = 64,
        providers: Sequence[str] | None = None,
        allow_download: bool = False,
        allow_spinning: bool = False,
    ):
        self._setup(spec, path, intra_op_num_threads, batch_size, allow_download)
        self._session = session(self.path, self.intra_op_num_threads, providers, allow_spinning)
        inp = self._session.get_inputs()[0]
        self._input_name = inp.name
        self._output_name = self._session.get_outputs()[0].name
        if inp.type != "tensor(uint8)":
            raise ValueError(f"{self.path} takes {inp.type}, expected uint8 pixels: re-export with export_onnx")
        self._adopt_embed_dim(self._session.get_outputs()[0].shape[-1])

    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run([self._output_name], {self._input_name: batch})[0]


def ensure_onnx(
    spec: BackboneSpec,
    *,
    cache_dir: str | os.PathLike | None = None,
    allow_download: bool = False,
    torch_backbone: "TorchBackbone | None" = None,
    opset: int = DEFAULT_OPSET,
) -> tuple[BackboneSpec, Path]:
    """The cached, verified ONNX export for ``spec`` (made from the torch backbone on first use),
    and the spec with the real ``embed_dim`` / ``params_m`` filled in."""
    if spec.precision != "fp32":  # never hand an INT8 variant the fp32 graph under its fingerprint
        raise ValueError(f"{spec.name} is a {spec.precision} variant: load it with load_backbone "
                         "(pipeline.backbones.quantize.ensure_int8 makes its graph)")
    path = onnx_path(spec, cache_dir, opset=opset)
    if path.is_file():
        try:
            meta = json.loads(_sidecar(path).read_text())
            saved = meta.get("spec", {})
            spec = spec.replace(embed_dim=int(saved.get("embed_dim") or spec.embed_dim),
                                params_m=saved.get("params_m", spec.params_m))
        except (OSError, ValueError):
            pass
        return spec, path
    if torch_backbone is None:
        torch_backbone = loader.load_torch_backbone(spec, device="cpu", dtype="float32",
                                             allow_download=allow_download)  # type: ignore[assignment]
    assert torch_backbone is not None
    export_onnx(torch_backbone, path, opset=opset)
    return torch_backbone.spec, path


def load_onnx_backbone(spec: BackboneSpec, **options: Any) -> OnnxBackbone:
    """The cached ONNX model for ``spec`` (exported from the torch backbone on first use), run in
    onnxruntime. Options: ``cache_dir``, ``allow_download``, ``torch_backbone``, ``opset`` and the
    `OnnxBackbone` constructor's (``intra_op_num_threads``, ``batch_size``, ``allow_spinning``)."""
    return OnnxBackbone.from_export(spec, **options)
