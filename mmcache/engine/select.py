"""Validation and selection: per-epoch metrics from a confusion matrix, the curve row layout, best-epoch selection
with early stopping, and post-hoc logit adjustment.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from mmcache.engine.metrics import LOWER_IS_BETTER, SELECT_METRICS, auroc, better, softmax
from mmcache.errors import MMCacheError

IGNORE = -100  # target of a row without a label for a task (cross_entropy's ignore_index)
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}  # report order; other split names follow, sorted


def logit_offsets(class_counts: Mapping[str, torch.Tensor], tau: float,
                  labels: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[float]]:
    """Post-hoc logit adjustment (Menon et al. 2021): per task, tau * log(prior) with the prior from the train
    class counts; `adjust_logits` subtracts it (tau > 0: toward balanced error; tau < 0 adds |tau| log p(y)).
    Empty when tau is 0. A class without train rows has no prior: an error naming it."""
    if not tau:
        return {}
    out: dict[str, list[float]] = {}
    for t, counts in class_counts.items():
        c = counts.double().cpu()
        if bool((c <= 0).any()):
            k = int((c <= 0).nonzero()[0])
            name = labels[t][k] if labels is not None and t in labels else str(k)
            raise MMCacheError(f"--logit-adjust: class {name!r} of task {t!r} has no train rows, so its prior is 0; "
                               "leave --logit-adjust at 0 for this data")
        out[t] = (tau * torch.log(c / c.sum())).tolist()
    return out


def adjust_logits(logits: Mapping[str, Any], offsets: Mapping[str, Sequence[float]] | None) -> dict[str, Any]:
    """`logits` (task -> [N, C] tensor or array) minus each task's offsets from `logit_offsets` (unchanged
    where a task has none)."""
    if not offsets:
        return dict(logits)
    out = {}
    for t, x in logits.items():
        off = offsets.get(t)
        if off is None:
            out[t] = x
        elif isinstance(x, torch.Tensor):
            out[t] = x - torch.tensor(off, dtype=x.dtype, device=x.device)
        else:
            out[t] = x - np.asarray(off, dtype=x.dtype)
    return out


def parse_select(spec: str | None, tasks: list[str], default_metric: str) -> tuple[str, str]:
    """`[task:]metric` -> (task, metric); the task defaults to the primary (first) one."""
    spec = spec or default_metric
    task, _, metric = spec.rpartition(":")
    task = task or tasks[0]
    if task not in tasks:
        raise MMCacheError(f"--select {spec!r}: unknown task {task!r}; tasks are {tasks}")
    if metric not in SELECT_METRICS:
        raise MMCacheError(f"--select {spec!r}: unknown metric {metric!r}; choose one of {', '.join(SELECT_METRICS)}")
    return task, metric


def val_metrics(y: torch.Tensor, logits: torch.Tensor, metric: str) -> dict[str, float]:
    """Per-epoch validation metrics: accuracy and macro / weighted F1 from a confusion matrix (no sklearn
    per epoch), plus `metric` itself when it needs more (AUROC, top-2). Unlabelled rows are ignored."""
    return val_metrics_many(y, logits[:, None], metric)[0]


def val_metrics_many(y: torch.Tensor, logits: torch.Tensor, metric: str) -> list[dict[str, float]]:
    """`val_metrics` of K configs at once: `logits` [N, K, C] -> one dict per config. The confusion matrices
    of all configs come from one `bincount`, so a stacked sweep's per-epoch validation costs a few ops."""
    keep = y != IGNORE
    y, logits = y[keep], logits[keep].float()
    n, k, c = logits.shape
    if n == 0:
        return [{} for _ in range(k)]
    pred = logits.argmax(-1)  # [N, K]
    code = torch.arange(k, device=y.device) * (c * c) + (y * c)[:, None] + pred
    cm = torch.bincount(code.reshape(-1), minlength=k * c * c).reshape(k, c, c).double()
    tp = cm.diagonal(dim1=1, dim2=2)  # [K, C]
    denom = cm.sum(1) + cm.sum(2)
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    support = cm.sum(2)
    cols = {"accuracy": tp.sum(1) / n, "macro_f1": f1.mean(1), "weighted_f1": (f1 * support).sum(1) / n}
    if metric == "top2_accuracy" and c > 2:
        # scikit-learn's top_k_accuracy_score ranking (as the final metrics): a stable sort, ties to the later class
        top = logits.sort(dim=-1, stable=True).indices[..., -2:]
        cols[metric] = (top == y[:, None, None]).any(-1).double().mean(0)
    out = [dict(zip(cols, vals, strict=True)) for vals in zip(*(v.tolist() for v in cols.values()), strict=True)]
    if metric == "auroc":
        yn, ln = y.cpu().numpy(), logits.cpu().numpy()
        for j in range(k):
            v = auroc(yn, softmax(ln[:, j]))
            out[j][metric] = float("nan") if v is None else v
    return out


def curve_row(epoch: int, train_loss: float, val: dict[str, float], lr: float, seconds: float) -> dict[str, Any]:
    """One row of the per-epoch curves (the same columns for every trainer)."""
    return {"epoch": epoch, "train_loss": train_loss, "val_loss": val.get("loss", float("nan")),
            **{f"val_{k}": v for k, v in val.items() if k != "loss"}, "lr": lr, "seconds": seconds}


def snapshot(module: nn.Module, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """A detached copy of `module`'s state (or of `keys` of it)."""
    state = module.state_dict()
    wanted = state if keys is None else {k: state[k] for k in keys}
    return {k: v.detach().clone() for k, v in wanted.items()}


class Selector:
    """Best-epoch selection on a validation metric, with early stopping after `patience` epochs
    without a better value (0 = never). NaN (undefined, e.g. AUROC with one class) never wins."""

    def __init__(self, metric: str, patience: int = 0) -> None:
        self.metric = metric
        self.patience = patience
        self.mode: Literal["min", "max"] = "min" if metric in LOWER_IS_BETTER else "max"
        self.best_value: float | None = None
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stale = 0
        self.stopped = False

    def update(self, epoch: int, value: float, state: Any) -> bool:
        """Record epoch `epoch`'s `value`; `state()` (a callable) is snapshotted when it is the best so far.
        Returns True when this epoch is the new best."""
        if not math.isnan(value) and better(self.metric, value, self.best_value):
            self.best_value, self.best_epoch, self.stale = value, epoch, 0
            self.best_state = state()
            return True
        self.stale += 1
        if self.patience and self.stale >= self.patience:
            self.stopped = True
        return False

    def result(self) -> tuple[int, float, dict[str, torch.Tensor]]:
        """(best epoch, its value, its state); an error when the metric was undefined in every epoch."""
        if self.best_value is None or self.best_state is None:
            raise MMCacheError(f"validation {self.metric} was undefined in every epoch (e.g. AUROC with one class "
                               "in the val split); choose another --select metric")
        return self.best_epoch, self.best_value, self.best_state
