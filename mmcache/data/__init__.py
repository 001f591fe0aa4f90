"""Dataset adapters: native layouts -> `Sample` records + a `LabelSpace` (contract 1)."""

from __future__ import annotations

from mmcache.data.base import (
    DATASETS,
    SPLITS,
    Dataset,
    LabelSpace,
    Sample,
    dataset_names,
    load_dataset,
    register_dataset,
)

# Adapters register themselves on import.
from mmcache.data import demo, table  # noqa: E402,F401  isort: skip

__all__ = ["DATASETS", "SPLITS", "Dataset", "LabelSpace", "Sample", "dataset_names", "load_dataset", "register_dataset"]
