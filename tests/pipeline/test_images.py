"""pipeline.images: one decoder, every failure a coded ImageValidationError."""

from __future__ import annotations

import hashlib
import io
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.images import (
    DEFAULT_MAX_PIXELS,
    ERROR_CODES,
    IMAGE_EXTENSIONS,
    ImageValidationError,
    inspect_image,
    open_image,
    sha256_bytes,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from malformed_corpus import EXIF_SIZE, forged_bomb_png, huge_one_bit_png, make_malformed_corpus  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, make_malformed_corpus(root)


def _jpeg(size: tuple[int, int], seed: int = 0, **kwargs) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def test_constants_and_hash():
    assert DEFAULT_MAX_PIXELS == 89_478_485
    assert {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"} <= IMAGE_EXTENSIONS
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)
    assert sha256_bytes(b"abc") == hashlib.sha256(b"abc").hexdigest()
    err = pickle.loads(pickle.dumps(ImageValidationError("truncated", "cut short")))
    assert err.code == "truncated" and str(err) == "cut short" and isinstance(err, ValueError)


def test_corpus_files_decode_or_fail_with_their_code(corpus):
    root, expected = corpus
    file_codes = {"empty", "not_image", "truncated", "corrupt", "too_many_pixels"}
    seen_codes = set()
    for rel, outcome in expected.items():
        path = root / rel
        if outcome in ("ok", "duplicate", "label_conflict"):
            im = open_image(path)
            assert im.mode == "RGB", rel
            assert im.size[0] > 0 and im.size[1] > 0
            np.asarray(im)  # pixels are loaded
        elif outcome in file_codes:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with pytest.raises(ImageValidationError) as info:
                    open_image(path)
            assert info.value.code == outcome, (rel, str(info.value))
            assert info.value.code in ERROR_CODES
            seen_codes.add(outcome)
    assert seen_codes == file_codes


def test_bytes_and_path_give_the_same_pixels(corpus):
    root, _ = corpus
    path = root / "cat" / "valid_0.jpg"
    a = np.asarray(open_image(path))
    b = np.asarray(open_image(path.read_bytes()))
    c = np.asarray(open_image(str(path)))
    assert a.shape == (24, 32, 3)
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_exif_orientation_swaps_width_and_height(corpus):
    root, _ = corpus
    raw = Image.open(root / "dog" / "exif_rotated.jpg")
    assert raw.size == EXIF_SIZE  # stored landscape
    im = open_image(root / "dog" / "exif_rotated.jpg")
    assert im.size == (EXIF_SIZE[1], EXIF_SIZE[0])  # displayed portrait
    info = inspect_image(root / "dog" / "exif_rotated.jpg")
    assert (info.width, info.height) == (EXIF_SIZE[1], EXIF_SIZE[0])
    # orientation 6 = rotate 90 deg clockwise: displayed top-left is stored bottom-left
    stored = np.asarray(raw.convert("RGB")).astype(int)
    shown = np.asarray(im).astype(int)
    assert np.abs(shown[0, 0] - stored[-1, 0]).sum() < np.abs(shown[0, 0] - stored[0, 0]).sum() + 60


def test_cmyk_palette_16bit_gray_la_become_sane_rgb(corpus):
    root, _ = corpus
    cmyk = np.asarray(open_image(root / "cat" / "cmyk.jpg")).astype(int)
    assert cmyk.shape == (24, 32, 3)
    r, g, b = cmyk[12, 16]
    assert r > 200 and g < 60 and b < 60  # C=0 M=255 Y=255 K=0 is red

    g16 = np.asarray(open_image(root / "cat" / "gray16.png")).astype(int)
    assert g16.shape == (16, 64, 3)
    assert np.array_equal(g16[..., 0], g16[..., 1]) and np.array_equal(g16[..., 1], g16[..., 2])
    row = g16[0, :, 0]
    assert row[0] == 0 and row[-1] == 255  # 0..65535 scaled to 0..255, not clipped
    assert 100 < row[32] < 160 and np.all(np.diff(row) >= 0)

    pal = np.asarray(open_image(root / "cat" / "palette_transparent.png")).astype(int)
    assert tuple(pal[5, 2]) == (255, 255, 255)  # transparent index composited on white
    assert tuple(pal[5, 30]) == (0, 0, 255)

    gray = np.asarray(open_image(root / "dog" / "grayscale.jpg"))
    assert gray.shape == (24, 32, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    la = np.asarray(open_image(root / "dog" / "la_alpha.png"))
    assert np.all(la == 255)  # fully transparent LA -> white


def test_animations_give_first_frame(corpus):
    root, _ = corpus
    for name in ("animated.gif", "animated.webp"):
        px = np.asarray(open_image(root / "dog" / name)).astype(int)[5, 5]
        assert px[0] > 200 and px[1] < 60 and px[2] < 60, name


def test_decompression_bombs_are_clean_too_many_pixels():
    bomb = forged_bomb_png()
    with pytest.raises(ImageValidationError) as info:
        open_image(bomb)  # PIL's DecompressionBombError
    assert info.value.code == "too_many_pixels"
    huge = huge_one_bit_png()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # warning raised as error
        with pytest.raises(ImageValidationError) as info:
            open_image(huge)
    assert info.value.code == "too_many_pixels"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageValidationError) as info:
            open_image(huge)  # our own limit, checked before decoding
    assert info.value.code == "too_many_pixels" and "90,250,000" in str(info.value)


def test_max_pixels_is_configurable():
    data = _jpeg((100, 80))
    assert open_image(data, max_pixels=8000).size == (100, 80)
    with pytest.raises(ImageValidationError) as info:
        open_image(data, max_pixels=7999)
    assert info.value.code == "too_many_pixels"
    with pytest.raises(ImageValidationError):
        inspect_image(data, max_pixels=100)


def test_draft_size_reduces_jpeg_decode_but_never_below_request():
    data = _jpeg((400, 300))
    assert open_image(data).size == (400, 300)
    for req in [(50, 37), (100, 75), (150, 150), (200, 150), (399, 10), (10, 10)]:
        w, h = open_image(data, draft_size=req).size
        assert w >= req[0] and h >= req[1], (req, (w, h))
    assert open_image(data, draft_size=(50, 37)).size == (50, 38)  # 1/8 scale
    # PNG ignores draft_size
    buf = io.BytesIO()
    Image.new("RGB", (400, 300)).save(buf, "PNG")
    assert open_image(buf.getvalue(), draft_size=(50, 50)).size == (400, 300)
    # inspect_image decodes at reduced scale but reports the full size
    info = inspect_image(data)
    assert (info.width, info.height, info.format) == (400, 300, "JPEG")


def test_draft_size_is_in_display_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _jpeg((400, 200), exif=exif)  # stored 400x200, displayed 200x400
    assert open_image(data).size == (200, 400)
    w, h = open_image(data, draft_size=(50, 100)).size
    assert (w, h) == (50, 100)


def test_unreadable_sources(tmp_path):
    with pytest.raises(ImageValidationError) as info:
        open_image(tmp_path / "missing.jpg")
    assert info.value.code == "unreadable" and "missing.jpg" in str(info.value)
    with pytest.raises(ImageValidationError) as info:
        open_image(tmp_path)
    assert info.value.code == "unreadable"
    with pytest.raises(ImageValidationError) as info:
        open_image(b"")
    assert info.value.code == "empty"
    with pytest.raises(ImageValidationError) as info:
        open_image(b"\x89PNG\r\n\x1a\n")
    assert info.value.code == "corrupt"


def test_png_damage_is_caught():
    ramp = np.add.outer(np.arange(48), np.arange(64)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    data = buf.getvalue()
    assert open_image(data).size == (64, 48)
    for cut, code in [(len(data) // 2, "truncated"), (len(data) - 6, "truncated")]:
        with pytest.raises(ImageValidationError) as info:
            open_image(data[:cut])
        assert info.value.code == code, (cut, str(info.value))
    damaged = bytearray(data)
    damaged[60] ^= 0xFF  # inside IDAT: PIL alone would decode wrong pixels silently
    with pytest.raises(ImageValidationError) as info:
        open_image(bytes(damaged))
    assert info.value.code == "corrupt" and "IDAT" in str(info.value)


def test_decoder_failures_outside_pils_usual_errors_are_validation_errors():
    """Crafted files make PIL raise NotImplementedError (DDS with unknown pixel-format flags) or
    TypeError while counting frames (a TIFF page without a size): still `ImageValidationError`."""
    import io
    import struct

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "DDS")
    dds = bytearray(buf.getvalue())
    dds[80:84] = struct.pack("<I", 0xFF000000)  # DDS_PIXELFORMAT.dwFlags
    with pytest.raises(ImageValidationError) as err:
        open_image(bytes(dds))
    assert err.value.code in ERROR_CODES and "NotImplementedError" in str(err.value)


def _smooth(size: tuple[int, int] = (48, 32)) -> Image.Image:
    """A gradient photo stand-in: lossy codecs keep it close, so decoded pixels can be compared."""
    x = np.linspace(0, 255, size[0])[None, :, None]
    y = np.linspace(0, 255, size[1])[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (size[1], size[0], 1)), np.broadcast_to(y, (size[1], size[0], 1)),
                          np.full((size[1], size[0], 1), 90.0)], axis=2)
    return Image.fromarray(arr.astype(np.uint8))


@pytest.mark.parametrize(("fmt", "save_as", "mode", "ext", "tolerance"), [
    ("PPM", "PPM", "RGB", ".ppm", 0),  # Netpbm (GTSRB ships .ppm)
    ("PPM", "PPM", "L", ".ppm", 0),  # a PGM
    ("AVIF", "AVIF", "RGB", ".avif", 12),
    ("HEIF", "HEIF", "RGB", ".heic", 12),  # phone photos, through pillow-heif
    ("JPEG2000", "JPEG2000", "RGB", ".jp2", 6),
])
def test_dataset_and_phone_formats_decode_sniff_and_keep_their_extension(fmt, save_as, mode, ext, tolerance):
    from pipeline.images import file_extension, sniff_format

    if save_as == "HEIF":
        import pillow_heif

        pillow_heif.register_heif_opener()  # to encode the test file; decoding registers it itself
    src = _smooth().convert(mode)
    buf = io.BytesIO()
    src.save(buf, save_as)
    data = buf.getvalue()
    assert sniff_format(data) == fmt and file_extension(data) == ext and ext in IMAGE_EXTENSIONS
    im = open_image(data)
    assert im.mode == "RGB" and im.size == src.size
    diff = np.abs(np.asarray(im, dtype=np.int16) - np.asarray(src.convert("RGB"), dtype=np.int16))
    assert diff.mean() <= tolerance, diff.mean()
    assert inspect_image(data).format == save_as
    # a damaged file of the format is a coded error, never an exception from the codec
    with pytest.raises(ImageValidationError) as err:
        open_image(data[: len(data) // 2])
    assert err.value.code in ("truncated", "corrupt")


def test_unknown_bytes_keep_the_default_extension():
    from pipeline.images import file_extension, sniff_format

    assert sniff_format(b"Plain text, not P6 image") is None and file_extension(b"hello", ".img") == ".img"
    assert file_extension(_jpeg((8, 8))) == ".jpg"


_HEIC_IN_A_FRESH_PROCESS = """
import io, sys
import numpy as np, pillow_heif
from PIL import Image
if sys.argv[1] == "without-plugin":
    sys.modules["pillow_heif"] = None  # as if the package were not installed
buf = io.BytesIO()
pillow_heif.from_pillow(Image.new("RGB", (40, 30), (200, 40, 30))).save(buf, quality=90)  # leaves PIL's openers alone
from pipeline.images import ImageValidationError, open_image
try:
    print(open_image(buf.getvalue()).getpixel((5, 5)))
except ImageValidationError as exc:
    print(exc.code, exc)
"""


@pytest.mark.parametrize("case", ["with-plugin", "without-plugin"])
def test_heic_decodes_with_nothing_registered_by_the_caller(case):
    """A fresh process (no earlier test registered an opener): `open_image` registers pillow-heif's
    itself; without the package a HEIC file is one coded error that names the fix."""
    import subprocess

    res = subprocess.run([sys.executable, "-c", _HEIC_IN_A_FRESH_PROCESS, case], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr
    if case == "with-plugin":
        import ast

        r, g, b = ast.literal_eval(res.stdout.strip())
        assert abs(r - 200) <= 8 and abs(g - 40) <= 8 and abs(b - 30) <= 8, res.stdout
    else:
        assert res.stdout.startswith("unreadable <bytes>: a HEIC/HEIF image") and "pip install pillow-heif" in res.stdout
