"""SCABG: Self-Calibrated Adaptive Band Gating, with masks.

Per modality (its `tokens` + `mask`, or `pooled` as one token), projected to `hidden`:

1. self-calibration (`calibrate`): h = LayerNorm(T + SelfAttn(T)), padding masked;
2. condition (`condition`): h = W h + W_c c, where c is the condition modality's (`cond`, the
   text) `pooled` vector projected to `hidden`; without it h = W h;
3. band gate: p = softmax_K(W_g tanh(h)) per token (`bands` = K; 1 switches bands off, and with
   them steps 1-2, which only feed the gate);
   band k = T * p_k;
4. band summary (`band_queries`): `queries` learned queries per band attend over the band's real
   tokens (masked attention), averaged; otherwise a masked mean of the band. Band k = T * p_k
   is never materialised as [B,K,T,H] for the projections: W (p_k T) = p_k (W T). A modality
   with one token per row (`pooled` only) gives attention weight 1 whatever the queries, so
   there the summary is the value and output projections of the band alone.

Per branch, a pair of modalities (x, y) (image-text, and image-context, text-context when a
`context` modality exists; or `branches`):

5. band aggregator: f_k = MLP_k([hx_k; hy_k]); w = softmax_k(<f_k, c> / sqrt(hidden))
   (`aggregate`; otherwise uniform weights); out = MLP(sum_k w_k f_k), `out_dim` wide.

Across branches:

6. cross-branch attention (`cross_branch`): z = LayerNorm(b + MHA(b, b, b)) over the branch
   vectors; then weighted pooling (learned scores, softmax over present branches; one branch
   has weight 1) and an MLP;
7. output (`compose`): coarse (neutral vs emotional) and fine (negative vs positive) heads
   give the 3-way logits [emo + neg, neu, emo + pos] of `task` (the first task by default),
   placed at the class indices `classes` = [negative, neutral, positive]; `compose_mode="logprob"`
   composes log-probabilities instead of raw logits (an exact hierarchical factorisation). With
   `compose=False` the task gets a plain linear classifier; `_coarse` and `_fine` are returned
   either way so the `scabg` loss can supervise them. Other tasks get linear classifiers.

`variant="reference"` (or `--head scabg-ref`) builds the architecture of the public reference code
(yili08/SCABG-LDT) instead; each of its parts is a flag of its own, so it can be ablated:

- `branch_gates`: a gate pair per branch (steps 1-4 per branch side; the projection to `hidden`
  stays one per modality) instead of one gate per modality shared by all branches;
- `band_blocks`: one attention block per band (its own queries and q/k/v/o projections) instead
  of projections shared across bands; with `branch_gates`, one per band and branch side;
- `agg_mlp`: the aggregator's output is an MLP (Linear, ReLU, Dropout, Linear) instead of one layer;
- `branch_mlp`: an MLP per branch (out_dim -> 2 out_dim -> out_dim) before the cross-branch fusion;
- `mix_token`: the first branch's token becomes lam * b_last + (1 - lam) * b_first, lam = sigmoid of a
  learned scalar (with the default branch order: the reference's mix of the text-context and
  image-text branches);
- `branch_pool="static"`: pooling weights are one learned softmax over branches (masked to the
  present ones) instead of per-row scores;
- `fuse_mlp`: the fused vector's MLP is Linear, ReLU, Dropout, Linear (2 out_dim wide inside);
- `kd_branches` / `kd_classes`: auxiliary KD heads (Linear to `kd_classes` logits) on those branch
  vectors, returned as `_kd` [B, n, kd_classes] for the criterion to distil one teacher into each;
- `adversarial` / `grl`: per-branch heads predicting the task's classes through gradient reversal
  (strength `grl`), returned as `_adv` [B, branches, C]; `grl_schedule` ramps the strength over training
  (the trainer's progress, `set_progress`): `constant`, `linear` from 0 over `grl_warmup` optimizer steps
  (the reference's, tied to its adversarial warm-up of 12000 steps), or `dann`, grl * (2 / (1 + exp(-10 p)) - 1)
  over the share p of the run's steps (Ganin et al.);
- `aux_outputs`: return the branch vectors `_branches` [B, branches, out_dim], their presence
  `_branch_mask` [B, branches] and the aggregators' band weights `_band_w` [B, branches, K], for the
  criterion's InfoNCE and band-consistency terms.

The reference implementation attends over padding; here every attention and pooling step
uses the token masks, so padded values never change the output. Parameters that a softmax
would cancel are not built: a bias on the band-attention keys or on the branch scores (each
adds the same amount to every score), the branch scores with a single branch, the condition's
learned default when nothing uses the condition.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from mmcache.errors import MMCacheError
from mmcache.heads.base import Features, Head, InputSpec, register_head, skip_removed_keys
from mmcache.heads.gated import batch_size, check_spec, reject_unknown, row_presence
from mmcache.heads.linear import select_modalities
from mmcache.heads.xattn import masked_attention, sequence_projections, sequence_width, token_sequence

# Parameters older builds had that could not learn (see the module doc); their saved values are skipped on load.
REMOVED = re.compile(r"branch_score\.(weight|bias)|cond_default|gates\.[^.]+\.band_attn\.(queries|[qk]\.(weight|bias))")

# Branch order of the reference: image-vs-text first, then the context branches.
MODALITY_ORDER = ("image", "text", "context", "video", "audio")


# The public reference code's architecture (`variant="reference"`); each entry is a flag of its own.
REFERENCE_VARIANT: dict[str, Any] = {
    "branch_gates": True, "band_blocks": True, "agg_mlp": True, "branch_mlp": True, "mix_token": True,
    "branch_pool": "static", "fuse_mlp": True, "kd_branches": "auto", "kd_classes": 2, "adversarial": True,
    "grl": 0.05, "aux_outputs": True, "grl_schedule": "linear", "grl_warmup": 12000,
}
DEFAULT_VARIANT: dict[str, Any] = {
    "branch_gates": False, "band_blocks": False, "agg_mlp": False, "branch_mlp": False, "mix_token": False,
    "branch_pool": "score", "fuse_mlp": False, "kd_branches": None, "kd_classes": 0, "adversarial": False,
    "grl": 0.05, "aux_outputs": False, "grl_schedule": "constant", "grl_warmup": 0,
}
GRL_SCHEDULES = ("constant", "linear", "dann")
VARIANTS = {"default": DEFAULT_VARIANT, "reference": REFERENCE_VARIANT}
# Where the reference attaches its two KD heads: the NLI teacher on text-context, the CLIP teacher on image-context.
REFERENCE_KD_BRANCHES = ("text-context", "image-context")


def mlp(d_in: int, d_hidden: int, d_out: int, dropout: float) -> nn.Sequential:
    """Linear, ReLU, Dropout, Linear (the reference's MLP block)."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_hidden, d_out))


def default_branches(mods: list[str]) -> list[tuple[str, str]]:
    """All unordered pairs of the used modalities, image-text first; one modality pairs with itself."""
    order = sorted(mods, key=lambda m: (MODALITY_ORDER.index(m) if m in MODALITY_ORDER else len(MODALITY_ORDER), m))
    if len(order) == 1:
        return [(order[0], order[0])]
    return [(a, b) for i, a in enumerate(order) for b in order[i + 1:]]


def check_classes(classes: Any, where: str) -> list[int]:
    """Validate `classes` = [negative, neutral, positive] indices: a permutation of 0, 1, 2."""
    try:
        cl = [int(c) for c in (classes.split(",") if isinstance(classes, str) else classes)]
    except (TypeError, ValueError):
        cl = []
    if sorted(cl) != [0, 1, 2]:
        raise MMCacheError(f"{where}: classes={classes!r} must list the indices of negative, neutral, positive "
                           "(a permutation of 0,1,2, e.g. 0,1,2 for the label order negative,neutral,positive)")
    return cl


def compose_three_way(coarse: torch.Tensor, fine: torch.Tensor, classes: list[int] | tuple[int, ...] = (0, 1, 2),
                      mode: str = "logits") -> torch.Tensor:
    """3-way logits [emo + neg, neu, emo + pos] from coarse [neu, emo] and fine [neg, pos], at `classes`."""
    if mode == "logprob":
        coarse, fine = coarse.log_softmax(-1), fine.log_softmax(-1)
    neu, emo = coarse[:, 0], coarse[:, 1]
    neg, pos = fine[:, 0], fine[:, 1]
    vals = torch.stack([emo + neg, neu, emo + pos], 1)  # in (negative, neutral, positive) order
    inv = torch.argsort(torch.as_tensor(list(classes), device=vals.device))
    return vals[:, inv]


class _BandAttention(nn.Module):
    """What both band attention blocks hold: `queries` learned queries per band (none with `single_key`, one
    token per row, where the attention weight is 1 whatever the queries), the head count and dropout."""

    def __init__(self, hidden: int, bands: int, queries: int, heads: int, dropout: float, single_key: bool) -> None:
        super().__init__()
        self.single_key = single_key
        if not single_key:
            self.queries = nn.Parameter(torch.randn(bands, queries, hidden) * hidden ** -0.5)
        self.heads = heads
        self.dropout = dropout


class BandQueryAttention(_BandAttention):
    """Learned queries per band attending over that band's tokens T * p_k, with a key padding mask.

    Multi-head attention written out so that the key/value projections of the K bands share one
    matmul: W (p_k * T) + b = p_k * (W T) + b, which makes K bands cost about as much as one.
    The keys have no bias: it adds the same amount to every score of a query, which the softmax
    cancels. With `single_key` (one token per row) the attention weight is 1 whatever the queries,
    so only the value and output projections are built.
    """

    def __init__(self, hidden: int, bands: int, queries: int, heads: int, dropout: float,
                 single_key: bool = False) -> None:
        super().__init__(hidden, bands, queries, heads, dropout, single_key)
        if not single_key:
            self.q = nn.Linear(hidden, hidden)
            self.k = nn.Linear(hidden, hidden, bias=False)
        self.v, self.o = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)

    def forward(self, t: torch.Tensor, p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Band summaries [B,K,H] from tokens t [B,T,H], band probabilities p [B,T,K], mask [B,T]."""
        pk = p.permute(0, 2, 1)[..., None]  # [B,K,T,1]
        v = pk * F.linear(t, self.v.weight)[:, None] + self.v.bias  # [B,K,T,H]
        has = mask.any(-1)
        if self.single_key:
            _check_one_token(t)
            return self.o(v[:, :, 0]) * has[:, None, None].to(v.dtype)
        k = pk * F.linear(t, self.k.weight)[:, None]
        q = self.q(self.queries)  # [K,Q,H]
        out = self.o(_attend_bands(q, k, v, mask, self.heads, self.dropout if self.training else 0.0)).mean(2)
        return out * has[:, None, None].to(out.dtype)


def _check_one_token(t: torch.Tensor) -> None:
    """Refuse tokens t [B,T,H] with T > 1 for attention built for one token per row (`single_key`)."""
    if t.shape[1] != 1:
        raise MMCacheError(f"head scabg: built for one token per row, got {t.shape[1]}; rebuild the head for "
                           "these inputs")


def _attend_bands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, heads: int,
                 dropout_p: float) -> torch.Tensor:
    """Multi-head attention of each band's queries q [K,Q,H] over its keys and values k, v [B,K,T,H], padding
    masked by `mask` [B,T]; [B,K,Q,H] before any output projection. A row without real tokens attends to
    position 0 only (instead of giving NaN): the caller zeros its output."""
    B, K, T, H = k.shape
    Q = q.shape[1]
    nh, hd = heads, H // heads
    q = q.view(1, K, Q, nh, hd).expand(B, K, Q, nh, hd).transpose(2, 3)  # [B,K,nh,Q,hd]
    k = k.view(B, K, T, nh, hd).transpose(2, 3)
    v = v.view(B, K, T, nh, hd).transpose(2, 3)
    keep = mask | (~mask.any(-1)[:, None] & (torch.arange(T, device=mask.device) == 0)[None, :])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, None, :], dropout_p=dropout_p)
    return out.transpose(2, 3).reshape(B, K, Q, H)


class _Start:
    """The progress before the first training step."""

    epoch = step = 0
    fraction = 0.0


class _GradReverse(torch.autograd.Function):
    """Identity forward; the gradient multiplied by -strength backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, strength: float) -> torch.Tensor:  # type: ignore[override]
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.strength * grad, None


