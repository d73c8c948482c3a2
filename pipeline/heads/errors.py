"""The exceptions every head raises (no imports, so every heads module can use them)."""

from __future__ import annotations

__all__ = ["HeadInputError", "NotFittedError"]


class NotFittedError(ValueError, AttributeError):
    """Raised when a head is used before ``fit`` (same bases as sklearn's NotFittedError)."""


class HeadInputError(ValueError):
    """Bad X / y handed to a head: wrong shape, non-finite values, too few classes, ..."""
