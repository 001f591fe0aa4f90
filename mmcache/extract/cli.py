"""`mmcache extract` (being built)."""

from __future__ import annotations


def extract(dataset: str) -> None:
    """Extract features of DATASET into feature stores."""
    raise NotImplementedError
