"""`ApiError`: a client-facing failure with an HTTP status, a short code and a message."""

from __future__ import annotations

import logging

from pipeline.images import ImageValidationError

log = logging.getLogger("tlpipe.serve")

# ImageValidationError.code -> (HTTP status, API error code)
_IMAGE_ERRORS = {
    "empty": (400, "empty_image"),
    "not_image": (415, "not_an_image"),
    "truncated": (400, "truncated_image"),
    "corrupt": (400, "corrupt_image"),
    "too_many_pixels": (413, "too_many_pixels"),
    "unsupported_mode": (415, "unsupported_image_mode"),
    "unreadable": (400, "unreadable_image"),
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: list[dict] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = int(status)
        self.code = code
        self.message = message
        self.details = list(details or [])
        self.headers = headers

    def body(self) -> dict:
        return {"error": self.code, "message": self.message, "details": self.details}


def _about(index: int, name: str | None, reason: str) -> tuple[str, dict]:
    """("image 3 ('x.jpg')", its error detail) for image `index` of the request."""
    detail = {"index": index, "reason": reason}
    if name:
        detail["filename"] = name
    return f"image {index}" + (f" ({name!r})" if name else ""), detail


def image_error(exc: ImageValidationError, index: int, name: str | None = None) -> ApiError:
    """An undecodable image at position `index` of the request."""
    status, code = _IMAGE_ERRORS.get(exc.code, (400, "bad_image"))
    what, detail = _about(index, name, exc.code)
    return ApiError(status, code, f"{what}: {exc}", [detail])


def decode_error(exc: Exception, index: int, name: str | None = None) -> ApiError:
    """The client-facing error for any exception raised while decoding uploaded image `index`.

    Decoding runs PIL's format plugins on untrusted bytes, and a crafted file can make them raise
    nearly anything (DDS: NotImplementedError, TIFF: TypeError, others: KeyError, struct.error,
    ZeroDivisionError...): the image is bad, not the server (400 ``bad_image``; 413 for
    MemoryError). Anything that is not an `ImageValidationError` is also logged with its traceback,
    so a genuine decoder bug stays visible in the server log.
    """
    if isinstance(exc, ImageValidationError):
        return image_error(exc, index, name)
    log.warning("image %d (%s) failed to decode with %s", index, name, type(exc).__name__,
                exc_info=(type(exc), exc, exc.__traceback__))
    what, detail = _about(index, name, type(exc).__name__)
    if isinstance(exc, MemoryError):
        return ApiError(413, "image_too_large", f"{what}: too large to decode (send a smaller image)", [detail])
    return ApiError(400, "bad_image", f"{what}: cannot be decoded ({type(exc).__name__}: {exc}); send a "
                    "JPEG, PNG or WebP file", [detail])
