"""The classification metrics, kept here for older imports: they live in `mmcache.engine.metrics`."""

from __future__ import annotations

from mmcache.engine.metrics import (
    LOWER_IS_BETTER,
    SELECT_METRICS,
    auroc,
    better,
    classification_metrics,
    failed_checks,
    prediction_checks,
    softmax,
)

__all__ = ["LOWER_IS_BETTER", "SELECT_METRICS", "auroc", "better", "classification_metrics", "failed_checks",
           "prediction_checks", "softmax"]
