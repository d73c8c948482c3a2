"""One image decoder for intake, extraction and serving.

`open_image` turns a path or raw bytes into a fully decoded RGB `PIL.Image.Image`, or raises
`ImageValidationError` with a short `code`.  Intake uses `inspect_image`, which runs the same
decode (at a reduced JPEG DCT scale, which still entropy-decodes the whole stream, so
truncation is caught) and reports the full-resolution size.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own bomb limit; configurable everywhere

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff",
     ".ppm", ".pgm", ".pbm", ".pnm", ".avif", ".heic", ".heif", ".jp2", ".j2k"}
)

# The file extension images of each sniffed format are stored under (captures, support
# examples, images materialised from a Hugging Face dataset), so a folder of them can be fed back to intake.
FORMAT_EXTENSIONS: dict[str, str] = {
    "JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp",
    "PPM": ".ppm", "AVIF": ".avif", "HEIF": ".heic", "JPEG2000": ".jp2",
}

ERROR_CODES: tuple[str, ...] = (
    "empty",
    "not_image",
    "truncated",
    "corrupt",
    "too_many_pixels",
    "unsupported_mode",
    "unreadable",
)

# Leading bytes of the formats we expect; used to tell "not an image" from "a broken image".
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (b"\xffO\xffQ", "JPEG2000"),  # a bare J2K codestream
)
# ISO base media `ftyp` brands (bytes 8..12) of still images
_FTYP_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIF", b"heix": "HEIF", b"heim": "HEIF",
                b"heis": "HEIF", b"hevc": "HEIF", b"hevx": "HEIF", b"mif1": "HEIF", b"msf1": "HEIF"}

_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


class ImageValidationError(ValueError):
    """An image could not be decoded; `code` is a short slug from `ERROR_CODES`."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # keep code across pickling (process pools, Ray)
        return (type(self), (self.code, str(self)))


@dataclass(frozen=True)
class ImageInfo:
    """What intake records about a decodable image (size after EXIF orientation)."""

    width: int
    height: int
    format: str
    mode: str
    n_frames: int


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of raw bytes: the content key used by intake and the feature store."""
    return hashlib.sha256(data).hexdigest()


def sniff_format(data: bytes) -> str | None:
    """Format name from the leading bytes (a key of `FORMAT_EXTENSIONS`) or None."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if len(data) >= 12 and data[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(bytes(data[8:12]))
    if len(data) >= 3 and data[:1] == b"P" and data[1:2] in b"123456" and data[2:3] in b" \t\r\n":
        return "PPM"  # Netpbm: PBM / PGM / PPM, ASCII or binary
    return None


def file_extension(data: bytes, default: str = ".bin") -> str:
    """The extension (with its dot) to store these image bytes under: by sniffed format."""
    return FORMAT_EXTENSIONS.get(sniff_format(data) or "", default)


@functools.cache
def _register_decoders() -> None:
    """HEIC/HEIF (phone photos) decode through pillow-heif's PIL plugin; PIL reads the rest itself.
    Registered on first use, not at import."""
    try:
        import pillow_heif
    except ImportError:  # a declared dependency; without it HEIC files fail with the fix named
        return
    pillow_heif.register_heif_opener()


def _read_source(source: str | os.PathLike | bytes | bytearray | memoryview) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "<bytes>"
    path = os.fspath(source)
    shown = os.fsdecode(path)
    try:
        with open(path, "rb") as fh:
            return fh.read(), shown
    except FileNotFoundError as exc:
        raise ImageValidationError("unreadable", f"{shown!r}: no such file ({exc.strerror})") from exc
    except IsADirectoryError as exc:
        raise ImageValidationError("unreadable", f"{shown!r} is a directory, not an image") from exc
    except OSError as exc:
        raise ImageValidationError(
            "unreadable", f"{shown!r} cannot be read: {exc.strerror or exc}"
        ) from exc


