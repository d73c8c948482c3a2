"""Data intake: find, validate, de-duplicate and split a labelled image dataset.

    from pipeline.data import load_dataset
    ds = load_dataset("photos/")          # ImageFolder, manifest, HF save_to_disk folder, hub id
    ds.card.render()                      # rich tables; ds.card.to_dict() for JSON

Several labels per image (`path,labels` with `a|b`, JSONL lists, HF Sequence(ClassLabel)):
detected, or forced with `load_dataset(..., multi_label=True)`; records then carry
`labels` (the set) and `label` (its key, "a|b"), `ds.multi_label` is True and
`ds.label_matrix(split)` gives the indicator matrix (see `pipeline.data.dataset`).
"""

from pipeline.data.card import DatasetCard, dataset_hash
from pipeline.data.dataset import Dataset, load_dataset
from pipeline.data.records import (
    SPLITS,
    DatasetError,
    ExcludedFile,
    ImageRecord,
    display_path,
    normalise_split,
)

__all__ = [
    "SPLITS",
    "Dataset",
    "DatasetCard",
    "DatasetError",
    "ExcludedFile",
    "ImageRecord",
    "dataset_hash",
    "display_path",
    "load_dataset",
    "normalise_split",
]
