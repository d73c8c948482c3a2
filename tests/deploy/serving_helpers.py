"""Constants and helpers shared by the serving tests' conftest and test modules."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

LITE0 = "efficientnet/tf_efficientnet_lite0.in1k"
HEAD_CLASSES = ("airplane", "automobile", "bird")
NEW_CLASS = "frog"
MARGIN = 0.03  # |score - threshold| kept away from the boundary (embedding noise across batches)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_predictor(src: Path, dst: Path, **info) -> Path:
    """A copy of a saved predictor with extra `info` (a new 'version' of the same model)."""
    shutil.copytree(src, dst)
    cfg_path = dst / "predictor.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["info"].update(info)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return dst
