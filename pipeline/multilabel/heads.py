"""The multi-label heads by name, and ``load_multilabel_head(dir)``.

The multi-label heads are deliberately *not* in ``pipeline.heads.registry.HEADS``: that registry
is the single-label candidate vocabulary (the sweep, its CV and its conformance tests fit every
entry with one label per row). ``MULTILABEL_HEADS`` maps the short names a multi-label sweep plan
uses to the classes; ``load_multilabel_head`` dispatches on the class saved in config.json
(same on-disk format as every head: ``pipeline.heads.base.Head.save``).
"""

from __future__ import annotations

import os

from pipeline.heads.registry import read_config
from pipeline.multilabel.base import MultiLabelHead
from pipeline.multilabel.knn import MultiLabelKNN
from pipeline.multilabel.mlp import MultiLabelMLP
from pipeline.multilabel.probe import OneVsRestProbe

#: short name -> class (the candidate vocabulary of a multi-label sweep)
MULTILABEL_HEADS: dict[str, type[MultiLabelHead]] = {
    "linear": OneVsRestProbe,
    "knn": MultiLabelKNN,
    "mlp": MultiLabelMLP,
}


def make_multilabel_head(name: str, **params) -> MultiLabelHead:
    """A fresh head by short name ("linear", "knn", "mlp") or class name."""
    by_class = {cls.__name__: cls for cls in MULTILABEL_HEADS.values()}
    cls = MULTILABEL_HEADS.get(name) or by_class.get(name)
    if cls is None:
        raise ValueError(f"unknown multi-label head {name!r}; choose one of {sorted(MULTILABEL_HEADS)}")
    return cls(**params)


def load_multilabel_head(path: str | os.PathLike) -> MultiLabelHead:
    """Load a saved multi-label head (an error if the directory holds another kind of head)."""
    name = read_config(path)["class"]
    by_class = {cls.__name__: cls for cls in MULTILABEL_HEADS.values()}
    if name not in by_class:
        raise ValueError(f"{path} holds a {name}, not a multi-label head ({sorted(by_class)}); "
                         "load single-label heads with pipeline.heads.load_head")
    return by_class[name].load(path)


__all__ = ["MULTILABEL_HEADS", "MultiLabelHead", "MultiLabelKNN", "MultiLabelMLP", "OneVsRestProbe",
           "load_multilabel_head", "make_multilabel_head"]
