"""Many images through a predictor: batched forward passes, and a bad image costs only itself.

`predict_each` is what offline scoring needs (`tlpipe predict` over a folder, the MLflow pyfunc
model over a DataFrame): one forward pass per `batch_size` images, results in input order, and an
image that cannot be used (not an image, truncated, unreadable, too large) is its
`ImageValidationError` in its place while the rest of its batch is still answered.
`image_files` lists the images of folders given on a command line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from pipeline.data.imagefolder import is_hidden
from pipeline.images import IMAGE_EXTENSIONS, ImageValidationError, inspect_image

DEFAULT_BATCH_SIZE = 64  # a few batch-1 latencies of work per call; bounded memory for any count


def predict_each(predictor, images: Sequence[Any], *, batch_size: int = DEFAULT_BATCH_SIZE) -> list:
    """`predictor.predict_images` over `images` (bytes or paths), `batch_size` at a time: one
    Prediction or ImageValidationError per image, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out: list = []
    for start in range(0, len(images), batch_size):
        out.extend(_predict_batch(predictor, list(images[start:start + batch_size])))
    return out


def _predict_batch(predictor, batch: list) -> list:
    if not batch:
        return []
    try:
        return list(predictor.predict_images(batch))
    except ImageValidationError as exc:
        if len(batch) == 1:
            return [exc]
    # some image in it is unusable: find each one, then answer the rest together
    found = [_decode_error(item) for item in batch]
    if not any(found):  # each passes the check alone, yet the batch failed: one at a time
        return [_predict_batch(predictor, [item])[0] for item in batch]
    answers = iter(_predict_batch(predictor, [item for item, err in zip(batch, found) if err is None]))
    return [err if err is not None else next(answers) for err in found]


def _decode_error(item: Any) -> ImageValidationError | None:
    try:
        inspect_image(item)
    except ImageValidationError as exc:
        return exc
    return None


def image_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given; each folder replaced by the image files under it (recursively, by
    extension, hidden entries and tools' folders skipped, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            out.append(p)
            continue
        found = []
        for folder, dirs, files in os.walk(p, followlinks=False):
            dirs[:] = [d for d in dirs if not is_hidden(d)]
            found.extend(Path(folder, f) for f in files
                         if not is_hidden(f) and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
        out.extend(sorted(found))
    return out
