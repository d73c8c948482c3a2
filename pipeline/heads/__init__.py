"""Classification heads over cached (N, D) float32 features.

Every head is a scikit-learn style estimator (``fit(X, y) -> self``, ``predict_proba``,
``predict``, ``classes_``, ``get_params``) that saves to a directory without pickle
(``save(dir)``; ``load_head(dir)`` or ``<Head>.load(dir)``). See ``base.py`` for the contract.
"""

from __future__ import annotations

import os

from pipeline.heads.base import Head, HeadInputError, NotFittedError, read_config
from pipeline.heads.ensemble import Ensemble
from pipeline.heads.knn import KNN
from pipeline.heads.linear_probe import LinearProbe
from pipeline.heads.mlp import MLP
from pipeline.heads.nearest_centroid import NearestCentroid
from pipeline.heads.tip_adapter import TipAdapter
from pipeline.heads.zero_shot import ZeroShot

#: registry name -> class (the name is also the class name written to config.json)
HEADS: dict[str, type[Head]] = {
    cls.__name__: cls
    for cls in (LinearProbe, KNN, NearestCentroid, ZeroShot, TipAdapter, MLP, Ensemble)
}


def load_head(path: str | os.PathLike) -> Head:
    """Load any saved head, dispatching on the class recorded in ``path/config.json``."""
    name = read_config(path)["class"]
    if name not in HEADS:
        raise ValueError(f"{path}: unknown head class {name!r}; known: {sorted(HEADS)}")
    return HEADS[name].load(path)


__all__ = [
    "HEADS",
    "KNN",
    "Ensemble",
    "MLP",
    "Head",
    "HeadInputError",
    "LinearProbe",
    "NearestCentroid",
    "NotFittedError",
    "TipAdapter",
    "ZeroShot",
    "load_head",
]
