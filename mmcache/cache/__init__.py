"""The HDF5 feature store (contract 3)."""

from __future__ import annotations

from mmcache.cache.store import FeatureStore, StoreReader, manifest_path, store_path

__all__ = ["FeatureStore", "StoreReader", "manifest_path", "store_path"]
