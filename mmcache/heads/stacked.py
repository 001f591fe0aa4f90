"""Linear probes of a sweep trained as one computation: weights stacked along a config axis.

A group of `--head linear --D 0` configs with the cross-entropy loss reads the same fused features
(the concatenated, optionally L2-normalised pooled vectors: they carry no parameters), so each step is
one matrix product `x @ [W_1 ... W_K]^T` for all K configs of a seed, one cross-entropy over
`[batch, classes, K]`, and one optimizer update over the stacked weights with a learning rate and
weight decay per config. Batch orders, initialisation, schedule, validation and selection are those
of `heads train` for each config alone, so every result matches a separate run up to float round-off.

Configs outside that shape (hidden branches, dropout, BatchNorm, other heads or losses, plateau
schedules) train in the generic lockstep loop of `mmcache.heads.train`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch

from mmcache.engine import IGNORE, Schedule, Selector, steps_per_epoch, val_metrics_many
from mmcache.engine.loop import EpochBar, EpochRow, TaskBase, fit
from mmcache.heads.data import prefetch
from mmcache.heads.lockstep import BatchOrders, labelled_train
from mmcache.heads.losses import Criterion

FUSE_CHUNK = 8192  # rows fused at once for evaluation
FUSED_CACHE_BYTES = 256 << 20  # rows whose fused features take at most this are fused once per fit

if TYPE_CHECKING:
    from mmcache.heads.data import CachedData
    from mmcache.heads.linear import LinearHead
    from mmcache.heads.lockstep import Member


def stackable(m: Member) -> bool:
    """True when member `m` is a linear probe with a plain cross-entropy that the stacked path trains exactly
    (without a weight average or a logit adjustment: those train in the per-config loop)."""
    return (m.cfg.head == "linear" and m.head.hparams.get("D") == 0 and type(m.crit) is Criterion
            and m.crit.log_vars is None and m.data.teacher is None and m.cfg.optimizer in ("adam", "adamw", "sgd")
            and m.cfg.schedule in ("cosine", "none") and not m.cfg.ema and not m.offsets)


def _clf(m: Member, task: str) -> torch.nn.Linear:
    """Member `m`'s classifier of `task` (a probe's only parameters)."""
    return cast(torch.nn.Linear, cast("LinearHead", m.head).classifiers[task])


def _stack_key(m: Member) -> tuple[Any, ...]:
    h = m.head.hparams
    return (h.get("l2norm"), tuple(cast("LinearHead", m.head).mods), h.get("key"), m.crit.label_smoothing,
            m.cfg.class_weights, m.cfg.optimizer, m.cfg.schedule, m.cfg.warmup)


class StackedOptimizer:
    """torch's Adam / AdamW / SGD (momentum 0.9) update rules on parameters stacked along dim 0, with one
    learning rate and weight decay per slice (torch.optim takes one per parameter group, not per slice)."""

    def __init__(self, kind: str, params: list[torch.Tensor], weight_decay: torch.Tensor,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, momentum: float = 0.9) -> None:
        self.kind, self.params, self.wd = kind, params, weight_decay
        self.betas, self.eps, self.momentum = betas, eps, momentum
        self.decay = bool((weight_decay != 0).any())
        self.t = 0
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: torch.Tensor) -> None:
        """One update with learning rates `lr` [K] (base rate times the schedule's factor)."""
        self.t += 1
        b1, b2 = self.betas
        for p, st in zip(self.params, self.state, strict=True):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            lr_, wd_ = lr.view(shape), self.wd.view(shape)
            g = p.grad
            if not self.decay:
                pass
            elif self.kind == "adamw":
                p.mul_(1 - lr_ * wd_)
            else:
                g = g + wd_ * p
            if self.kind == "sgd":
                if "buf" not in st:
                    st["buf"] = g.clone()
                else:
                    st["buf"].mul_(self.momentum).add_(g)
                p.sub_(lr_ * st["buf"])
                continue
            if "m" not in st:
                st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
            st["m"].lerp_(g, 1 - b1)
            st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
            step_size = lr_ / (1 - b1 ** self.t)
            denom = (st["v"].sqrt() / math.sqrt(1 - b2 ** self.t)).add_(self.eps)
            p.sub_(step_size * st["m"] / denom)


def fit_stacked(members: list[Member], data: CachedData, quiet: bool) -> None:
    """Train linear-probe `members` (all `stackable`) in stacks of configs that read the same fused features."""
    stacks: dict[tuple[Any, ...], list[Member]] = {}
    for m in members:
        stacks.setdefault(_stack_key(m), []).append(m)
    for group in stacks.values():
        _fit_stack(group, data, quiet)


@torch.no_grad()
def stacked_logits(members: list[Member], data: CachedData, idx: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Logits of rows `idx` for every member (its current weights), as one product per task per member stack."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in members]
    stacks: dict[tuple[Any, ...], list[int]] = {}
    for j, m in enumerate(members):
        stacks.setdefault(_stack_key(m), []).append(j)
    for js in stacks.values():
        head0 = cast("LinearHead", members[js[0]].head)
        head0.eval()
        w = {t: torch.stack([_clf(members[j], t).weight for j in js]) for t in data.tasks}
        b = {t: torch.stack([_clf(members[j], t).bias for j in js]) for t in data.tasks}
        logits = _stack_logits(head0, data, idx, w, b)
        for t in data.tasks:
            for k, j in enumerate(js):
                out[j][t] = logits[t][:, k]
    return out


@torch.no_grad()
def _stack_logits(head0: LinearHead, data: CachedData, idx: torch.Tensor, w: dict[str, torch.Tensor],
                  b: dict[str, torch.Tensor], fused: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  read_ahead: bool = True) -> dict[str, torch.Tensor]:
    """task -> logits [len(idx), K, C] of K stacked probes (weights w [K, C, F], biases b [K, C]), the fused
    features of chunks of FUSE_CHUNK rows at a time (never a whole split of them at once): `fused(rows)`, by default
    fused from the rows' batch; streamed chunks are read ahead (unless `read_ahead` is False: `fused` reads
    memory)."""
    fuse = fused or (lambda rows: head0.fused(data.batch(rows)))
    parts: dict[str, list[torch.Tensor]] = {t: [] for t in w}
    chunks = (idx[s:s + FUSE_CHUNK] for s in range(0, len(idx), FUSE_CHUNK))
    for z in prefetch(fuse, chunks, enabled=data.streamed and read_ahead, ahead=data.ahead):
        for t in w:
            parts[t].append((z @ w[t].reshape(-1, w[t].shape[-1]).T).view(len(z), w[t].shape[0], -1) + b[t])
    return {t: torch.cat(v) if v else torch.zeros(0, w[t].shape[0], w[t].shape[1], device=idx.device)
            for t, v in parts.items()}


def _ce(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, smoothing: float) -> torch.Tensor:
    """Per-config mean cross-entropy, as `F.cross_entropy(..., reduction="mean")` for each config alone.
    logits [B, K, C], y [B] -> [K]; 0 for a config when no row is labelled."""
    return _ce_slots(logits[None], y[None], weight, smoothing)[0]


def _ce_slots(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, smoothing: float,
              grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_ce` for several batch orders at once, with its gradient: logits [S, B, G, C], y [S, B] ->
    (loss [S*G] slot-major, d(loss.sum())/d(logits) [S, B, G, C] when `grad`, else None). A config whose
    batch has no labelled row gets 0.

    torch's per-row loss with class weights w and label smoothing e (what `F.cross_entropy` computes):
    (1-e) w_y (lse - l_y) + e/C sum_c w_c (lse - l_c), averaged with the weights w_y of the labelled rows.
    Its gradient is written out rather than taken by autograd: over a class axis of 2-10 the softmax
    and cross-entropy kernels and autograd's bookkeeping cost more than the matrix products of a step."""
    s, b, g, c = logits.shape
    lab = (y != IGNORE).to(logits.dtype)
    yc = y.clamp(min=0)
    w_y = weight[yc] * lab if weight is not None else lab  # [S, B]
    denom = w_y.sum(1).clamp(min=torch.finfo(logits.dtype).tiny)  # [S]
    top = logits.amax(-1, keepdim=True)
    e = (logits - top).exp_()
    se = e.sum(-1, keepdim=True)
    lse = se.log() + top  # [S, B, G, 1]
    picked = logits.gather(-1, yc[:, :, None, None].expand(s, b, g, 1))
    row = (lse - picked).squeeze(-1) * ((1 - smoothing) * w_y)[:, :, None]  # [S, B, G]
    if smoothing:
        wc = weight if weight is not None else torch.ones(c, dtype=logits.dtype, device=logits.device)
        smooth = lse.squeeze(-1) * wc.sum() - logits @ wc  # sum_c w_c (lse - l_c)
        row = row + smooth * (smoothing / c * lab)[:, :, None]
    loss = (row.sum(1) / denom[:, None]).reshape(s * g)
    if not grad:
        return loss, None
    # d/dl_c: (1-e) w_y (p_c - [c=y]) + e/C (p_c sum(w) - w_c), over the same denominator.
    p = e.div_(se)
    coef = (1 - smoothing) * w_y
    if smoothing:
        coef = coef + smoothing / c * wc.sum() * lab
    d = p * coef[:, :, None, None]
    d.scatter_add_(-1, yc[:, :, None, None].expand(s, b, g, 1),
                   (-(1 - smoothing) * w_y)[:, :, None, None].expand(s, b, g, 1))
    if smoothing:
        d -= (smoothing / c * lab)[:, :, None, None] * wc
    d /= denom[:, None, None, None]
    return loss, d


class StackTask(TaskBase):
    """Stacked probes on the engine's fit loop (`mmcache.engine.loop`): each member is a selection unit; the stack's
    weights, optimizer and schedule factors are one for all of them."""

    def __init__(self, members: list[Member], data: CachedData) -> None:
        cfg0 = members[0].cfg
        self.units, self.data, self.cfg0 = members, data, cfg0
        self.head0 = cast("LinearHead", members[0].head)
        crit0 = members[0].crit
        self.tasks = tasks = list(data.tasks)
        self.k_all = len(members)
        self.index = {m: j for j, m in enumerate(members)}
        self.train_idx = train_idx = labelled_train(data)
        self.val_idx = data.split_index["val"]
        self.orders = BatchOrders(members, data, train_idx)
        self.n = self.orders.n  # rows an epoch trains on (the upsampled pool's size with --upsample)
        self.device = device = train_idx.device
        self.head0.eval()  # D=0: the fused features carry no parameters; they are computed per batch from the rows
        self.y_train = {t: data.targets[t][train_idx] for t in tasks}
        self.y_val = {t: data.targets[t][self.val_idx] for t in tasks}
        self.weights = {t: getattr(crit0, f"w_{t}", None) for t in tasks}
        self.smoothing = crit0.label_smoothing
        self.W = {t: torch.stack([_clf(m, t).weight.detach() for m in members]).clone().requires_grad_() for t in tasks}
        self.B = {t: torch.stack([_clf(m, t).bias.detach() for m in members]).clone().requires_grad_() for t in tasks}
        self.lr = torch.tensor([m.cfg.lr for m in members], dtype=torch.float32, device=device)
        wd = torch.tensor([m.cfg.weight_decay for m in members], dtype=torch.float32, device=device)
        self.opt = StackedOptimizer(cfg0.optimizer, [*self.W.values(), *self.B.values()], wd)
        self.factors = schedule_factors(cfg0.schedule, cfg0.epochs * steps_per_epoch(self.n, cfg0.batch_size),
                                        cfg0.warmup)
        self.done = 0
        for m in members:
            m.selector = Selector(m.sel_metric, m.cfg.early_stopping)
        slots: dict[tuple[Any, ...], slice] = {}
        for j, m in enumerate(members):
            a = slots.get(m.order_key(), slice(j, j))
            slots[m.order_key()] = slice(a.start, j + 1)
        self.slots = slots
        sizes = {sl.stop - sl.start for sl in slots.values()}
        # Several orders with as many configs each: all of them as one batched product ([orders, batch, features]);
        # a single order is one plain matrix product (bmm's backward is slower there).
        self.batched = len(sizes) == 1 and len(slots) > 1
        self.n_slots, self.per_slot = len(slots), self.k_all // len(slots)
        self.best_W = {t: w.detach().clone() for t, w in self.W.items()}
        self.best_B = {t: b.detach().clone() for t, b in self.B.items()}
        self.loss_sum = torch.zeros(self.k_all, device=device)
        self.steps = 0
        self.z_all: torch.Tensor | None = None  # every row's fused features, when they are small
        self.z_all_ok = True

    @torch.no_grad()
    def fused_rows(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Every row's fused features, computed once (in chunks, streamed or in memory) when they take at most
        FUSED_CACHE_BYTES; None when they would take more. `idx`: any rows (one is fused to learn the width)."""
        if self.z_all is None and self.z_all_ok:
            n = len(self.data.ids)
            width = self.head0.fused(self.data.batch(idx[:1])).shape[1]
            self.z_all_ok = n * width * 4 <= FUSED_CACHE_BYTES
            if self.z_all_ok:
                rows = torch.arange(n, device=idx.device)
                self.z_all = torch.cat([self.head0.fused(f) for f in self.data.chunks(rows, 8192)])
        return self.z_all

    def fused(self, idx: torch.Tensor) -> torch.Tensor:
        """The fused features of rows `idx`: from `fused_rows` when they are small (each row's fusion is its own,
        so the values are the same), else fused from the batch."""
        with torch.no_grad():
            z = self.fused_rows(idx)
            return z.index_select(0, idx) if z is not None else self.head0.fused(self.data.batch(idx))

    def train_epoch(self, epoch: int, active: list[Member]) -> None:
        bs, n, shard = self.cfg0.batch_size, self.n, self.data.shard
        perm = {key: p.to(self.device) for key, p in self.orders.epoch().items()}
        order_pos = order_y = None
        if self.batched:  # this epoch's rows and targets in each order's sequence: a step takes a slice
            order_pos = torch.stack([perm[key] for key in self.slots])  # [orders, n]
            order_y = {t: self.y_train[t][order_pos] for t in self.tasks}
        self.loss_sum = torch.zeros(self.k_all, device=self.device)
        self.steps = 0
        # As the single-run loop: no one-row batch (data-parallel: no rank with one row). Each rank takes its rows
        # `rank::world` of every batch (mmcache.heads.parallel).
        starts = [s for s in range(0, n, bs) if n - s >= (shard.min_batch() if shard.parallel else 2)]
        # The rows of each step (all orders' at once when batched, else per order), read ahead when streamed from
        # the stores (not from the fused rows in memory: a thread's hand-off would cost more than the gather).
        step_rows = [self.train_idx[cast(torch.Tensor, order_pos)[:, s:s + bs][:, shard.rank::shard.world].reshape(-1)]
                     for s in starts] if self.batched else \
            [self.train_idx[shard.rows(perm[key][s:s + bs])] for s in starts for key in self.slots]
        in_memory = bool(step_rows) and self.fused_rows(step_rows[0]) is not None
        xs = prefetch(self.fused, step_rows, enabled=self.data.streamed and not in_memory, ahead=self.data.ahead)
        for s in starts:
            with torch.no_grad():  # the gradient is written out (`_ce_slots`): no autograd graph per step
                if self.batched:
                    self.batched_grads(s, cast(torch.Tensor, order_pos), cast("dict[str, torch.Tensor]", order_y), xs)
                else:
                    self.slot_grads(s, perm, xs)
            shard.average_grads([*self.W.values(), *self.B.values()])  # data-parallel: the whole batch's gradient
            self.opt.step(self.lr * self.factors[self.done])
            self.done += 1
            self.steps += 1

    def batched_grads(self, s: int, order_pos: torch.Tensor, order_y: dict[str, torch.Tensor], xs: Any) -> None:
        """The gradients of step `s` of every order at once (one batched product per task)."""
        bs, shard, W, B = self.cfg0.batch_size, self.data.shard, self.W, self.B
        n_slots, per_slot = self.n_slots, self.per_slot
        pos = order_pos[:, s:s + bs][:, shard.rank::shard.world]
        rows = pos.shape[1]
        x = next(xs).view(n_slots, rows, -1)
        for t in self.tasks:
            c, f = W[t].shape[1:]
            logits = torch.baddbmm(B[t].view(n_slots, 1, per_slot * c), x,
                                   W[t].view(n_slots, per_slot * c, f).transpose(1, 2))
            per, d = _ce_slots(logits.view(n_slots, rows, per_slot, c),
                               order_y[t][:, s:s + bs][:, shard.rank::shard.world], self.weights[t],
                               self.smoothing, grad=True)
            assert d is not None
            d = d.view(n_slots, rows, per_slot * c)
            W[t].grad = torch.bmm(d.transpose(1, 2), x).view(self.k_all, c, f)
            B[t].grad = d.sum(1).view(self.k_all, c)
            self.loss_sum += per

    def slot_grads(self, s: int, perm: dict[tuple[Any, ...], torch.Tensor], xs: Any) -> None:
        """The gradients of step `s`, one plain matrix product per batch order and task."""
        bs, shard, W, B = self.cfg0.batch_size, self.data.shard, self.W, self.B
        for t in self.tasks:
            W[t].grad, B[t].grad = torch.empty_like(W[t]), torch.empty_like(B[t])
        for key, sl in self.slots.items():
            pos = shard.rows(perm[key][s:s + bs])
            x = next(xs)
            for t in self.tasks:
                w, b = W[t][sl], B[t][sl]
                kk, c, f = w.shape
                logits = torch.addmm(b.reshape(1, kk * c), x, w.reshape(kk * c, f).T)
                per, d = _ce_slots(logits.view(1, len(pos), kk, c), self.y_train[t].index_select(0, pos)[None],
                                   self.weights[t], self.smoothing, grad=True)
                assert d is not None
                d = d.view(len(pos), kk * c)
                torch.mm(d.T, x, out=cast(torch.Tensor, W[t].grad)[sl].view(kk * c, f))
                torch.sum(d, 0, out=cast(torch.Tensor, B[t].grad)[sl].view(kk * c))
                self.loss_sum[sl] += per

    def validate(self, epoch: int, active: list[Member], seconds: float) -> list[EpochRow]:
        tasks, y_val = self.tasks, self.y_val
        factor = self.factors[self.done]
        with torch.no_grad():
            vlog = _stack_logits(self.head0, self.data, self.val_idx, {t: self.W[t].detach() for t in tasks},
                                 {t: self.B[t].detach() for t in tasks}, self.fused, read_ahead=self.z_all is None)
            vloss = sum(_ce(vlog[t], y_val[t], self.weights[t], self.smoothing) for t in tasks)
        # Validation metrics of all live configs from one confusion-matrix count per (task, metric) pair.
        vms: dict[int, dict[str, float]] = {}
        by_sel: dict[tuple[str, str], list[int]] = {}
        for m in active:
            by_sel.setdefault((m.sel_task, m.sel_metric), []).append(self.index[m])
        for (task, metric), js in by_sel.items():
            vms.update(zip(js, val_metrics_many(y_val[task], vlog[task][:, js], metric), strict=True))
        train_loss = (self.data.shard.mean(self.loss_sum).double() / max(1, self.steps)).tolist()
        val_loss = cast(torch.Tensor, vloss).tolist()
        out = []
        for m in active:
            j = self.index[m]
            vm = vms[j]
            vm["loss"] = val_loss[j]
            out.append(EpochRow(vm, train_loss[j], float(self.lr[j]) * factor, seconds / self.k_all))
        return out

    def state(self, unit: Member) -> dict[str, Any]:
        # The selector records the epoch and value only (an empty state): the weights of every improved config are
        # copied in `selected`, in one go.
        return {}

    def selected(self, epoch: int, improved: list[Member]) -> None:
        if improved:  # the best weights so far, kept for every config at once
            better_rows = torch.tensor([self.index[m] for m in improved], device=self.device)
            for t in self.tasks:
                self.best_W[t].index_copy_(0, better_rows, self.W[t].detach().index_select(0, better_rows))
                self.best_B[t].index_copy_(0, better_rows, self.B[t].detach().index_select(0, better_rows))


def schedule_factors(schedule: str, total_steps: int, warmup: float) -> list[float]:
    """The learning rate's factor after k optimizer steps (k = 0 .. total_steps), from torch's scheduler driving a
    unit learning rate."""
    unit = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = Schedule(schedule, unit, total_steps, int(warmup * total_steps))
    factors = [unit.param_groups[0]["lr"]]
    with warnings.catch_warnings():  # the unit optimizer never steps: nothing to warn about
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(total_steps):
            sched.step()
            factors.append(unit.param_groups[0]["lr"])
    return factors


def _fit_stack(members: list[Member], data: CachedData, quiet: bool) -> None:
    # Members that share a batch order (seed) sit next to each other: each order's weights are one slice.
    first: dict[tuple[Any, ...], int] = {}
    for j, m in enumerate(members):
        first.setdefault(m.order_key(), j)
    members = sorted(members, key=lambda m: first[m.order_key()])
    task = StackTask(members, data)
    fit(task, members[0].cfg.epochs, callbacks=[EpochBar(f"train x{len(members)} (stacked)", disable=quiet)])
    for j, m in enumerate(members):
        m.best_epoch, m.best_value, _ = cast(Selector, m.selector).result()
        m.head.load_state_dict({**{f"classifiers.{t}.weight": task.best_W[t][j].clone() for t in task.tasks},
                                **{f"classifiers.{t}.bias": task.best_B[t][j].clone() for t in task.tasks}})
