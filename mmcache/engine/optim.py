"""The optimizer and its learning-rate schedule: parameter groups (learned loss weights undecayed, encoders
at their own rate), adam / adamw / sgd, and torch's schedulers (cosine per step with a linear warm-up, plateau
per epoch, none).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from mmcache.engine.config import OPTIMIZERS, SCHEDULES
from mmcache.errors import MMCacheError

__all__ = ["OPTIMIZERS", "SCHEDULES", "Schedule", "make_optimizer", "param_groups"]


def param_groups(head: nn.Module, criterion: nn.Module | None = None, encoders: nn.Module | None = None,
                 encoder_lr: float | None = None) -> list[dict[str, Any]]:
    """Head parameters; the criterion's learned loss weights without weight decay (decaying log-variances
    toward 0 would bias the weighting); trainable encoder parameters at `encoder_lr`. Empty groups dropped."""
    groups: list[dict[str, Any]] = [{"params": [p for p in head.parameters() if p.requires_grad]}]
    if criterion is not None:
        groups.append({"params": [p for p in criterion.parameters() if p.requires_grad], "weight_decay": 0.0})
    if encoders is not None:
        enc: dict[str, Any] = {"params": [p for p in encoders.parameters() if p.requires_grad]}
        if encoder_lr is not None:
            enc["lr"] = encoder_lr
        groups.append(enc)
    return [g for g in groups if g["params"]]


def make_optimizer(name: str, groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """adam (L2 in the gradient), adamw (decoupled decay) or sgd (momentum 0.9)."""
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise MMCacheError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


class Schedule:
    """The learning-rate schedule of one optimizer, built from torch's schedulers.

    `cosine`: per optimizer step, a linear warm-up over `warmup_steps` then cosine decay to 0 at
    `total_steps`; `plateau`: halve after 3 epochs without a better selection metric; `none`.
    Call `step()` after every optimizer step and `epoch_end(value)` after every validation.
    """

    def __init__(self, name: str, opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 mode: Literal["min", "max"] = "max") -> None:
        if name not in SCHEDULES:
            raise MMCacheError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
        self.name = name
        self.per_step: Any = None
        self.plateau: Any = None
        total_steps = max(1, int(total_steps))
        warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))
        sched = torch.optim.lr_scheduler
        if name == "cosine":
            cosine = sched.CosineAnnealingLR(opt, T_max=total_steps - warmup_steps)
            if warmup_steps:
                warm = sched.LinearLR(opt, start_factor=1.0 / (warmup_steps + 1), total_iters=warmup_steps)
                self.per_step = sched.SequentialLR(opt, [warm, cosine], milestones=[warmup_steps])
            else:
                self.per_step = cosine
        elif name == "plateau":
            self.plateau = sched.ReduceLROnPlateau(opt, mode=mode, factor=0.5, patience=3)

    def step(self) -> None:
        """After each optimizer step."""
        if self.per_step is not None:
            self.per_step.step()

    def epoch_end(self, value: float) -> None:
        """After each validation, with the selection metric's value."""
        if self.plateau is not None and not math.isnan(value):
            self.plateau.step(value)

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state (for checkpoints)."""
        s = self.per_step or self.plateau
        return s.state_dict() if s is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        s = self.per_step or self.plateau
        if s is not None and state:
            s.load_state_dict(state)
