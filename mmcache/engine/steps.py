"""What happens at every training step the same way for every trainer: where training stands (`TrainProgress`,
`progress_hook`), the weights' moving average (`EMA`), how many steps an epoch has.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmcache.engine.config import check_ema  # noqa: F401  (importable from here too)
from mmcache.errors import MMCacheError


@dataclass(frozen=True)
class TrainProgress:
    """Where a run stands at a training step: its 0-based epoch, its 0-based optimizer step over the whole
    run, and the run's planned number of steps."""

    epoch: int
    step: int
    total_steps: int

    @property
    def fraction(self) -> float:
        """The share of the run's steps done before this one: 0 at the first step, below 1 at the last."""
        return min(1.0, self.step / max(1, self.total_steps))


def progress_hook(*modules: nn.Module | None) -> Callable[[TrainProgress], None]:
    """One callable that tells every submodule of `modules` defining `set_progress(progress)` where training
    stands (the criterion's warm-ups and late decays, a head's gradient-reversal schedule). Trainers call it
    once per training step, before the forward pass; it is the only way progress reaches heads and losses."""
    found = (getattr(sub, "set_progress", None) for m in modules if m is not None for sub in m.modules())
    targets: list[Callable[[TrainProgress], None]] = [f for f in found if callable(f)]

    def tell(progress: TrainProgress) -> None:
        for set_progress in targets:
            set_progress(progress)

    return tell


class EMA:
    """Exponential moving average of `module`'s trainable parameters: started from their initial values and
    updated after every optimizer step with torch's `get_ema_multi_avg_fn` (ema = decay * ema + (1 - decay) * w).
    Buffers (BatchNorm statistics) stay the module's own. Inside `applied()` the module holds the averages
    (evaluate, select and save there); on leaving it holds its trained weights again."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        self.decay = check_ema(decay)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self._update = get_ema_multi_avg_fn(self.decay)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, p in enumerate(self.params):  # torch's foreach update takes one device and dtype per call
            groups.setdefault((p.device, p.dtype), []).append(i)
        self._groups = [([self.shadow[i] for i in ix], [self.params[i] for i in ix]) for ix in groups.values()]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """After each optimizer step."""
        for shadow, params in self._groups:
            self._update(shadow, params, self.updates)
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The module holds the averaged weights inside the block, its trained weights again after it."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, trained, strict=True):
                    p.copy_(w)

    def state_dict(self) -> dict[str, Any]:
        """The averages and the update count (for checkpoints)."""
        return {"shadow": [s.detach().clone() for s in self.shadow], "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        if len(state["shadow"]) != len(self.shadow):
            raise MMCacheError(f"the saved weight averages hold {len(state['shadow'])} tensors, the model "
                               f"{len(self.shadow)}; pass --overwrite to start the run over")
        with torch.no_grad():
            for s, v in zip(self.shadow, state["shadow"], strict=True):
                s.copy_(v)
        self.updates = int(state["updates"])


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps per epoch over `n` rows: every batch of at least 2 rows (BatchNorm cannot train on one)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)
