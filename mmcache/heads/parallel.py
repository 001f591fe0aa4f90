"""Data-parallel training of one head under torchrun: each rank reads and trains on its own rows of every batch.

Every rank draws the same batch order (the same seed), takes rows `rank::world` of each batch (`RankShard.rows`;
a streamed store is then read only for those rows), runs its forward and backward, and the gradients are averaged
over the ranks with one `all_reduce` of all of them flattened (what DistributedDataParallel does, without its
hooks, so the lockstep and stacked trainers keep their own step), before each rank's identical optimizer step.
Weights stay equal on every rank; validation and the final evaluation run on each rank and rank 0 writes the run.
A step is taken only when every rank has at least 2 rows (BatchNorm cannot train on one).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RankShard:
    """This process's place in the group: rank `rank` of `world`."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> RankShard:
        """The torch.distributed group this process is in (rank 0 of 1 without one)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's rows of batch `idx` (all of them when alone)."""
        return idx[self.rank::self.world] if self.parallel else idx

    def min_batch(self) -> int:
        """Rows a batch needs so that every rank trains on at least 2."""
        return 2 * self.world

    def average_grads(self, params: Iterable[torch.Tensor]) -> None:
        """Average the gradients of `params` over the ranks (a missing gradient counts as zeros)."""
        if not self.parallel:
            return
        import torch.distributed as dist

        ps = [p for p in params if p.requires_grad]
        if not ps:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps])
        dist.all_reduce(flat)
        flat /= self.world
        off = 0
        for p in ps:
            n = p.numel()
            p.grad = flat[off:off + n].view_as(p).clone()
            off += n

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over the ranks (a logged loss)."""
        if not self.parallel:
            return t
        import torch.distributed as dist

        out = t.detach().clone().float()
        dist.all_reduce(out)
        return out / self.world
