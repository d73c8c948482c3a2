"""Classification heads over cached (N, D) float32 features.

Every head is a scikit-learn style estimator (``fit(X, y) -> self``, ``predict_proba``,
``predict``, ``classes_``, ``get_params``) that saves to a directory without pickle
(``save(dir)``; ``load_head(dir)`` or ``<Head>.load(dir)``). See ``base.py`` for the contract.

Each head module registers its class with ``@register`` (``registry.py``); importing this
package imports them all, so ``HEADS`` is complete. The head modules never import this package.
"""

from __future__ import annotations

from pipeline.heads.base import Head, read_config
from pipeline.heads.errors import HeadInputError, NotFittedError
from pipeline.heads.linear_probe import LinearProbe  # noqa: I001 - import order = HEADS order
from pipeline.heads.knn import KNN
from pipeline.heads.nearest_centroid import NearestCentroid
from pipeline.heads.zero_shot import ZeroShot
from pipeline.heads.tip_adapter import TipAdapter
from pipeline.heads.mlp import MLP
from pipeline.heads.ensemble import Ensemble
from pipeline.heads.registry import HEADS, load_head

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
    "read_config",
]
