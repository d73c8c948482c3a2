"""Backbones registered by name: ``tlpipe backbones add NAME DIR`` records a weights folder in
``<state root>/backbones.json`` (beside the feature store) so ``--backbones NAME`` works in every
command, on every machine that shares the state root and can read the folder.

Each entry keeps the folder, the family and the ``--set`` overrides, plus a snapshot of the spec
derived when it was added: while the folder is readable the spec is derived again (the folder is
the truth), and where it is not (a cluster node without the mount) the snapshot still names the
backbone and its weights check says the folder is missing here. Nothing here loads a model.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Mapping

from pipeline import settings

from .base import UnknownBackboneError, WeightsUnavailableError
from .folders import spec_from_folder, spec_overrides
from .spec import BackboneSpec, parse_name

__all__ = ["REGISTRY_FILE", "add", "entries", "registered_spec", "registered_specs", "registry_path", "remove",
           "use_state_root"]

REGISTRY_FILE = "backbones.json"
_FORMAT = "tlpipe.backbones"
_ACTIVE_ROOT: Path | None = None


def use_state_root(root: str | os.PathLike | None) -> None:
    """Resolve registered names in ``root`` (a command's ``--root``) for the rest of this process."""
    global _ACTIVE_ROOT
    _ACTIVE_ROOT = Path(root).expanduser() if root else None


def registry_path(root: str | os.PathLike | None = None) -> Path:
    """``<state root>/backbones.json``: ``root``, else the root in use, else `settings.state_root()`."""
    base = Path(root).expanduser() if root else (_ACTIVE_ROOT or settings.state_root())
    return base / REGISTRY_FILE


def entries(root: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """{full name: {path, family, set, spec}} from the registry file ({} when there is none)."""
    path = registry_path(root)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the backbone registry {path} ({e}): fix or delete the file") from e
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a tlpipe backbone registry (format {_FORMAT!r}): move it away")
    return dict(data.get("backbones") or {})


def _write(items: Mapping[str, Any], root: str | os.PathLike | None) -> Path:
    from fsspec.implementations.local import LocalFileSystem

    from feature_store.shards import write_json_atomic

    path = registry_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    # readers see the old file or the new one, never half of one
    write_json_atomic(LocalFileSystem(), str(path),
                      {"format": _FORMAT, "version": 1, "backbones": dict(items)})
    return path


def _lookup(name: str, items: Mapping[str, Any]) -> str | None:
    """The full registered name for ``name`` (``family/NAME`` or just ``NAME``), or None."""
    if name in items:
        return name
    hits = [k for k in items if parse_name(k).arch_tag == name]
    return hits[0] if len(hits) == 1 else None


def _snapshot(entry: Mapping[str, Any], problem: str) -> BackboneSpec:
    snap = dict(entry["spec"])
    snap["description"] = f"{problem}; {snap.get('description', '')}"
    return BackboneSpec.from_dict(snap)


def _spec(full: str, entry: Mapping[str, Any]) -> BackboneSpec:
    if Path(entry["path"]).exists():
        return spec_from_folder(entry["path"], name=full, family=entry.get("family"), overrides=entry.get("set"))
    return _snapshot(entry, f"registered folder {entry['path']} is not readable on this machine ({socket.gethostname()})")


def registered_spec(name: str, root: str | os.PathLike | None = None) -> BackboneSpec | None:
    """The spec registered under ``name`` (None when no such name is registered)."""
    items = entries(root)
    full = _lookup(name, items)
    return _spec(full, items[full]) if full else None


def registered_specs(root: str | os.PathLike | None = None) -> list[BackboneSpec]:
    """Every registered spec; one whose folder no longer derives is listed from its snapshot (so a
    broken folder shows up in `tlpipe backbones list` instead of breaking it)."""
    out = []
    for full, entry in sorted(entries(root).items()):
        try:
            out.append(_spec(full, entry))
        except (WeightsUnavailableError, ValueError) as e:
            out.append(_snapshot(entry, f"registered folder {entry['path']} no longer reads as a backbone ({e})"))
    return out


def add(name: str, path: str | os.PathLike, *, family: str | None = None,
        overrides: Mapping[str, Any] | None = None, root: str | os.PathLike | None = None,
        reserved: frozenset[str] | set[str] = frozenset(), replace: bool = False) -> BackboneSpec:
    """Register the folder ``path`` as ``name`` (``NAME`` becomes ``family/NAME``); returns its spec.
    ``reserved``: names that may not be taken (the built-in catalogue)."""
    folder = Path(path).expanduser().resolve()
    overrides = spec_overrides(dict(overrides or {}), "--set")
    probe = spec_from_folder(folder, family=family, overrides=overrides)  # fails early on a bad folder
    try:
        parsed = parse_name(name)
    except ValueError as e:
        raise UnknownBackboneError(name, f"cannot register {name!r}: {e}") from None
    full = str(parsed) if parsed.family else f"{probe.family}/{parsed.arch_tag}"
    if full in reserved:
        raise UnknownBackboneError(name, f"{full!r} is a built-in backbone; register the folder under another name")
    items = entries(root)
    same = [k for k in items if k == full or parse_name(k).arch_tag == parse_name(full).arch_tag]
    if same and not (replace and same == [full]):
        # short names resolve too, so two registrations may not share one
        raise UnknownBackboneError(
            name, f"{same[0]!r} is already registered (as {items[same[0]]['path']}): "
                  f"`tlpipe backbones remove {same[0]}` first, or pick another name")
    spec = spec_from_folder(folder, name=full, family=family, overrides=overrides)
    items[full] = {"path": str(folder), "family": family, "set": overrides, "spec": spec.to_dict()}
    _write(items, root)
    return spec


def remove(name: str, root: str | os.PathLike | None = None) -> str:
    """Forget a registered name (the folder is left alone); returns the full name removed."""
    items = entries(root)
    full = _lookup(name, items)
    if full is None:
        known = ", ".join(sorted(items)) or "none"
        raise UnknownBackboneError(name, f"no backbone registered as {name!r} in {registry_path(root)} (registered: {known})")
    del items[full]
    _write(items, root)
    return full
