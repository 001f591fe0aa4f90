"""Cached-heads training in lockstep: the members of a group (configs that share rows, epochs and batch size),
their batch orders, and the loop that trains them with one batch gather per seed and step.

Each member keeps its own head, criterion, optimizer, schedule, selection and random stream, so each result equals
what `heads train` gives for that config alone. The stacked probes (`mmcache.heads.stacked`) read the same members
and batch orders.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from mmcache.engine import (
    EMA,
    IGNORE,
    Schedule,
    Selector,
    TrainProgress,
    adjust_logits,
    make_optimizer,
    param_groups,
    progress_hook,
    snapshot,
    steps_per_epoch,
    val_metrics,
)
from mmcache.engine.loop import EpochBar, EpochRow, TaskBase, fit, step_end
from mmcache.errors import MMCacheError

if TYPE_CHECKING:
    from mmcache.heads.base import Head
    from mmcache.heads.data import CachedData
    from mmcache.heads.losses import Criterion
    from mmcache.heads.train import TrainConfig
    from mmcache.manifest import Manifest

EVAL_BATCH = 8192


def log(cfg: TrainConfig, msg: str) -> None:
    """A note on stderr unless the config is quiet."""
    if not cfg.quiet:
        print(msg, file=sys.stderr)


@torch.no_grad()
def logits_of(head: Head, chunks: Iterable[Any], tasks: dict[str, int], n: int) -> dict[str, torch.Tensor]:
    was = head.training
    head.eval()
    outs: dict[str, list[torch.Tensor]] = {}
    for feats in chunks:
        out = head(feats)
        for t in tasks:
            outs.setdefault(t, []).append(out[t].float())
    head.train(was)
    return {t: torch.cat(outs[t]) if outs.get(t) else torch.zeros(n, c) for t, c in tasks.items()}


def eval_loss(crit: Criterion, logits: dict[str, torch.Tensor], data: CachedData, idx: torch.Tensor,
               epoch: int) -> float:
    with torch.no_grad():
        targets = {t: data.targets[t][idx] for t in data.tasks}
        teacher = data.teacher[idx] if data.teacher is not None else None
        loss, _ = crit(logits, targets, teacher, epoch)
    return float(loss)


@dataclass(eq=False)  # members are told apart by identity (they hold modules and tensors)
class Member:
    """One config of a lockstep group: its head, criterion, optimizer, schedule, selection, random stream."""

    cfg: TrainConfig
    data: CachedData
    head: Head
    crit: Criterion
    sel_task: str
    sel_metric: str
    rng: torch.Tensor  # torch's CPU generator state, swapped in around this member's forward passes
    cuda_rng: torch.Tensor | None = None
    opt: torch.optim.Optimizer | None = None
    sched: Schedule | None = None
    selector: Selector | None = None
    curves: list[dict[str, Any]] = field(default_factory=list)
    loss_sum: torch.Tensor | None = None
    steps: int = 0
    # results
    best_epoch: int = 0
    best_value: float = float("nan")
    select: dict[str, Any] = field(default_factory=dict)
    fit_seconds: float = 0.0
    busy: float = 0.0  # seconds spent in this member's own forward passes (lockstep groups)
    final_logits: dict[str, dict[str, torch.Tensor]] | None = None  # split -> task -> logits, when batched
    ema: EMA | None = None  # the head's weight average (cfg.ema)
    tau: float = 0.0  # logit adjustment (cfg.logit_adjust, or the head's default)
    offsets: dict[str, list[float]] = field(default_factory=dict)  # task -> tau * log(prior), subtracted at evaluation
    keep_last: bool = False  # a refit: keep the last epoch's weights, not the best on val (mmcache.heads.refit)

    def order_key(self) -> tuple[Any, ...]:
        """Members with the same key see the same batches (same seed, same sampling)."""
        return (self.cfg.seed, self.cfg.oversample, self.sel_task if self.cfg.oversample else None,
                tuple(sorted(self.cfg.upsample.items())))

    def rng_in(self) -> None:
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.data.targets[self.sel_task].device)

    def rng_out(self) -> None:
        self.rng = torch.get_rng_state()
        if self.cuda_rng is not None:
            self.cuda_rng = torch.cuda.get_rng_state(self.data.targets[self.sel_task].device)


def labelled_train(data: CachedData) -> torch.Tensor:
    train_idx = data.split_index["train"]
    labeled = torch.zeros(len(train_idx), dtype=torch.bool, device=train_idx.device)
    for t in data.tasks:
        labeled |= data.targets[t][train_idx] != IGNORE
    out = train_idx[labeled]  # rows without any label teach nothing
    if len(out) < 2:  # every batch needs 2 rows (BatchNorm cannot train on one): nothing would train
        raise MMCacheError(f"{data.dataset!r} has {len(out)} labelled train row(s); a head needs at least 2")
    return out


def check_upsample(data: CachedData, upsample: dict[str, int]) -> None:
    """Refuse an `--upsample` name that is not a source dataset of `data`, listing its sources."""
    from mmcache.data.combined import check_upsample_sources

    man = data.manifest
    known = list(dict.fromkeys(s for s in (man.row_sources if man is not None else []) if s is not None))
    check_upsample_sources(upsample, known, repr(data.dataset),
                           "a cache extracted from several (mmcache extract --dataset a,b --label-map FILE)")


def upsample_pool(data: CachedData, train_idx: torch.Tensor, upsample: dict[str, int]) -> torch.Tensor | None:
    """The positions (into `train_idx`) one epoch draws from with `--upsample NAME=K`: each train row of source
    dataset NAME K times, the others once, in row order (as `finetune run`'s pool); None without upsampling.
    A name that is not a source of the dataset is an error listing its sources."""
    if not upsample:
        return None
    check_upsample(data, upsample)
    man = cast("Manifest", data.manifest)
    src_of = dict(zip(man.ids, man.row_sources, strict=True))
    times = torch.tensor([upsample.get(src_of.get(data.ids[int(i)]) or "", 1) for i in train_idx.tolist()])
    return torch.repeat_interleave(torch.arange(len(train_idx)), times).to(train_idx.device)


class BatchOrders:
    """One permutation per epoch per (seed, sampling) key, from a generator seeded like a single run. With
    `--upsample` (the same for every member: it is part of the lockstep group's key) an epoch permutes the
    upsampled pool of rows; `n` is the rows one epoch trains on."""

    def __init__(self, members: list[Member], data: CachedData, train_idx: torch.Tensor) -> None:
        self.pool = upsample_pool(data, train_idx, members[0].cfg.upsample)
        self.n = len(train_idx) if self.pool is None else len(self.pool)
        self.train_idx = train_idx
        self.gens: dict[tuple[Any, ...], torch.Generator] = {}
        self.weights: dict[tuple[Any, ...], torch.Tensor | None] = {}
        for m in members:
            key = m.order_key()
            if key in self.gens:
                continue
            self.gens[key] = torch.Generator().manual_seed(m.cfg.seed)
            w = None
            if m.cfg.oversample:
                # Each row drawn with probability 1/count(its class in the selection task): classes come up equally.
                y = data.targets[m.sel_task][train_idx].cpu()
                counts = torch.bincount(y[y != IGNORE], minlength=data.tasks[m.sel_task]).double()
                w = torch.where(y != IGNORE, 1.0 / counts[y.clamp(min=0)].clamp(min=1), torch.zeros(len(y)).double())
                if self.pool is not None:
                    w = w[self.pool.cpu()]
            self.weights[key] = w

    def epoch(self) -> dict[tuple[Any, ...], torch.Tensor]:
        """Positions (into the labelled train rows) in this epoch's order, per key."""
        out = {}
        for key, gen in self.gens.items():
            w = self.weights[key]
            order = torch.multinomial(w, self.n, replacement=True, generator=gen) if w is not None \
                else torch.randperm(self.n, generator=gen)
            out[key] = order if self.pool is None else self.pool.cpu()[order]
        return out


class LockstepTask(TaskBase):
    """A lockstep group on the engine's fit loop (`mmcache.engine.loop`): each member is a selection unit."""

    def __init__(self, members: list[Member], data: CachedData) -> None:
        cfg0 = members[0].cfg
        self.units, self.data, self.cfg0 = members, data, cfg0
        self.device = data.targets[members[0].sel_task].device
        self.train_idx = labelled_train(data)
        self.orders = BatchOrders(members, data, self.train_idx)
        self.n = self.orders.n  # rows an epoch trains on (the upsampled pool's size with --upsample)
        self.spe = steps_per_epoch(self.n, cfg0.batch_size)
        self.total_steps = cfg0.epochs * self.spe
        for m in members:
            m.opt = make_optimizer(m.cfg.optimizer, param_groups(m.head, m.crit), m.cfg.lr, m.cfg.weight_decay)
            m.selector = Selector(m.sel_metric, m.cfg.early_stopping)
            m.sched = Schedule(m.cfg.schedule, m.opt, self.total_steps, int(m.cfg.warmup * self.total_steps),
                               m.selector.mode)
            m.ema = EMA(m.head, m.cfg.ema) if m.cfg.ema else None
        self.tell = {m: progress_hook(m.head, m.crit) for m in members}  # warm-ups and schedules of heads and losses
        self.val_idx = data.split_index["val"]

    def train_epoch(self, epoch: int, active: list[Member]) -> None:
        data, device, bs, n = self.data, self.device, self.cfg0.batch_size, self.n
        perm = self.orders.epoch()
        for m in active:
            m.head.train()
            m.crit.train()
            m.loss_sum = torch.zeros((), device=device)
            m.steps = 0
        keys = list(dict.fromkeys(m.order_key() for m in active))
        shard = data.shard  # under torchrun: this rank's rows of each batch (mmcache.heads.parallel)
        # BatchNorm cannot train on one row (on one row per rank, data-parallel)
        starts = [s for s in range(0, n, bs) if n - s >= (shard.min_batch() if shard.parallel else 2)]
        # One gather of rows per batch order and step, in this order; streamed rows are read ahead in a thread.
        step_idx = [shard.rows(self.train_idx[perm[key][s:s + bs].to(device)]) for s in starts for key in keys]
        rows = data.batches(step_idx)
        for k_step in range(len(starts)):
            feats: dict[tuple[Any, ...], Any] = {}
            for j, key in enumerate(keys):
                idx = step_idx[k_step * len(keys) + j]
                feats[key] = (next(rows), {t: data.targets[t].index_select(0, idx) for t in data.tasks},
                              data.teacher.index_select(0, idx) if data.teacher is not None else None)
            self.step(epoch, active, feats)

    def step(self, epoch: int, active: list[Member], feats: dict[tuple[Any, ...], Any]) -> None:
        """One optimizer step of every active member: its forward with its random state swapped in, one backward
        over the summed losses, each member's update."""
        total: torch.Tensor | None = None
        for m in active:
            x, targets, teach = feats[m.order_key()]
            t_member = time.perf_counter()
            m.rng_in()
            self.tell[m](TrainProgress(epoch - 1, (epoch - 1) * self.spe + m.steps, self.total_steps))
            logits = m.head(x)
            loss, _ = m.crit(logits, targets, teach)
            m.rng_out()
            m.busy += time.perf_counter() - t_member
            total = loss if total is None else total + loss
            m.loss_sum = cast(torch.Tensor, m.loss_sum) + loss.detach()
            m.steps += 1
        for m in active:
            cast(torch.optim.Optimizer, m.opt).zero_grad(set_to_none=True)
        cast(torch.Tensor, total).backward()  # one backward: each member's gradient is its own loss's
        shard = self.data.shard
        if shard.parallel:  # the gradients of the whole batch: averaged over the ranks' rows
            shard.average_grads(p for m in active for p in [*m.head.parameters(), *m.crit.parameters()])
        for m in active:
            cast(torch.optim.Optimizer, m.opt).step()
            step_end(m)

    def validate(self, epoch: int, active: list[Member], seconds: float) -> list[EpochRow]:
        data, val_idx, out = self.data, self.val_idx, []
        for m in active:
            m.crit.eval()
            # Gathered chunk by chunk each epoch: never a float32 copy of the whole split.
            vlog = logits_of(m.head, data.chunks(val_idx, EVAL_BATCH), data.tasks, len(val_idx))
            vm = val_metrics(data.targets[m.sel_task][val_idx], adjust_logits(vlog, m.offsets)[m.sel_task],
                             m.sel_metric)
            vm["loss"] = eval_loss(m.crit, vlog, data, val_idx, epoch - 1)
            train_loss = float(data.shard.mean(cast(torch.Tensor, m.loss_sum))) / max(1, m.steps)
            out.append(EpochRow(vm, train_loss, cast(torch.optim.Optimizer, m.opt).param_groups[0]["lr"],
                                seconds / len(active)))
        return out

    def state(self, unit: Member) -> dict[str, Any]:
        return snapshot(unit.head)

    def note(self, unit: Member, message: str) -> None:
        log(unit.cfg, message)


def fit_lockstep(members: list[Member], data: CachedData, quiet: bool) -> None:
    """Minibatch training of every member for the same epochs and batch size, one shared batch gather per
    seed and step; each member keeps its own optimizer, schedule, selection and random stream."""
    task = LockstepTask(members, data)
    label = f"train x{len(members)}" if len(members) > 1 else "train"
    fit(task, members[0].cfg.epochs, callbacks=[EpochBar(label, disable=quiet)])
    for m in members:
        m.best_epoch, m.best_value, state = cast(Selector, m.selector).result()
        if m.keep_last:  # a refit trains on its val rows: its last epoch is the model (the averages with --ema)
            m.best_epoch = len(m.curves)
            if m.ema is not None:
                with m.ema.applied():
                    state = snapshot(m.head)
                m.head.load_state_dict(state)
            continue
        m.head.load_state_dict(state)
