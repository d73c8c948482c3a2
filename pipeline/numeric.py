"""Small number helpers shared across packages."""

from __future__ import annotations

import math
from typing import Any


def finite_float(v: Any) -> float | None:
    """float(v) when it is a finite number, else None (NaN, inf, None and junk alike)."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
