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
    try:
        return list(predictor.predict_images(batch))
    except ImageValidationError:
        pass  # some image in it is unusable: find each one, then answer the rest together
    errors: dict[int, ImageValidationError] = {}
    for i, item in enumerate(batch):
        try:
            inspect_image(item)
        except ImageValidationError as exc:
            errors[i] = exc
    good = [i for i in range(len(batch)) if i not in errors]
    try:
        preds = list(predictor.predict_images([batch[i] for i in good])) if good else []
    except ImageValidationError:  # one that passed the check still fails: one at a time
        preds = []
        for i in list(good):
            try:
                preds.extend(predictor.predict_images([batch[i]]))
            except ImageValidationError as exc:
                errors[i] = exc
                good.remove(i)
    answers = dict(zip(good, preds))
    return [errors[i] if i in errors else answers[i] for i in range(len(batch))]


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
