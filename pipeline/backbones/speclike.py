"""`SpecLike`: what the base contract, the source adapters and the weights identity read from a
spec. Typing against it (not `spec.BackboneSpec`) keeps `spec` the one module that depends on
them, never the other way round."""

from __future__ import annotations

from typing import Any, Protocol


class SpecLike(Protocol):
    name: str
    source: str
    arch: str
    weights: Any
    revision: str | None
    input_size: int
    embed_dim: int | None
    params_m: float | None

    def fingerprint_for(self, engine: str, dtype: str) -> str: ...
