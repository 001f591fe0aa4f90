"""Training criteria. One interface: `criterion(logits, targets, teacher=None, epoch=0) -> (loss, parts)`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Criterion(nn.Module):
    """Sum of per-task cross-entropies (the default); subclasses add focal, uncertainty weighting, KD.

    `logits`: task -> [B,C]; `targets`: task -> [B] long, -100 where a row has no label for the task;
    `teacher`: [B,C] cached teacher logits of the primary task or None; `epoch` drives warm-ups.
    Returns the scalar loss and a dict of float parts for logging.
    """

    def __init__(self, tasks: dict[str, int], class_counts: dict[str, torch.Tensor] | None = None,
                 class_weights: bool = False, label_smoothing: float = 0.0, **_: Any) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.label_smoothing = label_smoothing
        if class_weights and class_counts:
            for t, c in class_counts.items():
                # Inverse-frequency weights, normalised to mean 1.
                w = c.float().sum() / (len(c) * c.float().clamp(min=1))
                self.register_buffer(f"w_{t}", w)

    def forward(self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],  # type: ignore[override]
                teacher: torch.Tensor | None = None, epoch: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        parts: dict[str, float] = {}
        total = torch.zeros((), device=next(iter(logits.values())).device)
        for t in self.tasks:
            w = getattr(self, f"w_{t}", None)
            loss = F.cross_entropy(logits[t].float(), targets[t], weight=w, ignore_index=-100,
                                   label_smoothing=self.label_smoothing)
            parts[f"ce_{t}"] = float(loss.detach())
            total = total + loss
        return total, parts


CRITERIA: dict[str, type[Criterion]] = {"ce": Criterion}


def build_criterion(name: str, tasks: dict[str, int], class_counts: dict[str, torch.Tensor] | None = None,
                    **options: Any) -> Criterion:
    """Build criterion `name` ("ce", ...) for `tasks`; `class_counts` (task -> [C] train counts) feeds
    class weights / class-balanced alphas; `options` are the loss flags (label_smoothing, gamma, kd_T, ...)."""
    from mmcache.errors import MMCacheError

    if name not in CRITERIA:
        raise MMCacheError(f"unknown loss {name!r}; known: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name](tasks, class_counts=class_counts, **options)
