"""Contract 4: a head maps named feature arrays per modality to logits per task.

`features` is `{modality: {"pooled": [B,d], "tokens": [B,T,d], "mask": [B,T], ...}}`:
the same arrays the stores hold, whether they come from the cache or a live encoder.
A modality absent from `features` is treated as missing (the head must still run).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mmcache.errors import MMCacheError

Features = dict[str, dict[str, torch.Tensor]]
# modality -> array name -> per-row shape (without the batch dim), e.g. {"image": {"pooled": (512,)}}
InputSpec = dict[str, dict[str, tuple[int, ...]]]


class Head(nn.Module):
    """Base class of fusion heads; subclasses implement `forward(features) -> {task: logits}`."""

    name: str = ""

    def __init__(self, inputs: InputSpec, tasks: dict[str, int], **hparams: Any) -> None:
        super().__init__()
        self.inputs = {m: {k: tuple(v) for k, v in d.items()} for m, d in inputs.items()}
        self.tasks = dict(tasks)
        self.hparams = dict(hparams)

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able config that rebuilds this head with `build_head(**config)`."""
        return {"name": self.name, "inputs": {m: {k: list(v) for k, v in d.items()} for m, d in self.inputs.items()},
                "tasks": self.tasks, "hparams": self.hparams}

    def forward(self, features: Features) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Logits per task, each [B, num_classes]."""
        raise NotImplementedError


HeadClass = type[Head]
HEADS: dict[str, HeadClass] = {}


def register_head(name: str) -> Callable[[HeadClass], HeadClass]:
    """Decorator registering a Head subclass under `name` (`--head NAME`)."""

    def deco(cls: HeadClass) -> HeadClass:
        cls.name = name
        HEADS[name] = cls
        return cls

    return deco


def build_head(name: str, inputs: InputSpec, tasks: dict[str, int], hparams: dict[str, Any] | None = None) -> Head:
    """Build registered head `name` for these inputs and tasks."""
    import mmcache.heads.builtin  # noqa: F401  (heads register on import)

    if name not in HEADS:
        raise MMCacheError(f"unknown head {name!r}; known heads: {', '.join(sorted(HEADS))}")
    return HEADS[name](inputs, tasks, **(hparams or {}))
