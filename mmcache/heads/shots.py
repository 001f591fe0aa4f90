"""Few-shot training (`--shots K`): K labelled train rows per class of the selection task, drawn by the seed.

Each class's train rows are put in one random order by `numpy.random.default_rng(seed)` and its first K are
kept, so with one seed the rows of K=1 are among those of K=2, 4, ... (a few-shot curve adds rows, it does not
redraw them). A class with fewer than K train rows keeps all it has. Validation and test rows are unchanged
(selection still reads the whole val split); rows without a label of the selection task are dropped from train.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from mmcache.engine import IGNORE, parse_select
from mmcache.errors import MMCacheError

if TYPE_CHECKING:
    from mmcache.heads.data import CachedData


def shot_rows(y: np.ndarray, shots: int, seed: int, n_classes: int) -> np.ndarray:
    """Positions (into `y`, the train rows' labels, IGNORE for none) of `shots` rows per class, sorted."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(n_classes):
        rows = np.flatnonzero(y == c)
        keep.append(rows[rng.permutation(len(rows))[:shots]])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def with_shots(data: CachedData, shots: int, seed: int, select: str | None = None) -> CachedData:
    """`data` whose train split holds `shots` labelled rows per class of the selection task (`select`, as
    `--select`), drawn by `seed`."""
    task, _ = parse_select(select, list(data.tasks), data.labels.metric)
    train = data.split_index.get("train")
    if train is None or len(train) == 0:
        raise MMCacheError(f"--shots {shots}: {data.dataset!r} has no train rows")
    y = data.targets[task][train].cpu().numpy()
    if not (y != IGNORE).any():
        raise MMCacheError(f"--shots {shots}: no train row of {data.dataset!r} has a label of task {task!r}")
    pos = torch.from_numpy(shot_rows(y, shots, seed, data.tasks[task])).to(train.device)
    return replace(data, split_index={**data.split_index, "train": train[pos]})
