"""INT8 variants: post-training quantization of a backbone's exported graph, calibrated on a
fixed, seeded sample of the user's own training images.

* OpenVINO engine: NNCF (`nncf.quantize`) on the OpenVINO model read from the cached uint8-in
  ONNX export, saved as IR (``.xml`` + ``.bin``); ONNX Runtime engine: ORT's static
  quantization (QDQ, per-channel weights, MinMax calibration) to an ``.onnx``.
* Calibration: `calibration_sample` draws at most `MAX_CALIBRATION` images by content id with a
  fixed seed, decoded through the spec's own preprocessing (`pipeline.preprocess.load_pixels`);
  `calibration_id` (sha256 of the sorted content ids) becomes the spec's ``calibration`` and so
  part of the INT8 feature set's fingerprint.
* Recipe, chosen for accuracy on this project's data (measured on EfficientNet-Lite0 and
  clothing-small photos, mean row cosine to fp32): with NNCF depthwise convolutions stay fp32
  (0.980 -> 0.986), and on CPUs without VNNI/AMX the weights use 7 bits (NNCF's overflow fix,
  ORT's reduce_range; 0.968 -> 0.980): AVX2's u8 x s8 multiply-add saturates at 16 bits
  otherwise. ORT's static quantization reaches only ~0.89 on Lite0 (excluding its depthwise
  convolutions makes it worse, 0.81), so there the check below refuses it: OpenVINO is the INT8
  engine ("auto" picks it).
* Cache: beside the fp32 export, named for (export, calibration, engine, tool versions + recipe):
  ``onnx/<export>.int8-<calibration[:16]>-<engine>-<tool key>.{xml,onnx}`` with a ``.json``
  sidecar (sample ids, versions, seconds, cosine to fp32). Same sample + same tools -> same key ->
  the cached model, never a second quantization. A model made by other tool versions (a bundled
  predictor on another machine) is used when no calibration images are at hand to make a new one.
* Before a quantized model is published it must agree with the fp32 graph on the calibration
  images (mean row cosine >= `MIN_MEAN_COSINE`); a recipe that breaks a backbone fails loudly.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .onnx_runtime import INPUT_NAME, ensure_onnx, onnx_path, session, write_atomic
from .spec import BackboneSpec

if TYPE_CHECKING:  # pragma: no cover
    from .torch_base import TorchBackbone

__all__ = ["MAX_CALIBRATION", "MIN_MEAN_COSINE", "QuantizationUnavailable", "bundle_int8", "calibration_id",
           "calibration_sample", "calibrate", "ensure_int8", "find_int8", "adopt_bundled", "int8_path",
           "has_vnni", "recipe"]

MAX_CALIBRATION = 300
#: an INT8 graph whose embeddings stray further than this from fp32 (mean row cosine on the
#: calibration images) is refused
MIN_MEAN_COSINE = 0.95
#: bump when the recipe below changes the quantized numbers
RECIPE_VERSION = 1
SUFFIX = {"openvino": ".xml", "onnx": ".onnx"}
_log = logging.getLogger(__name__)


class QuantizationUnavailable(RuntimeError):
    """No quantized model for a spec in the cache, and no calibration images to make one."""


def calibration_sample(files: Sequence[tuple[str, str]], *, n: int = MAX_CALIBRATION, seed: int = 0
                       ) -> list[tuple[str, str]]:
    """At most ``n`` (content id, path) pairs drawn with ``seed``, sorted by content id: the same
    images give the same sample whatever order they are listed in."""
    by_key: dict[str, str] = {}
    for key, path in files:
        by_key.setdefault(str(key), str(path))
    keys = sorted(by_key)
    if len(keys) > n:
        pick = np.random.default_rng(seed).permutation(len(keys))[:n]
        keys = sorted(keys[i] for i in pick)
    return [(k, by_key[k]) for k in keys]


def calibration_id(keys: Sequence[str]) -> str:
    """sha256 over the sorted content ids of a calibration sample."""
    return hashlib.sha256("\n".join(sorted(map(str, keys))).encode()).hexdigest()


def has_vnni() -> bool:
    """Whether this CPU has INT8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX)."""
    from pipeline.latency import cpu_flags

    flags = set(cpu_flags())
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "avx512vnni"})


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def recipe(engine: str) -> dict[str, Any]:
    """What the quantization of `engine`'s graph depends on besides the export and the sample."""
    if engine not in SUFFIX:
        raise ValueError(f"INT8 runs on engine 'openvino' or 'onnx', got {engine!r}")
    tools = ("nncf", "openvino") if engine == "openvino" else ("onnxruntime", "onnx")
    return {"recipe": RECIPE_VERSION, "engine": engine, **{t: _version(t) for t in tools},
            "seven_bit_weights": not has_vnni(), "depthwise": "fp32" if engine == "openvino" else "int8"}


