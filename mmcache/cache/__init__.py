"""The HDF5 feature store (contract 3)."""

from __future__ import annotations

from mmcache.cache.store import (
    FeatureStore,
    SplitData,
    StoreReader,
    VerifyReport,
    find_stores,
    manifest_ids,
    manifest_path,
    store_path,
    verify_store,
)

__all__ = ["FeatureStore", "SplitData", "StoreReader", "VerifyReport", "find_stores", "manifest_ids", "manifest_path",
           "store_path", "verify_store"]
