"""Offline look-ups in the local Hugging Face hub cache. Never touches the network.

Every hub-hosted backbone (transformers, timm, open_clip ``hf-hub:``) is resolved here to files in
the local cache (``HF_HUB_CACHE`` / ``HF_HOME``); nothing is downloaded. What is not cached is
reported with the command that fetches it on a machine that can reach a hub.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .spec import BackboneSpec

__all__ = ["HubFiles", "hub_files_for", "cached_file", "resolve_cached", "hub_identity", "download_hint"]

TRANSFORMERS_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class HubFiles:
    """Which files of which hub repo a spec needs: all of ``required`` and one of ``any_of``."""

    repo_id: str
    revision: str | None
    required: tuple[str, ...]
    any_of: tuple[str, ...]


def _strip_hub_prefix(weights: str) -> str:
    return weights[len("hf-hub:"):] if weights.startswith("hf-hub:") else weights


def hub_files_for(spec: "BackboneSpec") -> HubFiles:
    """The hub repo + files a (non-local, non-PyPI) spec loads from."""
    w = spec.weights
    if spec.source == "transformers":
        return HubFiles(_strip_hub_prefix(w), spec.revision, ("config.json",), TRANSFORMERS_WEIGHTS)
    if spec.source == "timm":
        return HubFiles(_strip_hub_prefix(w), spec.revision, (), TIMM_WEIGHTS)
    if spec.source == "open_clip":
        if w.startswith("hf-hub:") or "/" in w:
            return HubFiles(_strip_hub_prefix(w), spec.revision, ("open_clip_config.json",), OPEN_CLIP_WEIGHTS)
        # a pretrained tag of open_clip's own registry: resolve it to its hub file (imports open_clip)
        import open_clip

        cfg = open_clip.get_pretrained_cfg(spec.arch, w)
        hub = (cfg or {}).get("hf_hub", "")
        if not hub:
            raise ValueError(
                f"open_clip has no hub location for model {spec.arch!r} tag {w!r}"
                + (f"; known tags: {open_clip.list_pretrained_tags_by_model(spec.arch)}" if cfg == {} else "")
                + ". Put a local checkpoint file/dir in the spec's weights instead."
            )
        repo, filename = os.path.split(hub)  # 'org/name/' -> default file, 'org/name/file.pt' -> that file
        if filename:
            files = (filename[:-4] + ".safetensors", filename) if filename.endswith((".bin", ".pth")) else (filename,)
        else:
            files = OPEN_CLIP_WEIGHTS
        return HubFiles(repo, spec.revision, (), files)
    raise ValueError(f"source {spec.source!r} does not load from a hub")


def cached_file(repo_id: str, filename: str, revision: str | None = None) -> str | None:
    """Path of ``filename`` of ``repo_id`` in the local HF cache, or None. Offline."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo_id, filename, revision=revision)
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


def hub_identity(spec: "BackboneSpec") -> str:
    """``hub:<repo>@<revision>``; with no pinned revision, the cached snapshot's commit if any."""
    try:
        files = hub_files_for(spec)
    except Exception:
        return f"hub:{spec.source}:{spec.arch}:{spec.weights}@{spec.revision or 'main'}"
    rev = spec.revision
    if not rev:
        found, missing = resolve_cached(files)
        path = next(iter(found.values()), None)
        if path is not None and not missing:
            parts = Path(path).parts
            if "snapshots" in parts:
                i = parts.index("snapshots")
                if i + 1 < len(parts):
                    rev = parts[i + 1]
    tag = "" if spec.source != "open_clip" or "/" in spec.weights else f"#{spec.weights}"
    return f"hub:{files.repo_id}@{rev or 'main'}{tag}"


def download_hint(spec: "BackboneSpec") -> str:
    """The fix text for a hub backbone whose files are not cached here."""
    try:
        files = hub_files_for(spec)
        repo = files.repo_id
    except Exception:
        repo = spec.weights
    rev = f" --revision {spec.revision}" if spec.revision else ""
    return (
        f"download them where a hub is reachable with `hf download {repo}{rev} --local-dir DIR` "
        f"(or `huggingface-cli download ...`; for transformers models `...from_pretrained('{repo}').save_pretrained(DIR)`), "
        f"copy DIR here and pass `--weights DIR` / set the spec's weights to DIR "
        f"(`get_spec('{spec.name}').replace(weights=DIR)`), or copy the hub cache into HF_HUB_CACHE"
    )


def not_cached_error(spec: "BackboneSpec", files: HubFiles, missing: list[str]):
    """The WeightsUnavailableError for hub files absent from the local cache (cause + fix)."""
    from .base import WeightsUnavailableError

    return WeightsUnavailableError(
        spec.name,
        f"weights for {spec.name} are not on this machine (offline hub; {files.repo_id} lacks "
        f"{', '.join(missing)} in the local HF cache): {download_hint(spec)}",
    )
