"""Embedding feature store (Parquet shards on any fsspec filesystem) and a FAISS support index.

Pure compute: no Ray, MLflow or web imports. `SupportIndex` (FAISS) is imported lazily.
"""

from feature_store.reports import FeatureSetInfo, GcReport, VerifyReport
from feature_store.shards import ShardCorruptError
from feature_store.store import FeatureStore

__all__ = ["FeatureStore", "FeatureSetInfo", "GcReport", "VerifyReport", "ShardCorruptError",
           "SupportIndex"]


def __getattr__(name: str):
    if name == "SupportIndex":
        from feature_store.index import SupportIndex

        return SupportIndex
    raise AttributeError(f"module 'feature_store' has no attribute {name!r}")
