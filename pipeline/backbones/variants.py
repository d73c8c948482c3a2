"""Variants of a backbone: the same weights at another input size and/or precision.

A variant is a backbone spec of its own, named ``<base>@<size>``, ``<base>@int8`` or
``<base>@<size>-int8``: its ``input_size`` (and with it the resize/crop of `pipeline.preprocess`,
derived from the spec's ``crop_pct``) and ``precision`` enter the fingerprint, so extraction, the
feature store, the sweep and selection treat it like any other backbone, with its own features,
measured latency and candidates.

An INT8 variant also names the sample its quantization was calibrated on (``calibration``, see
``quantize.py``); that is known only once extraction has drawn it from the user's training
images, so extraction `remember`s the calibrated spec in this process and `get_spec` of the
variant's name returns it from then on (the sweep looks its feature sets up by name).
"""
from __future__ import annotations

import threading
from typing import Iterable, Sequence

from .spec import PRECISIONS, VARIANT_SEP, BackboneSpec, split_variant

__all__ = ["expand", "variant_name", "variant_of", "remember", "remembered", "parse_sizes", "parse_precisions"]

_LOCK = threading.Lock()
_CALIBRATED: dict[str, BackboneSpec] = {}


def variant_name(base: str, *, size: int | None = None, precision: str | None = None) -> str:
    """``base`` with the suffix for a size (None: the spec's own) and a precision (None/fp32: none)."""
    parts = [str(size)] if size else []
    if precision and precision != "fp32":
        parts.append(precision)
    return f"{base}{VARIANT_SEP}{'-'.join(parts)}" if parts else base


def variant_of(spec: BackboneSpec, *, size: int | None = None, precision: str | None = None) -> BackboneSpec:
    """The spec of ``spec``'s weights at input ``size`` (None or its own size: unchanged) in
    ``precision`` (None: fp32). ``spec`` is a plain (non-variant) spec; an INT8 variant has no
    calibration yet (extraction adds it)."""
    base, own_size, own_precision = split_variant(spec.name)
    if own_size or own_precision:
        raise ValueError(f"{spec.name!r} is a variant already; make variants of {base!r}")
    size = int(size) if size and int(size) != spec.input_size else None
    precision = precision or "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if size is None and precision == "fp32":
        return spec
    return spec.replace(name=variant_name(base, size=size, precision=precision),
                        input_size=size or spec.input_size, precision=precision, calibration="")


def remember(spec: BackboneSpec) -> BackboneSpec:
    """Make `get_spec(spec.name)` return this calibrated INT8 spec in this process."""
    with _LOCK:
        _CALIBRATED[spec.name] = spec
    return spec


def remembered(name: str) -> BackboneSpec | None:
    with _LOCK:
        return _CALIBRATED.get(name)


def parse_sizes(values: Iterable[str | int] | str | None) -> list[int]:
    """``"160,192,224"`` / ``["160", 224]`` -> [160, 192, 224] (order kept, repeats dropped)."""
    if values is None:
        return []
    items = values.split(",") if isinstance(values, str) else [
        p for v in values for p in (v.split(",") if isinstance(v, str) else [v])]
    out: list[int] = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        if not text.isdigit() or int(text) < 8:
            raise ValueError(f"--sizes takes input sizes in pixels (integers >= 8, e.g. 160,224), got {text!r}")
        if int(text) not in out:
            out.append(int(text))
    return out


def parse_precisions(values: Iterable[str] | str | None) -> list[str]:
    """``"fp32,int8"`` -> ["fp32", "int8"] (order kept, repeats dropped)."""
    if values is None:
        return []
    items = values.split(",") if isinstance(values, str) else [p for v in values for p in str(v).split(",")]
    out: list[str] = []
    for item in (i.strip().lower() for i in items):
        if not item:
            continue
        if item not in PRECISIONS:
            raise ValueError(f"--precision takes {', '.join(PRECISIONS)} (comma list), got {item!r}")
        if item not in out:
            out.append(item)
    return out


def expand(specs: Sequence[BackboneSpec], sizes: Sequence[int] = (), precisions: Sequence[str] = ()
           ) -> list[BackboneSpec]:
    """Every (spec, size, precision) combination, spec-major: no sizes means each spec's own,
    no precisions means fp32."""
    out: list[BackboneSpec] = []
    for spec in specs:
        for size in (list(sizes) or [None]):
            for precision in (list(precisions) or ["fp32"]):
                v = variant_of(spec, size=size, precision=precision)
                if v.name not in {o.name for o in out}:
                    out.append(v)
    return out
