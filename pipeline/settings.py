"""Names and defaults every package shares, defined once: where state and caches live, the
experiment name. Environment variables are read at call time, never at import."""

from __future__ import annotations

import os
from pathlib import Path

#: environment variable naming the state root (feature store, MLflow store, serving state)
STATE_ROOT_ENV = "TLPIPE_HOME"
#: the state root when neither an option nor $TLPIPE_HOME names one (relative to the cwd)
DEFAULT_STATE_ROOT = ".tlpipe"
#: environment variable naming the cache root (unpacked archives, exports, compiled models)
CACHE_DIR_ENV = "TLPIPE_CACHE_DIR"
#: the MLflow experiment sweeps log to
DEFAULT_EXPERIMENT = "tlpipe-sweep"


def state_root(root: str | os.PathLike | None = None) -> Path:
    """`root`, else ``$TLPIPE_HOME``, else ``./.tlpipe``."""
    return Path(root or os.environ.get(STATE_ROOT_ENV) or DEFAULT_STATE_ROOT)


def cache_dir() -> Path:
    """``$TLPIPE_CACHE_DIR`` or ``~/.cache/tlpipe``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tlpipe"
