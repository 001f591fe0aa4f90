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
from mmcache.data import (  # noqa: E402,F401  isort: skip
    demo,
    fakeddit,
    hateful_memes,
    meld,
    mmhs150k,
    mvsa,
    table,
    twitter,
    webdataset,
)

__all__ = ["DATASETS", "SPLITS", "Dataset", "LabelSpace", "Sample", "dataset_names", "load_dataset", "register_dataset"]
