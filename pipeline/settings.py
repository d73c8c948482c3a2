"""Names and defaults every package shares, defined once: where state and caches live, the
experiment name. Environment variables are read at call time, never at import."""

from __future__ import annotations

import os
import re
from pathlib import Path

#: environment variable naming the state root (feature store, MLflow store, serving state)
STATE_ROOT_ENV = "TLPIPE_HOME"
#: the state root when neither an option nor $TLPIPE_HOME names one (relative to the cwd)
DEFAULT_STATE_ROOT = ".tlpipe"
#: environment variable naming the feature store root when it is not ``<state root>/features``:
#: a path or an fsspec URL (``s3://bucket/tlpipe/features``, ``gs://...``, ``file:///...``;
#: the filesystem's fsspec package must be installed, e.g. s3fs) that every job and node shares
FEATURES_ENV = "TLPIPE_FEATURES"
#: environment variable naming the cache root (unpacked archives, exports, compiled models)
CACHE_DIR_ENV = "TLPIPE_CACHE_DIR"
#: the MLflow experiment sweeps log to
DEFAULT_EXPERIMENT = "tlpipe-sweep"


class StateRootError(ValueError):
    """The state root names something that is not a local directory."""


def state_root(root: str | os.PathLike | None = None) -> Path:
    """`root`, else ``$TLPIPE_HOME``, else ``./.tlpipe``: a local directory (``file://`` URLs
    accepted). It holds per-machine state (sweep scratch, downloaded models, the default MLflow
    store); what must be shared goes elsewhere: features to ``$TLPIPE_FEATURES`` (any fsspec URL),
    runs and models to an MLflow server (``$MLFLOW_TRACKING_URI``)."""
    value = os.fspath(root or os.environ.get(STATE_ROOT_ENV) or DEFAULT_STATE_ROOT)
    # "scheme:/" also catches URLs that went through Path() ("s3://b" -> "s3:/b"); one-letter
    # schemes are Windows drives
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):/", value)
    if scheme and scheme.group(1).lower() == "file":
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(value).path))
    if scheme:
        url = re.sub(r"^([^:/]+):/(?!/)", r"\1://", value).rstrip("/")  # undo Path()'s "s3:/b"
        raise StateRootError(
            f"the state root must be a local directory, got {url!r}; put the feature store on "
            f"shared storage with {FEATURES_ENV}={url}/features and runs and models on "
            "an MLflow server with MLFLOW_TRACKING_URI (deploy/PRODUCTION.md)")
    return Path(value)


def features_root(root: str | os.PathLike | None = None) -> str:
    """Where the feature store lives: ``$TLPIPE_FEATURES`` (a path or fsspec URL), else
    ``<state root>/features`` (`state_root(root)`)."""
    return os.environ.get(FEATURES_ENV) or str(state_root(root) / "features")


def cache_dir() -> Path:
    """``$TLPIPE_CACHE_DIR`` or ``~/.cache/tlpipe``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tlpipe"