def grad_reverse(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Gradient reversal (Ganin & Lempitsky): x forward, -strength * gradient backward."""
    return cast(torch.Tensor, _GradReverse.apply(x, strength))


def grl_factor(schedule: str, warmup: int, progress: Any) -> float:
    """The share of the full gradient-reversal strength at `progress` (a `mmcache.engine.TrainProgress`):
    1 (`constant`), min(1, step / warmup) (`linear`), or 2 / (1 + exp(-10 p)) - 1 over the run's share p (`dann`)."""
    if schedule == "linear":
        return min(1.0, progress.step / warmup) if warmup > 0 else 1.0
    if schedule == "dann":
        return 2.0 / (1.0 + math.exp(-10.0 * progress.fraction)) - 1.0
    return 1.0


def _band_weight(bands: int, d_in: int, d_out: int) -> nn.Parameter:
    """[K, d_in, d_out] weights initialised like nn.Linear's (uniform in +-1/sqrt(d_in))."""
    bound = d_in ** -0.5
    return nn.Parameter(torch.empty(bands, d_in, d_out).uniform_(-bound, bound))


class PerBandAttention(_BandAttention):
    """One attention block per band: band k has its own learned queries and q/k/v/o projections
    (the reference's latent cross-attention per band), over the band's tokens T * p_k, masked.

    As in `BandQueryAttention`, the keys have no bias and a modality with one token per row builds
    only the value and output projections (its attention weight is 1).
    """

    def __init__(self, hidden: int, bands: int, queries: int, heads: int, dropout: float,
                 single_key: bool = False) -> None:
        super().__init__(hidden, bands, queries, heads, dropout, single_key)
        if not single_key:
            self.wq, self.wk = _band_weight(bands, hidden, hidden), _band_weight(bands, hidden, hidden)
            self.bq = nn.Parameter(torch.zeros(bands, hidden))
        self.wv, self.wo = _band_weight(bands, hidden, hidden), _band_weight(bands, hidden, hidden)
        self.bv, self.bo = nn.Parameter(torch.zeros(bands, hidden)), nn.Parameter(torch.zeros(bands, hidden))

    def forward(self, t: torch.Tensor, p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Band summaries [B,K,H] from tokens t [B,T,H], band probabilities p [B,T,K], mask [B,T]."""
        pk = p.permute(0, 2, 1)[..., None]  # [B,K,T,1]
        v = pk * torch.einsum("bth,khd->bktd", t, self.wv) + self.bv[None, :, None, :]  # [B,K,T,H]
        has = mask.any(-1)
        if self.single_key:
            _check_one_token(t)
            out = torch.einsum("bkh,khd->bkd", v[:, :, 0], self.wo) + self.bo
            return out * has[:, None, None].to(out.dtype)
        k = pk * torch.einsum("bth,khd->bktd", t, self.wk)
        q = torch.einsum("kqh,khd->kqd", self.queries, self.wq) + self.bq[:, None, :]  # [K,Q,H]
        out = _attend_bands(q, k, v, mask, self.heads, self.dropout if self.training else 0.0)
        out = out.mean(2)  # the output projection commutes with the mean
        out = torch.einsum("bkh,khd->bkd", out, self.wo) + self.bo
        return out * has[:, None, None].to(out.dtype)


class BandGate(nn.Module):
    """Steps 1-4 for one modality: calibrated, conditioned soft split into K bands, each summarised to a vector."""

    def __init__(self, dim: int, hidden: int, bands: int, queries: int, heads: int, dropout: float,
                 calibrate: bool, condition: bool, band_queries: bool, seq_len: int = 2, project: bool = True,
                 per_band: bool = False) -> None:
        super().__init__()
        # Without `project` the tokens arrive already projected to `hidden` (one projection per modality).
        self.proj = nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden)) if project else None
        # One band means p = 1 for every token: no gate to compute, so none of its parts are built.
        gate = bands > 1
        self.self_attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True) \
            if calibrate and gate else None
        self.norm = nn.LayerNorm(hidden) if calibrate and gate else None
        self.W = nn.Linear(hidden, hidden) if gate else None
        self.W_c = nn.Linear(hidden, hidden, bias=False) if condition and gate else None
        self.W_g = nn.Linear(hidden, bands) if gate else None
        self.bands = bands
        attn = PerBandAttention if per_band else BandQueryAttention
        self.band_attn = attn(hidden, bands, queries, heads, dropout, single_key=seq_len == 1) if band_queries else None

    def probabilities(self, x: torch.Tensor, mask: torch.Tensor,
                      c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected tokens T [B,T,H] and band probabilities p [B,T,K] (softmax over K per token)."""
        t = self.proj(x) if self.proj is not None else x
        t = torch.where(mask[..., None], t, torch.zeros((), dtype=t.dtype, device=t.device))
        if self.W is None or self.W_g is None:
            return t, torch.ones(*t.shape[:2], 1, dtype=t.dtype, device=t.device)
        h = t
        if self.self_attn is not None and self.norm is not None:
            h = self.norm(t + masked_attention(self.self_attn, t, t, mask))
        h = self.W(h)
        if self.W_c is not None and c is not None:
            h = h + self.W_c(c)[:, None, :]
        return t, torch.softmax(self.W_g(torch.tanh(h)), -1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """Band summaries [B,K,H] (zeros for rows without real tokens)."""
        t, p = self.probabilities(x, mask, c)
        if self.band_attn is not None:
            return self.band_attn(t, p, mask)
        # Masked mean of band k = sum_t p_tk T_t / n_real: one batched matmul, no [B,K,T,H] tensor.
        w = p * mask[..., None].to(p.dtype)
        return torch.einsum("btk,bth->bkh", w, t) / mask.sum(-1).clamp(min=1)[:, None, None].to(t.dtype)


class BandAggregator(nn.Module):
    """Step 5 for one branch: f_k = MLP_k([hx_k; hy_k]), weighted by agreement with c, then an MLP."""

    def __init__(self, hidden: int, out_dim: int, bands: int, dropout: float, aggregate: bool,
                 mlp_out: bool = False) -> None:
        super().__init__()
        self.mlps = nn.ModuleList([
            nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))
            for _ in range(bands)
        ])
        self.aggregate = aggregate
        self.out = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)) \
            if mlp_out else nn.Sequential(nn.Linear(hidden, out_dim), nn.GELU(), nn.Dropout(dropout))

    def weights(self, f: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """Band weights [B,K]: softmax_k(<f_k, c> / sqrt(H)), or uniform when aggregation is off or K = 1."""
        if not self.aggregate or c is None or f.shape[1] == 1:
            return torch.full(f.shape[:2], 1.0 / f.shape[1], dtype=f.dtype, device=f.device)
        return torch.softmax((f * c[:, None, :]).sum(-1) / math.sqrt(f.shape[-1]), -1)

    def forward(self, sx: torch.Tensor, sy: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """Branch vector [B,out_dim] from band summaries sx, sy [B,K,H]."""
        return self.with_weights(sx, sy, c)[0]

    def with_weights(self, sx: torch.Tensor, sy: torch.Tensor,
                     c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Branch vector [B,out_dim] and the band weights [B,K] it was pooled with."""
        f = torch.stack([mlp(torch.cat([sx[:, k], sy[:, k]], -1)) for k, mlp in enumerate(self.mlps)], 1)
        w = self.weights(f, c)
        return self.out((w[..., None] * f).sum(1)), w


def _variant_parts(variant: str, given: dict[str, Any]) -> dict[str, Any]:
    """The parts of the SCABG architecture: the variant gives each part's default, a part set explicitly (not
    None in `given`) wins (`variant=reference mix_token=false`); flags checked, `kd_branches` split at commas."""
    if variant not in VARIANTS:
        raise MMCacheError(f"head scabg: variant={variant!r} must be one of {sorted(VARIANTS)}")
    parts = {k: VARIANTS[variant][k] if v is None else v for k, v in given.items()}
    for k in ("branch_gates", "band_blocks", "agg_mlp", "branch_mlp", "mix_token", "fuse_mlp", "adversarial",
              "aux_outputs"):
        if not isinstance(parts[k], bool):
            raise MMCacheError(f"head scabg: {k} must be true or false, got {parts[k]!r}")
    if parts["branch_pool"] not in ("score", "static"):
        raise MMCacheError(f"head scabg: branch_pool={parts['branch_pool']!r} must be 'score' or 'static'")
    if isinstance(parts["kd_branches"], str) and parts["kd_branches"] != "auto":
        parts["kd_branches"] = [b for b in parts["kd_branches"].split(",") if b]
    return parts


def _check_numbers(parts: dict[str, Any], where: str) -> None:
    """Refuse a negative or non-whole `kd_classes` / `grl_warmup`, a negative `grl` and an unknown schedule."""
    if not isinstance(parts["kd_classes"], int) or isinstance(parts["kd_classes"], bool) or parts["kd_classes"] < 0:
        raise MMCacheError(f"{where}: kd_classes={parts['kd_classes']!r} must be a whole number >= 0 "
                           "(0: as many as the task's classes)")
    if not isinstance(parts["grl"], (int, float)) or isinstance(parts["grl"], bool) or parts["grl"] < 0:
        raise MMCacheError(f"{where}: grl={parts['grl']!r} must be a number >= 0")
    if parts["grl_schedule"] not in GRL_SCHEDULES:
        raise MMCacheError(f"{where}: grl_schedule={parts['grl_schedule']!r} must be one of "
                           f"{', '.join(GRL_SCHEDULES)}")
    if not isinstance(parts["grl_warmup"], int) or isinstance(parts["grl_warmup"], bool) or parts["grl_warmup"] < 0:
        raise MMCacheError(f"{where}: grl_warmup={parts['grl_warmup']!r} must be a whole number of steps >= 0")


@register_head("scabg")
class SCABGHead(Head):
    """Self-Calibrated Adaptive Band Gating over token sequences, with coarse/fine 3-way composition."""

    uses = ("pooled", "tokens", "mask")  # arrays the trainer loads per store
    positive = ("D", "hidden", "out_dim", "bands", "queries", "heads", "branch_heads")

    def __init__(self, inputs: InputSpec, tasks: dict[str, int], hidden: int = 512, out_dim: int = 128,
                 bands: int = 3, queries: int = 8, heads: int = 8, branch_heads: int = 4, dropout: float = 0.1,
                 cond: str = "text", calibrate: bool = True, condition: bool = True, band_queries: bool = True,
                 aggregate: bool = True, cross_branch: bool = True, compose: bool = True,
                 compose_mode: str = "logits", classes: Any = (0, 1, 2), task: str | None = None,
                 branches: Any = None, use_tokens: bool = True, ablation: int = 0, modalities: list[str] | None = None,
                 D: int | None = None, variant: str = "default", branch_gates: bool | None = None,
                 band_blocks: bool | None = None, agg_mlp: bool | None = None, branch_mlp: bool | None = None,
                 mix_token: bool | None = None, branch_pool: str | None = None, fuse_mlp: bool | None = None,
                 kd_branches: Any = None, kd_classes: int | None = None, adversarial: bool | None = None,
                 grl: float | None = None, aux_outputs: bool | None = None, grl_schedule: str | None = None,
                 grl_warmup: int | None = None, **extra: Any) -> None:
        reject_unknown("scabg", extra, type(self))
        if D is not None:  # `--D` of the trainer sets the hidden size
            hidden = int(D)
        parts = _variant_parts(variant, {
            "branch_gates": branch_gates, "band_blocks": band_blocks, "agg_mlp": agg_mlp, "branch_mlp": branch_mlp,
            "mix_token": mix_token, "branch_pool": branch_pool, "fuse_mlp": fuse_mlp, "kd_branches": kd_branches,
            "kd_classes": kd_classes, "adversarial": adversarial, "grl": grl, "aux_outputs": aux_outputs,
            "grl_schedule": grl_schedule, "grl_warmup": grl_warmup})
        task = task or next(iter(tasks))
        if isinstance(classes, str):
            classes = [int(c) for c in classes.split(",") if c.strip()]
        if isinstance(branches, str):
            branches = [b for b in branches.split(",") if b]
        super().__init__(inputs, tasks, hidden=hidden, out_dim=out_dim, bands=bands, queries=queries, heads=heads,
                         branch_heads=branch_heads, dropout=dropout, cond=cond, calibrate=calibrate,
                         condition=condition, band_queries=band_queries, aggregate=aggregate,
                         cross_branch=cross_branch, compose=compose, compose_mode=compose_mode,
                         classes=list(classes), task=task, branches=list(branches) if branches else None,
                         use_tokens=use_tokens, ablation=ablation, modalities=modalities, variant=variant, **parts)
        where = "head scabg"
        _check_numbers(parts, where)
        self._check_shape(hidden, out_dim, bands, queries, heads, branch_heads, compose, compose_mode, task, where)
        self.classes = check_classes(classes, where)
        self.mods = select_modalities(list(self.inputs), modalities, ablation)
        check_spec(self.inputs, self.mods, "scabg")
        self.branch_pairs = self._branches(branches)
        self.task = task
        self.cond = cond
        self.use_tokens = use_tokens
        self.compose = compose
        self.compose_mode = compose_mode
        self.branch_gates_on = parts["branch_gates"]
        self._build_gates(hidden, bands, queries, heads, dropout, calibrate, condition, band_queries,
                          parts["band_blocks"])
        self._build_condition(hidden, bands, cond, condition, aggregate)
        self._build_branch_fusion(parts, hidden, out_dim, bands, branch_heads, dropout, aggregate, cross_branch)
        self._build_outputs(parts, out_dim, compose, task)
        self.grl = float(parts["grl"])
        self.grl_schedule, self.grl_warmup = parts["grl_schedule"], parts["grl_warmup"]
        self.grl_now = 0.0  # the strength at the current step (`set_progress`)
        self.set_progress(_Start())
        self.aux_outputs = parts["aux_outputs"]
        skip_removed_keys(self, lambda name: REMOVED.fullmatch(name) is not None)

    def _check_shape(self, hidden: int, out_dim: int, bands: int, queries: int, heads: int, branch_heads: int,
                     compose: bool, compose_mode: str, task: str, where: str) -> None:
        """Refuse sizes that do not divide, too few bands or queries, an unknown compose mode or task, and
        composition on a task that is not 3-way."""
        if hidden % heads or out_dim % branch_heads:
            raise MMCacheError(f"{where}: hidden={hidden} must divide by heads={heads} and "
                               f"out_dim={out_dim} by branch_heads={branch_heads}")
        if bands < 1 or queries < 1:
            raise MMCacheError(f"{where}: bands={bands} and queries={queries} must be at least 1")
        if compose_mode not in ("logits", "logprob"):
            raise MMCacheError(f"{where}: compose_mode={compose_mode!r} must be 'logits' or 'logprob'")
        if task not in self.tasks:
            raise MMCacheError(f"{where}: task={task!r} is not one of the tasks {list(self.tasks)}")
        if compose and self.tasks[task] != 3:
            raise MMCacheError(f"{where}: coarse/fine composition needs a 3-way task (negative, neutral, positive), "
                               f"but {task!r} has {self.tasks[task]} classes; set compose=false or task=<3-way task>")

    def _build_gates(self, hidden: int, bands: int, queries: int, heads: int, dropout: float, calibrate: bool,
                     condition: bool, band_queries: bool, per_band: bool) -> None:
        """Steps 1-4: one band gate per modality, or (`branch_gates`) one projection per modality and a gate
        pair per branch."""
        gate_args = (hidden, bands, queries, heads, dropout, calibrate, condition, band_queries)
        if self.branch_gates_on:
            # One projection per modality, then a gate pair (x side, y side) per branch.
            self.projs = sequence_projections(self.inputs, self.mods, hidden, self.use_tokens)
            self.branch_gates = nn.ModuleList([
                nn.ModuleDict({side: BandGate(hidden, *gate_args, seq_len=self._seq_len(m), project=False,
                                              per_band=per_band) for side, m in (("x", x), ("y", y))})
                for x, y in self.branch_pairs])
        else:
            self.gates = nn.ModuleDict({
                m: BandGate(self._in_dim(m), *gate_args, seq_len=self._seq_len(m), per_band=per_band)
                for m in self.mods
            })

    def _build_condition(self, hidden: int, bands: int, cond: str, condition: bool, aggregate: bool) -> None:
        """The condition vector c: a projection of the condition modality and a learned default for rows without it."""
        # c feeds the gate (condition) and the band weights (aggregate); both vanish with one band.
        self.uses_c = bands > 1 and (condition or aggregate)
        self.cond_proj = nn.Linear(self.inputs[cond]["pooled"][-1], hidden) \
            if cond in self.mods and self.uses_c else None
        # Used where the condition modality is absent (not loaded, or missing in a row); a row without it
        # has nothing to condition when it is the only modality, so then there is no default to learn.
        needs_default = self.uses_c and any(m != cond for pair in self.branch_pairs for m in pair)
        self.cond_default = nn.Parameter(torch.zeros(hidden)) if needs_default else None

    def _build_branch_fusion(self, parts: dict[str, Any], hidden: int, out_dim: int, bands: int, branch_heads: int,
                             dropout: float, aggregate: bool, cross_branch: bool) -> None:
        """Steps 5-6: a band aggregator per branch, the branch MLPs and mix token, cross-branch attention, pooling
        and the fused vector's MLP."""
        self.aggregators = nn.ModuleList([BandAggregator(hidden, out_dim, bands, dropout, aggregate, parts["agg_mlp"])
                                          for _ in self.branch_pairs])
        nb = len(self.branch_pairs)
        self.branch_mlps = nn.ModuleList([mlp(out_dim, 2 * out_dim, out_dim, dropout) for _ in self.branch_pairs]) \
            if parts["branch_mlp"] else None
        # The mix token's lam = sigmoid(0.7) at the start, as in the reference; nothing to mix with one branch.
        self.mix_logit = nn.Parameter(torch.tensor(0.7)) if parts["mix_token"] and nb > 1 else None
        self.branch_attn = nn.MultiheadAttention(out_dim, branch_heads, dropout=dropout, batch_first=True) \
            if cross_branch else None
        self.branch_norm = nn.LayerNorm(out_dim) if cross_branch else None
        # Pooling scores: no bias (the softmax over branches cancels it), none at all for a single branch.
        self.branch_score = nn.Linear(out_dim, 1, bias=False) \
            if nb > 1 and parts["branch_pool"] == "score" else None
        self.pool_logits = nn.Parameter(torch.zeros(nb)) if nb > 1 and parts["branch_pool"] == "static" else None
        self.fuse = mlp(out_dim, 2 * out_dim, out_dim, dropout) if parts["fuse_mlp"] else \
            nn.Sequential(nn.Linear(out_dim, out_dim), nn.GELU(), nn.Dropout(dropout))

    def _build_outputs(self, parts: dict[str, Any], out_dim: int, compose: bool, task: str) -> None:
        """Step 7 and the auxiliary heads: coarse and fine heads, the other tasks' classifiers, KD and adversarial heads."""
        self.coarse = nn.Linear(out_dim, 2)
        self.fine = nn.Linear(out_dim, 2)
        self.classifiers = nn.ModuleDict({t: nn.Linear(out_dim, c) for t, c in self.tasks.items()
                                          if not (compose and t == task)})
        self.kd_index = self._kd_branches(parts["kd_branches"])
        kd_width = parts["kd_classes"] or self.tasks[task]
        self.kd_heads = nn.ModuleList([nn.Linear(out_dim, kd_width) for _ in self.kd_index]) if self.kd_index else None
        self.adv_heads = nn.ModuleList([nn.Linear(out_dim, self.tasks[task]) for _ in self.branch_pairs]) \
            if parts["adversarial"] else None

    def set_progress(self, progress: Any) -> None:
        """Where training stands (a `mmcache.engine.TrainProgress`, from the trainer before each training step):
        sets the gradient-reversal strength of this step from `grl_schedule`."""
        self.grl_now = self.grl * grl_factor(self.grl_schedule, self.grl_warmup, progress)

    def _in_dim(self, m: str) -> int:
        """Width of modality m's sequence positions (tokens, or `pooled` as the sequence)."""
        return sequence_width(self.inputs[m], self.use_tokens)

    def branch_name(self, i: int) -> str:
        """'x-y' of branch i."""
        return "-".join(self.branch_pairs[i])

    def _kd_branches(self, spec: Any) -> list[int]:
        """Indices of the branches that get a KD head: `auto` = the reference's text-context and image-context
        (those present; else the first branch), or the named branches in teacher order."""
        if not spec:
            return []
        names = [self.branch_name(i) for i in range(len(self.branch_pairs))]
        unordered = {frozenset(p): i for i, p in reversed(list(enumerate(self.branch_pairs)))}
        if spec == "auto":
            found = [unordered[frozenset(b.split("-"))] for b in REFERENCE_KD_BRANCHES
                     if frozenset(b.split("-")) in unordered]
            return found or [0]
        out = []
        for b in spec:
            key = frozenset(str(b).split("-"))
            if key not in unordered:
                raise MMCacheError(f"head scabg: kd_branches names {b!r}, which is not a branch of this head "
                                   f"({', '.join(names)}); name branches in teacher order, e.g. "
                                   "kd_branches=text-context,image-context")
            out.append(unordered[key])
        return out

    def _seq_len(self, m: str) -> int:
        """Positions per row of modality m's sequence (1 for `pooled` as the sequence)."""
        spec = self.inputs[m]
        return spec["tokens"][0] if self.use_tokens and "tokens" in spec and len(spec["tokens"]) == 2 else 1

    @property
    def dtype(self) -> torch.dtype:
        """The floating type of the head's parameters."""
        return next(self.parameters()).dtype

    def _branches(self, branches: list[str] | None) -> list[tuple[str, str]]:
        if not branches:
            return default_branches(self.mods)
        pairs = []
        for b in branches:
            parts = b.split("-")
            if len(parts) != 2 or any(p not in self.mods for p in parts):
                raise MMCacheError(f"head scabg: branch {b!r} must be 'a-b' with a, b among the used modalities "
                                   f"{self.mods}, e.g. image-text")
            pairs.append((parts[0], parts[1]))
        return pairs

    def condition_vector(self, features: Features) -> torch.Tensor | None:
        """c [B,H]: the projected `pooled` of the condition modality (a learned default where it is missing);
        None when nothing uses it (one band, or neither `condition` nor `aggregate`)."""
        if not self.uses_c:
            return None
        B, device = batch_size(features)
        dtype = self.dtype
        c = self.cond_default[None].expand(B, -1) if self.cond_default is not None else \
            torch.zeros(B, self.hparams["hidden"], dtype=dtype, device=device)
        f = features.get(self.cond)
        if self.cond_proj is None or f is None or "pooled" not in f:
            return c
        p = row_presence(f, B, device)
        x = torch.where(p[:, None], f["pooled"].to(dtype), torch.zeros((), dtype=dtype, device=device))
        return torch.where(p[:, None], self.cond_proj(x), c)

    def _sequences(self, features: Features) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        B, device = batch_size(features)
        dtype = self.dtype
        out = {}
        for m in self.mods:
            s = token_sequence(features.get(m), row_presence(features.get(m), B, device), dtype, self.use_tokens)
            if s is not None:
                out[m] = s
        return out

    def band_probabilities(self, features: Features) -> dict[str, torch.Tensor]:
        """Per present modality, the band probabilities [B,T,K] of each token (for inspection and tests);
        with `branch_gates`, per branch side: keys 'x-y:x' and 'x-y:y'."""
        c = self.condition_vector(features)
        seqs = self._sequences(features)
        if not self.branch_gates_on:
            return {m: cast(BandGate, self.gates[m]).probabilities(x, mask, c)[1] for m, (x, mask) in seqs.items()}
        out = {}
        for i, (pair, gates) in enumerate(zip(self.branch_pairs, self.branch_gates, strict=True)):
            for side, m in zip(("x", "y"), pair, strict=True):
                if m in seqs:
                    x, mask = seqs[m]
                    out[f"{self.branch_name(i)}:{side}"] = cast(BandGate, cast(nn.ModuleDict, gates)[side]) \
                        .probabilities(self.projs[m](x), mask, c)[1]
        return out

    def _band_summaries(self, features: Features,
                        c: torch.Tensor | None) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Per branch, the band summaries [B,K,H] of its two sides, and the branch presence [B, branches]."""
        B, device = batch_size(features)
        H, K = self.hparams["hidden"], self.hparams["bands"]
        dtype = self.dtype
        seqs = self._sequences(features)
        zeros = torch.zeros(B, K, H, dtype=dtype, device=device)
        present = {m: seqs[m][1].any(-1) if m in seqs else torch.zeros(B, dtype=torch.bool, device=device)
                   for m in self.mods}
        if self.branch_gates_on:
            proj = {m: (self.projs[m](x), mask) for m, (x, mask) in seqs.items()}
            pairs = [tuple(cast(nn.ModuleDict, gates)[side](*proj[m], c) if m in proj else zeros
                           for side, m in zip(("x", "y"), pair, strict=True))
                     for pair, gates in zip(self.branch_pairs, self.branch_gates, strict=True)]
        else:
            summaries = {m: self.gates[m](x, mask, c) for m, (x, mask) in seqs.items()}
            pairs = [(summaries.get(x, zeros), summaries.get(y, zeros)) for x, y in self.branch_pairs]
        # A branch counts when at least one of its modalities is present, so one modality still informs.
        bp = torch.stack([present[x] | present[y] for x, y in self.branch_pairs], 1)
        return cast(list[tuple[torch.Tensor, torch.Tensor]], pairs), bp

    def branch_vectors(self, features: Features) -> dict[str, torch.Tensor]:
        """`branches` [B, nb, out_dim] (the aggregators' outputs, zeros for absent branches), `mask` [B, nb],
        `band_w` [B, nb, K] (the aggregators' band weights)."""
        c = self.condition_vector(features)
        pairs, bp = self._band_summaries(features, c)
        vecs, weights = zip(*[cast(BandAggregator, agg).with_weights(sx, sy, c)
                              for agg, (sx, sy) in zip(self.aggregators, pairs, strict=True)], strict=True)
        b = torch.stack(vecs, 1) * bp[..., None].to(vecs[0].dtype)
        return {"branches": b, "mask": bp, "band_w": torch.stack(weights, 1)}

    def _fuse(self, b: torch.Tensor, bp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 6 from the branch vectors b [B,nb,out_dim] (present where bp): the fused vector [B,out_dim]
        and the branch tokens the fusion saw (after the per-branch MLPs)."""
        if self.branch_mlps is not None:
            b = torch.stack([m(b[:, i]) for i, m in enumerate(self.branch_mlps)], 1) * bp[..., None].to(b.dtype)
        tokens = b
        if self.mix_logit is not None:
            lam = torch.sigmoid(self.mix_logit)
            b = torch.cat([(lam * b[:, -1] + (1 - lam) * b[:, 0])[:, None], b[:, 1:]], 1)
        if self.branch_attn is not None and self.branch_norm is not None:
            b = self.branch_norm(b + masked_attention(self.branch_attn, b, b, bp))
        if self.branch_score is not None:
            s = self.branch_score(b).squeeze(-1)
        elif self.pool_logits is not None:
            s = self.pool_logits.to(b.dtype)[None].expand(b.shape[0], -1)
        else:
            s = None
        if s is None:
            w = bp.to(b.dtype)  # one branch: weight 1 where it is present
        else:
            s = s.masked_fill(~bp, float("-inf"))
            w = torch.softmax(torch.where(bp.any(1, keepdim=True), s, torch.zeros_like(s)), 1) * bp
        return self.fuse((w[..., None] * b).sum(1)) * bp.any(1, keepdim=True).to(b.dtype), tokens

    def fused(self, features: Features) -> torch.Tensor:
        """The fused vector [B,out_dim] before the output heads (zeros for rows with no modality)."""
        v = self.branch_vectors(features)
        return self._fuse(v["branches"], v["mask"])[0]

    def forward(self, features: Features) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Logits per task, plus `_coarse` [B,2] (neutral, emotional) and `_fine` [B,2] (negative, positive);
        with the reference's parts, `_kd`, `_adv`, `_branches`, `_branch_mask`, `_band_w` (see the module doc)."""
        v = self.branch_vectors(features)
        z, tokens = self._fuse(v["branches"], v["mask"])
        coarse, fine = self.coarse(z), self.fine(z)
        out = {t: clf(z) for t, clf in self.classifiers.items()}
        if self.compose:
            out[self.task] = compose_three_way(coarse, fine, self.classes, self.compose_mode)
        out["_coarse"] = coarse
        out["_fine"] = fine
        keys = [*self.tasks, "_coarse", "_fine"]
        if self.kd_heads is not None:
            out["_kd"] = torch.stack([h(tokens[:, i]) for h, i in zip(self.kd_heads, self.kd_index, strict=True)], 1)
            keys.append("_kd")
        if self.adv_heads is not None:
            out["_adv"] = torch.stack([h(grad_reverse(tokens[:, i], self.grl_now))
                                       for i, h in enumerate(self.adv_heads)], 1)
            keys.append("_adv")
        if self.aux_outputs:
            out["_branches"], out["_branch_mask"], out["_band_w"] = \
                v["branches"], v["mask"].to(v["branches"].dtype), v["band_w"]
            keys += ["_branches", "_branch_mask", "_band_w"]
        return {t: out[t] for t in keys}


@register_head("scabg-ref")
class SCABGReferenceHead(SCABGHead):
    """`scabg` with `variant="reference"` by default: the public reference code's architecture."""

    def __init__(self, inputs: InputSpec, tasks: dict[str, int], variant: str = "reference", **hparams: Any) -> None:
        super().__init__(inputs, tasks, variant=variant, **hparams)


# The same hyperparameters as `scabg` (for `--hp` checks and listings), with the reference variant as default.
_sig = inspect.signature(SCABGHead.__init__)
SCABGReferenceHead.__init__.__signature__ = _sig.replace(  # type: ignore[attr-defined]
    parameters=[p.replace(default="reference") if p.name == "variant" else p for p in _sig.parameters.values()])
