"""Decode and hash every candidate file in a thread pool (PIL releases the GIL while decoding)."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

from PIL import Image

from pipeline.data.records import Candidate, ExcludedFile
from pipeline.images import DEFAULT_MAX_PIXELS, ImageValidationError, inspect_image, sha256_bytes


@dataclass(frozen=True)
class CheckedFile:
    """A candidate that decoded cleanly."""

    candidate: Candidate
    sha256: str
    width: int
    height: int


def check_file(candidate: Candidate, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> CheckedFile | ExcludedFile:
    """Read once, hash once, fully decode. Never raises for a bad file."""
    try:
        with open(candidate.path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return ExcludedFile(candidate.display, "unreadable", "file vanished or is a broken link")
    except OSError as exc:
        return ExcludedFile(candidate.display, "unreadable", f"cannot read: {exc.strerror or exc}")
    try:
        info = inspect_image(data, max_pixels=max_pixels)
    except ImageValidationError as exc:
        return ExcludedFile(candidate.display, exc.code, _strip_prefix(str(exc)))
    except Exception as exc:  # a decoder bug must not take down intake
        return ExcludedFile(candidate.display, "corrupt", f"decoder failed: {type(exc).__name__}: {exc}")
    return CheckedFile(candidate, sha256_bytes(data), info.width, info.height)


def _strip_prefix(message: str) -> str:
    # open_image messages start with "<bytes>: "; the card already shows the path.
    return message[len("<bytes>: "):] if message.startswith("<bytes>: ") else message


def check_files(
    candidates: Sequence[Candidate],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[CheckedFile | ExcludedFile]:
    """`check_file` over all candidates with `workers` threads (default `os.cpu_count()`).
    Results are in candidate order. `progress(done, total)` is called as files finish."""
    total = len(candidates)
    n_workers = max(1, min(workers or os.cpu_count() or 1, total or 1))
    results: list[CheckedFile | ExcludedFile] = []
    with warnings.catch_warnings():
        # Oversized images become `too_many_pixels` exclusions; PIL's warning is just noise here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if n_workers == 1:
            iterator = (check_file(c, max_pixels=max_pixels) for c in candidates)
            for i, res in enumerate(iterator, start=1):
                results.append(res)
                if progress is not None:
                    progress(i, total)
            return results
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="tlpipe-intake") as pool:
            for i, res in enumerate(pool.map(lambda c: check_file(c, max_pixels=max_pixels), candidates),
                                    start=1):
                results.append(res)
                if progress is not None:
                    progress(i, total)
    return results