def _stem(spec: BackboneSpec, cache_dir: str | os.PathLike | None) -> Path:
    if spec.precision != "int8" or not spec.calibration:
        raise ValueError(f"{spec.name}: an INT8 model needs an int8 spec with a calibration id "
                         "(extract it with calibration images: jobs.extract.extract_features(..., calibration=...))")
    export = onnx_path(spec.as_fp32(), cache_dir)
    return export.with_name(f"{export.stem}.int8-{spec.calibration[:16]}")  # beside the fp32 export


def int8_path(spec: BackboneSpec, engine: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where this machine's tools put the quantized model for ``spec`` (int8, calibrated)."""
    key = hashlib.sha256(json.dumps(recipe(engine), sort_keys=True).encode()).hexdigest()[:12]
    stem = _stem(spec, cache_dir)
    return stem.with_name(f"{stem.name}-{engine}-{key}{SUFFIX[engine]}")


def find_int8(spec: BackboneSpec, engine: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The quantized model for ``spec`` in the cache: this machine's tools' own, else (newest
    first) one made for the same export and sample by other tool versions, else None."""
    exact = int8_path(spec, engine, cache_dir)
    if _complete(exact):
        return exact
    stem = _stem(spec, cache_dir)
    others = sorted((p for p in stem.parent.glob(f"{stem.name}-{engine}-*{SUFFIX[engine]}") if _complete(p)),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    return others[0] if others else None


def _complete(path: Path) -> bool:
    """The model file and what it needs are all there (the ``.xml`` is published last)."""
    return path.is_file() and (path.suffix != ".xml" or path.with_suffix(".bin").is_file())


def _files(path: Path) -> list[Path]:
    extra = [path.with_suffix(".bin")] if path.suffix == ".xml" else []
    return [p for p in extra + [path.with_suffix(".json"), path] if p.is_file()]


def ensure_int8(
    spec: BackboneSpec,
    engine: str,
    *,
    calibration_paths: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_download: bool = False,
    torch_backbone: "TorchBackbone | None" = None,
) -> tuple[BackboneSpec, Path]:
    """The quantized model for ``spec`` (int8, with its calibration id) on ``engine``, made from
    the fp32 export and ``calibration_paths`` (the images ``spec.calibration`` names) when the
    cache has none; returns the spec with the export's ``embed_dim`` / ``params_m`` and the path."""
    exact = int8_path(spec, engine, cache_dir)
    # with calibration images at hand only this machine's tools' own model will do; without, one
    # made by other versions for the same export and sample (a bundled predictor) is used
    found = exact if _complete(exact) else None if calibration_paths else find_int8(spec, engine, cache_dir)
    if found is not None:  # no fp32 export needed (a bundled predictor serving elsewhere has none)
        if found != exact:
            _log.info("%s: using the INT8 model %s made by other tool versions", spec.name, found.name)
        try:
            saved = json.loads(found.with_suffix(".json").read_text()).get("spec", {})
            spec = spec.replace(embed_dim=int(saved.get("embed_dim") or spec.embed_dim),
                                params_m=saved.get("params_m", spec.params_m))
        except (OSError, ValueError):
            pass
        return spec, found
    if not calibration_paths:
        raise QuantizationUnavailable(
            f"{spec.name}: no INT8 model for calibration {spec.calibration[:16]} in "
            f"{_stem(spec, cache_dir).parent}; extract the variant again with its calibration images "
            "(tlpipe run --precision int8)")
    base, export = ensure_onnx(spec.as_fp32(), cache_dir=cache_dir, allow_download=allow_download,
                               torch_backbone=torch_backbone)
    spec = spec.replace(embed_dim=base.embed_dim, params_m=base.params_m)
    path = int8_path(spec, engine, cache_dir)
    calibrate(export, spec, list(calibration_paths), engine, path)
    return spec, path


def _pixels(spec: BackboneSpec, paths: Sequence[str]) -> np.ndarray:
    """The calibration images through the spec's own preprocessing (undecodable ones left out)."""
    from pipeline.images import ImageValidationError
    from pipeline.preprocess import load_pixels

    out = []
    for p in paths:
        try:
            out.append(load_pixels(p, spec))
        except (ImageValidationError, OSError) as exc:
            _log.warning("%s: calibration image %s left out (%s)", spec.name, p, exc)
    if not out:
        raise ValueError(f"{spec.name}: none of the {len(paths)} calibration images decodes")
    return np.stack(out)


def calibrate(export: Path, spec: BackboneSpec, paths: Sequence[str], engine: str, out: Path) -> Path:
    """Quantize ``export`` on the images at ``paths``, check it against fp32, publish it at ``out``."""
    pixels = _pixels(spec, paths)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".int8-") as tmp:
        staged = Path(tmp) / out.name
        if engine == "openvino":
            _quantize_openvino(export, pixels, staged)
        else:
            _quantize_onnx(export, pixels, staged)
        seconds = time.perf_counter() - t0
        cos = _agreement(export, staged, engine, pixels[:64])
        if cos.mean() < MIN_MEAN_COSINE:
            raise RuntimeError(
                f"{spec.name}: the INT8 model disagrees with fp32 (mean row cosine {cos.mean():.4f} < "
                f"{MIN_MEAN_COSINE}) on its calibration images; use --precision fp32 for this backbone")
        meta = {"spec": spec.to_dict(), "export": export.name, "engine": engine, **recipe(engine),
                "calibration": spec.calibration, "calibration_images": len(pixels),
                "quantize_seconds": round(seconds, 3), "cosine_to_fp32_mean": float(cos.mean()),
                "cosine_to_fp32_min": float(cos.min())}
        write_atomic(out.with_suffix(".json"), json.dumps(meta, indent=2).encode())
        for part in _files(staged):  # the .xml (what `find_int8` looks for) goes last
            os.replace(part, out.with_name(out.stem + part.suffix))
    _log.info("%s: INT8 (%s) on %d calibration images in %.1fs, cosine to fp32 mean %.4f",
              spec.name, engine, len(pixels), seconds, cos.mean())
    return out


def _quantize_openvino(export: Path, pixels: np.ndarray, out: Path) -> None:
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    from .openvino_runtime import core

    model = core().read_model(str(export))
    depthwise = [op.get_friendly_name() for op in model.get_ordered_ops()
                 if op.get_type_name() == "GroupConvolution"]
    overflow = OverflowFix.ENABLE if recipe("openvino")["seven_bit_weights"] else OverflowFix.FIRST_LAYER
    quantized = nncf.quantize(
        model, nncf.Dataset([pixels[i:i + 1] for i in range(len(pixels))]), subset_size=len(pixels),
        preset=nncf.QuantizationPreset.PERFORMANCE,
        ignored_scope=nncf.IgnoredScope(names=depthwise, validate=False),
        advanced_parameters=AdvancedQuantizationParameters(overflow_fix=overflow))
    ov.save_model(quantized, str(out), compress_to_fp16=False)


class _Reader:
    """ORT's CalibrationDataReader protocol over a uint8 batch, one image at a time."""

    def __init__(self, pixels: np.ndarray):
        self._it = iter(pixels[i:i + 1] for i in range(len(pixels)))

    def get_next(self):
        batch = next(self._it, None)
        return None if batch is None else {INPUT_NAME: batch}


def _quantize_onnx(export: Path, pixels: np.ndarray, out: Path) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(export), str(out), _Reader(pixels), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=recipe("onnx")["seven_bit_weights"],
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)


