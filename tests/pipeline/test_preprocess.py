"""pipeline.preprocess: geometry matches timm/torchvision eval transforms, uint8 CHW out, fast paths."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.backbones import get_spec
from pipeline.preprocess import crop_box, draft_size, load_pixels, prepare, prepare_batch

LITE0 = get_spec("efficientnet/tf_efficientnet_lite0.in1k")


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth synthetic 'photo' (separable waves + a little noise) so resampling differences matter."""
    rng = np.random.default_rng(seed)
    x = np.arange(w, dtype=np.float32) / w
    y = np.arange(h, dtype=np.float32) / h
    chans = []
    for _ in range(3):
        fx, fy = rng.uniform(2, 9, 2)
        ph = rng.uniform(0, 6.28)
        chans.append(127 + 100 * np.outer(np.cos(y * fy), np.sin(x * fx + ph)))
    arr = np.stack(chans, -1) + rng.integers(-3, 4, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _reference(img: Image.Image, spec) -> np.ndarray:
    """timm's eval transform, step by step as torchvision runs it on PIL images:
    Resize(floor(S / crop_pct)) (short side, long = int(target * long / short); both sides for
    squash) with a full PIL resample, then CenterCrop(S) at int(round((dim - S) / 2))."""
    w, h = img.size
    t = int(np.floor(spec.input_size / spec.crop_pct))
    if spec.crop_mode == "squash":
        nw = nh = t
    elif w <= h:
        nw, nh = t, int(t * h / w)
    else:
        nw, nh = int(t * w / h), t
    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[spec.interpolation]
    big = np.asarray(img.resize((nw, nh), resample))
    s = spec.input_size
    top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
    return big[top:top + s, left:left + s].transpose(2, 0, 1)


@pytest.mark.parametrize("wh", [(640, 480), (480, 640), (300, 300), (1001, 333), (100, 60)])
def test_prepare_shape_dtype_layout(wh):
    out = prepare(_photo(*wh), LITE0)
    assert out.shape == (3, 224, 224) and out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("spec_name", [
    "efficientnet/tf_efficientnet_lite0.in1k",      # crop 0.875, bicubic
    "efficientnet/tf_efficientnet_lite2.in1k",      # 260, crop 0.89
    "resnet/resnet50.a1_in1k",                       # crop 0.95
    "clip/vit_base_patch32.openai",                  # crop 1.0
    "vit/vit_base_patch16_224.hf_in21k_ft_in1k",     # squash, bilinear
])
@pytest.mark.parametrize("wh", [(640, 480), (375, 500), (333, 1001)])
def test_prepare_matches_timm_eval_transform(spec_name, wh):
    spec = get_spec(spec_name)
    img = _photo(*wh, seed=wh[0])
    ours = prepare(img, spec, reducing_gap=None).astype(np.int16)
    ref = _reference(img, spec).astype(np.int16)
    diff = np.abs(ours - ref)
    # one resample of the cropped box == resize-then-crop, up to rounding at sub-pixel box edges
    assert diff.mean() < 0.6, diff.mean()
    assert np.percentile(diff, 99) <= 4


def test_reducing_gap_is_close_to_fair_resampling_on_big_images():
    img = _photo(2000, 1500, seed=3)
    fast = prepare(img, LITE0).astype(np.int16)
    fair = prepare(img, LITE0, reducing_gap=None).astype(np.int16)
    assert np.abs(fast - fair).mean() < 1.0


def test_crop_box_geometry():
    spec = get_spec("resnet/resnet50.a1_in1k").replace(input_size=200, crop_pct=0.8)  # resize short side to 250
    # landscape 500x250: resized to 500x250 (no-op scale), crop 200x200 centred at x offset 150, y 25
    assert crop_box(500, 250, spec) == pytest.approx((150, 25, 350, 225))
    # portrait, scale 2x down: 500x1000 -> 250x500, crop (25, 150) in resized = (50, 300) in source
    assert crop_box(500, 1000, spec) == pytest.approx((50, 300, 450, 700))
    sq = spec.replace(crop_mode="squash", crop_pct=1.0)
    assert crop_box(640, 480, sq) == pytest.approx((0, 0, 640, 480))
    assert draft_size(spec) == (250, 250)


def test_non_rgb_modes_are_converted():
    gray = _photo(120, 90).convert("L")
    out = prepare(gray, LITE0)
    assert out.shape == (3, 224, 224)
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])
    rgba = _photo(120, 90).convert("RGBA")
    assert prepare(rgba, LITE0).shape == (3, 224, 224)


def test_prepare_rejects_non_images():
    with pytest.raises(TypeError, match="load_pixels"):
        prepare(np.zeros((10, 10, 3), np.uint8), LITE0)  # type: ignore[arg-type]


def test_prepare_batch():
    batch = prepare_batch([_photo(200, 100), _photo(100, 200)], LITE0)
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == np.uint8
    assert prepare_batch([], LITE0).shape == (0, 3, 224, 224)


def _jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_load_pixels_drafts_big_jpegs_and_stays_close_to_full_decode(tmp_path):
    big = _photo(2400, 1600, seed=5)
    data = _jpeg(big)
    full = prepare(Image.open(io.BytesIO(data)).convert("RGB"), LITE0).astype(np.int16)
    from_bytes = load_pixels(data, LITE0)
    path = tmp_path / "big.jpg"
    path.write_bytes(data)
    from_path = load_pixels(str(path), LITE0)
    assert from_bytes.shape == (3, 224, 224) and from_bytes.dtype == np.uint8
    assert np.array_equal(from_bytes, from_path)
    assert np.abs(from_bytes.astype(np.int16) - full).mean() < 2.0  # DCT-scaled decode barely changes pixels

    # the draft really decodes smaller: the decoded image is >= the resize target, < the original
    from pipeline.images import open_image

    drafted = open_image(data, draft_size=draft_size(LITE0))
    assert min(drafted.size) >= LITE0.resize_size and drafted.size[0] < big.size[0]


def test_load_pixels_png_and_bad_input():
    buf = io.BytesIO()
    _photo(90, 70).save(buf, "PNG")
    assert load_pixels(buf.getvalue(), LITE0).shape == (3, 224, 224)
    from pipeline.images import ImageValidationError

    with pytest.raises(ImageValidationError):
        load_pixels(b"definitely not an image", LITE0)


def test_prepare_is_fast():
    """JPEG draft + one boxed resample: an 8 MP JPEG -> 224 px well under the full-decode cost."""
    data = _jpeg(_photo(3200, 2400, seed=9), quality=85)
    load_pixels(data, LITE0)  # warm-up
    t0 = time.perf_counter()
    for _ in range(2):
        load_pixels(data, LITE0)
    drafted = (time.perf_counter() - t0) / 2
    t0 = time.perf_counter()
    for _ in range(2):
        img = Image.open(io.BytesIO(data))
        img.load()
        prepare(img.convert("RGB"), LITE0, reducing_gap=None)
    full = (time.perf_counter() - t0) / 2
    assert drafted < full, (drafted, full)
