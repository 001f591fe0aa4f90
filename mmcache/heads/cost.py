"""What a run costs and what it predicted, recorded by the trainer for every run.

`cost` (in `metrics.json` and the sweep rows): `params` (trainable parameters of the head), `fit_seconds`,
`peak_mem_mb` (CUDA: the most memory torch allocated on the device while the run's group trained; CPU: the
process's peak resident memory so far, which several runs of one process share) and `infer_ms_per_row` (the
head's forward in evaluation mode on up to `INFER_ROWS` test rows, features read included, after one warm-up
batch). `test_predictions`: the selection task's per-row test predictions (ids, labels, probabilities), which
the paired bootstrap of the tables compares across configs (`mmcache.stats`).
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmcache.stats import Predictions

if TYPE_CHECKING:
    from mmcache.heads.base import Head
    from mmcache.heads.data import CachedData

INFER_ROWS = 1024


def reset_peak(device: str | torch.device) -> None:
    """Start counting the peak CUDA memory afresh (nothing to do on CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_memory_mb(device: str | torch.device) -> float:
    """Peak memory in MiB: CUDA's max allocated since `reset_peak`, else the process's peak resident set."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    try:
        import resource
    except ImportError:  # not on POSIX
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


@torch.no_grad()
def inference_ms_per_row(head: Head, data: CachedData, idx: torch.Tensor, rows: int = INFER_ROWS) -> float:
    """Milliseconds per row of the head's evaluation forward on the first `rows` rows of `idx` (one batch of at
    most about `CHUNK_BYTES` of features: token rows are large)."""
    from mmcache.heads.data import CHUNK_BYTES

    idx = idx[:max(2, min(rows, CHUNK_BYTES // max(1, data.row_bytes())))]
    if len(idx) == 0:
        return float("nan")
    was = head.training
    head.eval()
    head(data.batch(idx[:2]))  # warm-up: lazy initialisation, allocator
    dev = idx.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    head(data.batch(idx))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    head.train(was)
    return (time.perf_counter() - t0) * 1000 / len(idx)


def trainable_params(head: torch.nn.Module) -> int:
    return sum(p.numel() for p in head.parameters() if p.requires_grad)


def run_cost(head: Head, data: CachedData, device: str, fit_seconds: float) -> dict[str, Any]:
    """The cost record of a trained head (see the module's docstring)."""
    test = data.split_index.get("test")
    ms = inference_ms_per_row(head, data, test) if test is not None and len(test) else float("nan")
    return {"params": trainable_params(head), "fit_seconds": fit_seconds, "peak_mem_mb": peak_memory_mb(device),
            "infer_ms_per_row": ms}


def test_predictions(data: CachedData, idx: torch.Tensor, logits: dict[str, torch.Tensor], task: str) -> Predictions:
    """Predictions of task `task` on rows `idx` (their logits as evaluated, after any logit adjustment)."""
    prob = torch.softmax(logits[task].double(), 1).cpu().numpy()
    rows = idx.cpu().numpy()
    return Predictions([data.ids[int(i)] for i in rows], data.targets[task][idx].cpu().numpy().astype(np.int64),
                       prob, list(data.labels.tasks[task]))
