"""Per-candidate figures drawn with PIL: confusion matrix, reliability diagram, hardest examples.

A sweep draws these for every candidate, in its head tasks and its driver. With matplotlib they
cost about a second and a half of CPU per candidate (plus its import in every worker); PIL
draws the same content in a few milliseconds. The sweep's one Pareto plot stays in
`pipeline.plots` (matplotlib: label placement, axes).
"""

from __future__ import annotations

import functools
import importlib.util
import io
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.evaluate import EvalReport

#: class count up to which every confusion-matrix cell carries its number
MAX_ANNOTATED_CLASSES = 20
#: tile background of an image that could not be opened (tests look for it)
UNREADABLE_TILE = (230, 230, 230)
THUMB = 160
# matplotlib's "Blues" end points and the figures' other colours
_LIGHT, _DARK = np.array([247, 251, 255]), np.array([8, 48, 107])
_BAR, _GAP, _GRID = (76, 114, 176), (221, 132, 82), (200, 200, 200)


@functools.lru_cache(maxsize=None)
def font(size: int):
    """DejaVu Sans at `size` px (shipped with matplotlib, found without importing it: it has the
    arrow glyph), else PIL's default font."""
    from PIL import ImageFont

    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "mpl-data", "fonts", "ttf",
                            "DejaVuSans.ttf")
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            pass
    return ImageFont.load_default(size=size)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _blues(v: float) -> tuple[int, int, int]:
    v = min(1.0, max(0.0, float(v)))
    return tuple(int(round(c)) for c in _LIGHT + (_DARK - _LIGHT) * v)


