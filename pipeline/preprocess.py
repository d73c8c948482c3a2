"""Image -> uint8 (3, S, S) pixels for a backbone spec: the one preprocessing path for extraction
and serving.

Geometry follows timm / torchvision eval transforms: resize the short side to
``floor(S / crop_pct)`` (``crop_mode="center"``; ``"squash"`` resizes both sides to it, ignoring
aspect), then centre-crop S x S. It is done as ONE PIL resample of just the source region that
survives the crop (``Image.resize(..., box=...)``), with ``reducing_gap`` so large downscales first
use the fast integer ``reduce()``. JPEGs are decoded at a reduced DCT scale (``draft``) that still
covers the resize target. No float conversion: normalisation happens inside the backbone.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Iterable

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.backbones.spec import BackboneSpec

__all__ = ["prepare", "prepare_batch", "load_pixels", "crop_box", "draft_size", "REDUCING_GAP", "RESAMPLE"]

# PIL: "reducing_gap=3.0 is indistinguishable from fair resampling in most cases".
REDUCING_GAP: float | None = 3.0

RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def _resize_size(spec: "BackboneSpec") -> int:
    return int(math.floor(spec.input_size / spec.crop_pct))


def draft_size(spec: "BackboneSpec") -> tuple[int, int]:
    """The smallest decode size that still covers the resize target (for JPEG DCT-scaled decoding)."""
    s = _resize_size(spec)
    return (s, s)


def crop_box(width: int, height: int, spec: "BackboneSpec") -> tuple[float, float, float, float]:
    """Source-image region (left, upper, right, lower) that resize-then-centre-crop keeps.

    Mirrors torchvision: Resize(int) keeps aspect with ``long = int(short_target * long / short)``;
    CenterCrop offsets are ``int(round((dim - S) / 2))``.
    """
    size = spec.input_size
    target = _resize_size(spec)
    if spec.crop_mode == "squash":
        new_w = new_h = target
    elif width <= height:
        new_w, new_h = target, int(target * height / width)
    else:
        new_w, new_h = int(target * width / height), target
    new_w, new_h = max(new_w, size), max(new_h, size)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


def prepare(img: Image.Image, spec: "BackboneSpec", *, reducing_gap: float | None = REDUCING_GAP) -> np.ndarray:
    """PIL image -> C-contiguous uint8 (3, S, S) at ``spec.input_size`` (see module docstring)."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"prepare expects a PIL image (use load_pixels for paths/bytes), got {type(img).__name__}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    if width < 1 or height < 1:
        raise ValueError(f"cannot prepare an empty image ({width}x{height})")
    try:
        resample = RESAMPLE[spec.interpolation]
    except KeyError:
        raise ValueError(f"unsupported interpolation {spec.interpolation!r}; use one of {sorted(RESAMPLE)}") from None
    size = spec.input_size
    box = crop_box(width, height, spec)
    out = img.resize((size, size), resample, box=box, reducing_gap=reducing_gap)
    hwc = np.asarray(out, dtype=np.uint8)
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def prepare_batch(images: Iterable[Image.Image], spec: "BackboneSpec") -> np.ndarray:
    """Several PIL images -> uint8 (N, 3, S, S)."""
    arrays = [prepare(im, spec) for im in images]
    if not arrays:
        return np.zeros((0, 3, spec.input_size, spec.input_size), dtype=np.uint8)
    return np.stack(arrays)


def load_pixels(
    source: str | os.PathLike | bytes,
    spec: "BackboneSpec",
    *,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Path or bytes -> uint8 (3, S, S): `pipeline.images.open_image` (JPEG draft-decoded at the
    resize target) + `prepare`. Undecodable input raises `ImageValidationError`."""
    from pipeline.images import DEFAULT_MAX_PIXELS, open_image

    img = open_image(source, max_pixels=max_pixels or DEFAULT_MAX_PIXELS, draft_size=draft_size(spec))
    return prepare(img, spec)
