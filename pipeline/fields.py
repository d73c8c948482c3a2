"""Field-name checks shared by the frozen specs and configs that load from JSON / the CLI."""

from __future__ import annotations

import dataclasses
from typing import Iterable


def field_names(cls: type) -> set[str]:
    """The field names of dataclass `cls`."""
    return {f.name for f in dataclasses.fields(cls)}


def reject_unknown(cls: type, data: Iterable[str], extra: Iterable[str] = ()) -> None:
    """ValueError naming the keys of `data` that are neither fields of `cls` nor in `extra`, and
    listing what is known."""
    known = field_names(cls) | set(extra)
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(known)}")


__all__ = ["field_names", "reject_unknown"]