def _agreement(export: Path, quantized: Path, engine: str, pixels: np.ndarray) -> np.ndarray:
    """Row cosines of INT8 vs fp32 embeddings (the fp32 export in ONNX Runtime)."""
    ref = session(export, 1).run(None, {INPUT_NAME: pixels})[0].astype(np.float64)
    if engine == "openvino":
        from .openvino_runtime import core

        compiled = core().compile_model(core().read_model(str(quantized)), "CPU",
                                        {"INFERENCE_PRECISION_HINT": "f32"})
        got = np.asarray(compiled.create_infer_request().infer({0: pixels})[0], dtype=np.float64)
    else:
        got = session(quantized, 1).run(None, {INPUT_NAME: pixels})[0].astype(np.float64)
    denom = np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1), 1e-30)
    cos = (ref * got).sum(1) / denom
    return np.where(np.isfinite(cos), cos, -1.0)


def bundle_int8(spec: BackboneSpec, dest: str | os.PathLike, cache_dir: str | os.PathLike | None = None
                ) -> list[Path]:
    """Copy every engine's quantized model for ``spec`` from the cache into ``dest`` (a saved
    predictor's ``int8/``, so it serves where the calibration images are not); the copied files."""
    dest = Path(dest)
    copied: list[Path] = []
    for engine in SUFFIX:
        found = find_int8(spec, engine, cache_dir)
        if found is None:
            continue
        dest.mkdir(parents=True, exist_ok=True)
        for part in _files(found):
            shutil.copy2(part, dest / part.name)
            copied.append(dest / part.name)
    return copied


def adopt_bundled(spec: BackboneSpec, source: str | os.PathLike, cache_dir: str | os.PathLike | None = None
                  ) -> list[Path]:
    """Copy ``spec``'s quantized models from a predictor's ``int8/`` into the cache where
    `find_int8` (and so every `load_backbone` on this machine, serving replicas included) finds
    them; files already there are kept. Returns the paths written."""
    source = Path(source)
    stem = _stem(spec, cache_dir)
    written: list[Path] = []
    for model in sorted(source.glob(f"{stem.name}-*")):
        if model.suffix not in SUFFIX.values():
            continue
        target = stem.parent / model.name
        if _complete(target):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        for part in _files(model):  # model file last, as `calibrate` publishes it
            write_atomic(target.with_suffix(part.suffix), part.read_bytes())
            written.append(target.with_suffix(part.suffix))
    return written
