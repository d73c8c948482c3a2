"""Offline look-ups in the local Hugging Face hub cache. Never touches the network.

Which files a hub-hosted backbone needs is its source adapter's answer (``adapters.py``); this
module finds them in the local cache; nothing is downloaded. What is not cached is reported with
the command that fetches it on a machine that can reach a hub.

The cache folder is read from the environment at call time, as the hub lays it out
(``models--ORG--NAME/{refs,snapshots/<commit>}``): ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
huggingface_hub's default (which reads the same variables, but only once, at import).
``HF_HUB_OFFLINE=1`` forbids downloads even where a caller allows them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HubFiles", "cached_file", "cached_revision", "hub_cache_dir", "hub_offline", "resolve_cached",
           "snapshot_dir", "strip_hub_prefix"]


def hub_cache_dir() -> str:
    """The HF hub cache folder now: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else the library default."""
    if os.environ.get("HF_HUB_CACHE"):
        return str(Path(os.environ["HF_HUB_CACHE"]).expanduser())
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value (downloads are then never attempted)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")

@dataclass(frozen=True)
class HubFiles:
    """Which files of which hub repo a spec needs: all of ``required`` and one of ``any_of``."""

    repo_id: str
    revision: str | None
    required: tuple[str, ...]
    any_of: tuple[str, ...]


def strip_hub_prefix(weights: str) -> str:
    return weights[len("hf-hub:"):] if weights.startswith("hf-hub:") else weights


def cached_file(repo_id: str, filename: str, revision: str | None = None) -> str | None:
    """Path of ``filename`` of ``repo_id`` in the local HF cache, or None. Offline."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache_dir(), revision=revision)
    except Exception:  # malformed repo ids etc. are simply "not cached"
        return None
    return hit if isinstance(hit, str) and os.path.exists(hit) else None


def resolve_cached(files: HubFiles) -> tuple[dict[str, str], list[str]]:
    """(found {filename: path}, missing descriptions). All ``required`` + one ``any_of`` must exist."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for name in files.required:
        p = cached_file(files.repo_id, name, files.revision)
        if p:
            found[name] = p
        else:
            missing.append(name)
    if files.any_of:
        for name in files.any_of:
            p = cached_file(files.repo_id, name, files.revision)
            if p:
                found[name] = p
                break
        else:
            missing.append(" or ".join(files.any_of))
    return found, missing


def snapshot_dir(found: dict[str, str]) -> Path | None:
    """The cache snapshot folder holding the resolved files (they all live in one)."""
    for p in found.values():
        return Path(p).parent
    return None


def cached_revision(files: HubFiles) -> str | None:
    """The snapshot commit the cached files live under, or None (not all cached / no snapshot)."""
    found, missing = resolve_cached(files)
    path = next(iter(found.values()), None)
    if path is not None and not missing:
        parts = Path(path).parts
        if "snapshots" in parts:
            i = parts.index("snapshots")
            if i + 1 < len(parts):
                return parts[i + 1]
    return None