def _too_many(shown: str, pixels: int | None, max_pixels: int, detail: str = "") -> ImageValidationError:
    size = f"{pixels:,} pixels" if pixels is not None else "its declared size"
    return ImageValidationError(
        "too_many_pixels",
        f"{shown}: {size} exceeds the limit of {max_pixels:,} pixels (possible decompression "
        f"bomb){detail}; raise max_pixels if this image is genuine",
    )


def _open_lazy(data: bytes, shown: str, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageValidationError("empty", f"{shown}: file is empty (0 bytes)")
    _register_decoders()
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        detail = ""
        if Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
            detail = " (PIL's own limit PIL.Image.MAX_IMAGE_PIXELS also applies; raise it too)"
        raise _too_many(shown, None, max_pixels, detail + f" [{exc}]") from exc
    except Image.DecompressionBombWarning as exc:  # warnings configured as errors
        raise _too_many(shown, None, max_pixels, f" [{exc}]") from exc
    except UnidentifiedImageError as exc:
        fmt = sniff_format(data)
        if fmt is None:
            raise ImageValidationError(
                "not_image", f"{shown}: not an image file (no known image signature)"
            ) from exc
        if fmt == "HEIF" and "HEIF" not in Image.OPEN:
            raise ImageValidationError(
                "unreadable", f"{shown}: a HEIC/HEIF image, and the pillow-heif package that decodes "
                "it is not installed (pip install pillow-heif), or convert it to JPEG") from exc
        raise ImageValidationError(
            "corrupt", f"{shown}: starts like a {fmt} file but its header cannot be parsed"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise _classify_decode_error(shown, exc) from exc
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageValidationError("corrupt", f"{shown}: declared size {w}x{h} is invalid")
    if w * h > max_pixels:
        raise _too_many(shown, w * h, max_pixels, f" ({w}x{h})")
    return im


def _classify_decode_error(shown: str, exc: BaseException) -> ImageValidationError:
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, MemoryError):
        return ImageValidationError("too_many_pixels", f"{shown}: ran out of memory decoding ({msg})")
    if "image file is truncated" in msg or isinstance(exc, EOFError):
        return ImageValidationError("truncated", f"{shown}: file ends before the image data does ({msg})")
    return ImageValidationError("corrupt", f"{shown}: image data is corrupt ({msg})")


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if value in range(1, 9) else 1
    except Exception:  # malformed EXIF: ignore orientation rather than reject the photo
        return 1


def _load(im: Image.Image, shown: str, draft_size: tuple[int, int] | None, orientation: int) -> None:
    if draft_size is not None and im.format in ("JPEG", "MPO"):
        w, h = int(draft_size[0]), int(draft_size[1])
        if orientation in _SWAPPING_ORIENTATIONS:
            w, h = h, w  # draft_size is in display orientation, the file is stored rotated
        if w > 0 and h > 0:
            im.draft(None, (w, h))
    try:
        im.seek(0)  # first frame of animations
        im.load()
    except Image.DecompressionBombError as exc:
        raise ImageValidationError("too_many_pixels", f"{shown}: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as exc:
        raise _classify_decode_error(shown, exc) from exc


_PNG_IEND = b"IEND\xaeB`\x82"


def _verify_png(im: Image.Image, data: bytes, shown: str) -> None:
    try:
        im.verify()
    except Exception as exc:  # SyntaxError ("broken PNG file"), OSError, EOFError, struct.error
        if not data.rstrip(b"\x00").endswith(_PNG_IEND):
            raise ImageValidationError(
                "truncated", f"{shown}: PNG ends before its IEND chunk ({exc})") from exc
        raise ImageValidationError("corrupt", f"{shown}: PNG chunk check failed ({exc})") from exc


def _sixteen_bit_to_rgb(im: Image.Image) -> Image.Image:
    arr = np.asarray(im)
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        top = float(finite.max()) if finite.size else 0.0
        scale = 255.0 if top <= 1.0 else 1.0
        out = np.clip(np.nan_to_num(arr * scale), 0, 255)
    else:
        arr = arr.astype(np.int64)
        if im.mode.startswith("I;16") or int(arr.max(initial=0)) > 255:
            out = np.clip(arr, 0, 65535) / 257.0
        else:
            out = np.clip(arr, 0, 255)
    gray = np.rint(out).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")


def _composite_on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(im: Image.Image, shown: str) -> Image.Image:
    mode = im.mode
    try:
        if mode == "RGB":
            return im
        if mode == "P":
            if "transparency" in im.info:
                return _composite_on_white(im)
            return im.convert("RGB")
        if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            return _composite_on_white(im)
        if mode.startswith("I") or mode == "F":
            return _sixteen_bit_to_rgb(im)
        if mode in ("1", "L", "CMYK", "YCbCr", "RGBX"):
            return im.convert("RGB")
        return im.convert("RGB")
    except (ValueError, OSError, TypeError) as exc:
        raise ImageValidationError(
            "unsupported_mode", f"{shown}: cannot convert image mode {mode!r} to RGB ({exc})"
        ) from exc


def _decode(
    source: str | os.PathLike | bytes,
    max_pixels: int,
    draft_size: tuple[int, int] | None,
) -> tuple[Image.Image, ImageInfo]:
    data, shown = _read_source(source)
    try:
        return _decode_bytes(data, shown, max_pixels, draft_size)
    except ImageValidationError:
        raise
    except MemoryError as exc:
        raise ImageValidationError("too_many_pixels", f"{shown}: not enough memory to decode it ({exc})") from exc
    except Exception as exc:  # a decoder's unexpected failure on crafted bytes: still a bad file
        raise ImageValidationError(
            "corrupt", f"{shown}: the image decoder failed on this file ({type(exc).__name__}: {exc})") from exc


def _decode_bytes(data: bytes, shown: str, max_pixels: int,
                  draft_size: tuple[int, int] | None) -> tuple[Image.Image, ImageInfo]:
    im = _open_lazy(data, shown, max_pixels)
    if im.format == "PNG":
        # PIL's PNG decoder can turn a damaged zlib stream into black pixels without an error;
        # verify() checks every chunk's CRC. verify() consumes the image, so open it again.
        _verify_png(im, data, shown)
        im = _open_lazy(data, shown, max_pixels)
    fmt = im.format or "unknown"
    n_frames = int(getattr(im, "n_frames", 1) or 1)
    orientation = _orientation(im)
    w, h = im.size
    if orientation in _SWAPPING_ORIENTATIONS:
        w, h = h, w
    info = ImageInfo(width=w, height=h, format=fmt, mode=im.mode, n_frames=n_frames)
    _load(im, shown, draft_size, orientation)
    if orientation != 1:
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:
            pass  # malformed EXIF: keep the stored orientation
    return _to_rgb(im, shown), info


def open_image(
    source: str | os.PathLike | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode `source` (path or bytes) into a fully loaded RGB image.

    EXIF orientation is applied, animations give their first frame, CMYK / palette (with
    transparency composited on white) / 16-bit / grayscale / LA become RGB.  `draft_size`
    (width, height) lets JPEGs decode at a reduced DCT scale, never below that size.
    Every failure raises `ImageValidationError` with a `code` from `ERROR_CODES`.
    Note: PIL's global `PIL.Image.MAX_IMAGE_PIXELS` (x2) still bounds what PIL will open.
    """
    image, _ = _decode(source, max_pixels, draft_size)
    return image


def inspect_image(
    source: str | os.PathLike | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImageInfo:
    """Fully decode `source` (JPEGs at 1/8 DCT scale, which still reads every coefficient) and
    return its full-resolution size after EXIF orientation.  Raises `ImageValidationError`."""
    _, info = _decode(source, max_pixels, draft_size=(1, 1))
    return info