def _rotated_text(text: str, fnt, fill="black"):
    """`text` as an RGBA image turned 90 degrees counter-clockwise (reads bottom to top)."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = fnt.getbbox(text)
    img = Image.new("RGBA", (max(1, right - left + 2), max(1, bottom - top + 2)), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((-left + 1, -top + 1), text, fill=fill, font=fnt)
    return img.rotate(90, expand=True)


def _clip(draw, text: str, fnt, width: float) -> str:
    if draw.textlength(text, font=fnt) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "\u2026", font=fnt) > width:
        text = text[:-1]
    return text + "\u2026"


def confusion_matrix_png(report: EvalReport, *, title: str | None = None) -> bytes:
    """Confusion matrix normalised per row (true class), with class labels, as PNG bytes."""
    from PIL import Image, ImageDraw

    cm = np.asarray(report.confusion_matrix, dtype=np.float64)
    classes = [str(c) for c in report.classes]
    c = len(classes)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    cell = int(min(48, max(8, 560 // max(c, 1))))
    fs = int(min(12, max(7, cell * 0.3)))
    small, big = font(fs), font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(min(160, max(probe.textlength(x, font=small) for x in classes) + 8)) if c else 40
    pad, title_h, bar_w = 12, 30, 14
    grid = cell * c
    left, top = pad + 20 + label_w, title_h + pad
    width = left + grid + pad + bar_w + 40
    height = top + grid + label_w + 20 + pad
    img = Image.new("RGB", (max(width, 320), height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((img.width / 2, title_h / 2 + 4),
              title or f"Confusion matrix (row-normalised, n={report.n_samples})",
              fill="black", font=big, anchor="mm")
    for i in range(c):
        for j in range(c):
            x0, y0 = left + j * cell, top + i * cell
            v = norm[i, j]
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=_blues(v))
            if c <= MAX_ANNOTATED_CLASSES and cm[i, j] > 0:
                draw.text((x0 + cell / 2, y0 + cell / 2), f"{v:.2f}", font=small, anchor="mm",
                          fill="white" if v > 0.5 else "black")
    draw.rectangle((left - 1, top - 1, left + grid, top + grid), outline="black")
    for i, name in enumerate(classes):  # true classes down the left, predicted along the bottom
        draw.text((left - 4, top + i * cell + cell / 2), _clip(draw, name, small, label_w - 6),
                  fill="black", font=small, anchor="rm")
        label = _rotated_text(_clip(draw, name, small, label_w - 6), small)
        img.paste(label, (int(left + i * cell + (cell - label.width) / 2), top + grid + 4),
                  label)
    draw.text((left + grid / 2, height - pad - 4), "predicted", fill="black", font=big, anchor="md")
    ylabel = _rotated_text("true", big)
    img.paste(ylabel, (pad, int(top + grid / 2 - ylabel.height / 2)), ylabel)
    bx = left + grid + pad  # colour bar: fraction of the true class
    for y in range(grid):
        draw.line((bx, top + y, bx + bar_w, top + y), fill=_blues(1.0 - y / max(grid - 1, 1)))
    draw.rectangle((bx, top, bx + bar_w, top + grid), outline="black")
    draw.text((bx + bar_w + 3, top), "1", fill="black", font=small, anchor="lt")
    draw.text((bx + bar_w + 3, top + grid), "0", fill="black", font=small, anchor="lb")
    return _png(img)


def reliability_png(report: EvalReport, *, title: str | None = None) -> bytes:
    """Reliability diagram as PNG bytes: per-bin accuracy bars, the gap to the bin's mean
    confidence, the diagonal; image counts per bin below."""
    from PIL import Image, ImageDraw

    bins = report.reliability
    W, H, pad, title_h = 520, 560, 50, 34
    plot_h, count_h = 330, 110
    x0, x1 = pad + 10, W - 20
    y_top = title_h + 10
    y_bot = y_top + plot_h
    c_top, c_bot = y_bot + 22, y_bot + 22 + count_h
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img, "RGBA")
    small, big = font(11), font(13)
    draw.text((W / 2, title_h / 2 + 4),
              title or f"Reliability diagram  (ECE = {report.ece:.4f}, n={report.n_samples})",
              fill="black", font=big, anchor="mm")

    def px(v: float) -> float:
        return x0 + (x1 - x0) * v

    def py(v: float) -> float:
        return y_bot - (y_bot - y_top) * v

    for t in np.linspace(0, 1, 6):
        draw.line((px(t), y_top, px(t), y_bot), fill=_GRID)
        draw.line((x0, py(t), x1, py(t)), fill=_GRID)
        draw.text((x0 - 5, py(t)), f"{t:.1f}", fill="black", font=small, anchor="rm")
        draw.text((px(t), c_bot + 5), f"{t:.1f}", fill="black", font=small, anchor="mt")
    counts = [int(b["count"]) for b in bins]
    top_count = max(counts + [1])
    for b, n in zip(bins, counts):
        lo, hi = px(float(b["lower"])), px(float(b["upper"]))
        acc = b["accuracy"] if b["accuracy"] is not None else 0.0
        draw.rectangle((lo, py(acc), hi, y_bot), fill=_BAR, outline="black")
        if n > 0 and b["mean_confidence"] is not None:
            conf = float(b["mean_confidence"])
            draw.rectangle((lo, py(max(acc, conf)), hi, py(min(acc, conf))),
                           fill=_GAP + (110,), outline=_GAP)
        ch = count_h * n / top_count
        draw.rectangle((lo, c_bot - ch, hi, c_bot), fill=(150, 150, 150), outline="black")
    # the diagonal, dashed: perfect calibration
    for s in np.linspace(0, 1, 41)[::2]:
        draw.line((px(s), py(s), px(min(1, s + 0.025)), py(min(1, s + 0.025))),
                  fill=(40, 40, 40), width=2)
    draw.rectangle((x0, y_top, x1, y_bot), outline="black")
    draw.rectangle((x0, c_top, x1, c_bot), outline="black")
    draw.text((x0 - 5, c_top), str(top_count), fill="black", font=small, anchor="rt")
    draw.text((x0 - 5, c_bot), "0", fill="black", font=small, anchor="rb")
    for label, y in (("accuracy", (y_top + y_bot) / 2), ("count", (c_top + c_bot) / 2)):
        rot = _rotated_text(label, small)
        img.paste(rot, (6, int(y - rot.height / 2)), rot)
    draw.text(((x0 + x1) / 2, H - 8), "confidence (max probability)", fill="black", font=small,
              anchor="md")
    lx, ly = x0 + 8, y_top + 8  # legend
    for i, (col, text) in enumerate(((_BAR, "accuracy"), (_GAP, "gap to confidence"),
                                     ((40, 40, 40), "perfect calibration"))):
        draw.rectangle((lx, ly + 16 * i, lx + 12, ly + 16 * i + 10), fill=col)
        draw.text((lx + 18, ly + 16 * i + 5), text, fill="black", font=small, anchor="lm")
    return _png(img)


def evaluation_pngs(report: EvalReport) -> dict[str, bytes]:
    """The confusion matrix and the reliability diagram, keyed by their artifact file names."""
    return {"confusion_matrix.png": confusion_matrix_png(report),
            "reliability.png": reliability_png(report)}


def _load_thumbnail(item: Any) -> np.ndarray:
    from PIL import Image

    if isinstance(item, Image.Image):
        img = item
    else:
        from pipeline.images import open_image  # lazy: keeps the module import-light

        img = open_image(item, draft_size=(THUMB, THUMB))
    img = img.convert("RGB")
    img.thumbnail((THUMB, THUMB))
    return np.asarray(img)


def _fit_tile(thumb: np.ndarray) -> np.ndarray:
    """Scale an RGB array so its longer side is one tile (small images are enlarged)."""
    from PIL import Image

    h, w = thumb.shape[:2]
    scale = THUMB / max(h, w)
    if scale == 1:
        return thumb
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(thumb).resize(size, Image.Resampling.BICUBIC))


def hardest_examples_png(images: Sequence[Any], captions: Sequence[str], *, ncols: int = 4,
                         title: str = "Most confident mistakes") -> bytes:
    """Thumbnail grid as PNG bytes. ``images``: PIL images, paths or bytes (opened with
    pipeline.images); one that cannot be opened becomes a grey tile saying why."""
    from PIL import Image, ImageDraw

    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    title_h, cap_h, pad = 30, 18, 8  # pixels
    cell_w, cell_h = THUMB + pad, THUMB + cap_h + pad
    width = max(ncols * cell_w + pad, 320)
    canvas = Image.new("RGB", (width, title_h + nrows * cell_h + (40 if n == 0 else 0)), "white")
    draw = ImageDraw.Draw(canvas)
    big, small = font(15), font(10)
    draw.text((width / 2, title_h / 2), title, fill="black", font=big, anchor="mm")
    if n == 0:
        draw.text((width / 2, title_h + 25), "no mistakes on this split", fill="black", font=small,
                  anchor="mm")
    for i, (item, cap) in enumerate(zip(images, captions)):
        r, c = divmod(i, ncols)
        x0, y0 = pad + c * cell_w, title_h + r * cell_h + cap_h
        try:
            thumb = _fit_tile(_load_thumbnail(item))
            h, w = thumb.shape[:2]
            canvas.paste(Image.fromarray(thumb), (x0 + (THUMB - w) // 2, y0 + (THUMB - h) // 2))
        except Exception as e:  # show the failure in the tile instead of losing the whole grid
            draw.rectangle((x0, y0, x0 + THUMB - 1, y0 + THUMB - 1), fill=UNREADABLE_TILE)
            draw.multiline_text((x0 + THUMB / 2, y0 + THUMB / 2),
                                f"cannot open:\n{type(e).__name__}", fill="black", font=small,
                                anchor="mm", align="center")
        draw.text((x0 + THUMB / 2, y0 - 3), _clip(draw, str(cap), small, cell_w),
                  fill="black", font=small, anchor="md")
    return _png(canvas)


def hardest_captions(examples: Sequence[Mapping[str, Any]]) -> list[str]:
    """Captions for `hardest_examples` output: 'true → predicted (confidence)'."""
    return [f"{e['true']} \u2192 {e['predicted']} ({e['confidence']:.2f})" for e in examples]
