"""The head registry and the on-disk format header.

Head classes register themselves with ``@register`` (the class name is the registry key and the
``class`` written to ``config.json``); ``load_head(dir)`` dispatches on it. This module imports
nothing from the heads, so every head module (and ``base``) can import it without a cycle;
``pipeline/heads/__init__.py`` imports the head modules, which fills ``HEADS``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ARRAYS_FILE", "CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "HEADS", "load_head", "read_config", "register"]

FORMAT = "tlpipe.head"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
ARRAYS_FILE = "arrays.safetensors"

#: registry name -> class (the name is also the class name written to config.json)
HEADS: dict[str, Any] = {}

T = TypeVar("T", bound=type)


def register(cls: T) -> T:
    """Class decorator: make ``cls`` loadable by ``load_head`` under ``cls.__name__``."""
    name = cls.__name__
    old = HEADS.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"a different head class named {name!r} is already registered")
    HEADS[name] = cls
    return cls


def load_head(path: str | os.PathLike):
    """Load any saved head, dispatching on the class recorded in ``path/config.json``."""
    name = read_config(path)["class"]
    if name not in HEADS:
        raise ValueError(f"{path}: unknown head class {name!r}; known: {sorted(HEADS)}")
    return HEADS[name].load(path)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.exists():
        raise FileNotFoundError(
            f"no {CONFIG_FILE} in {path}: not a saved tlpipe head (or the save did not finish)"
        )
    config = json.loads(cfg_path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a tlpipe head config (format={config.get('format')!r})")
    version = int(config.get("version", 0))
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{cfg_path} was written by a newer tlpipe (head format v{version}, this reads "
            f"up to v{FORMAT_VERSION}); upgrade tlpipe to load it"
        )
    return config
