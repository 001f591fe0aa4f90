"""Cross-attention fusion over token / region sequences.

Each modality's sequence (`tokens` [B,T,d] + `mask` [B,T], True = real; or `pooled` as a
1-token sequence when the store has no tokens) is projected to D. Every modality then attends
to the concatenated sequences of the other modalities (text -> image and image -> text with
two; each -> the rest with more) through multi-head attention with a key padding mask, with a
residual LayerNorm and a feed-forward block. Each attended sequence is mean-pooled over its
real tokens; the pooled vectors are concatenated and classified.

Padding never reaches the output: padded tokens are zeroed on entry, masked as keys, and left
out of the pooling. A modality missing from `features` (or a row without real tokens) gives a
zero vector and is not attended to. With a single modality there is nothing to attend to, and
no attention is built.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from mmcache.errors import MMCacheError
from mmcache.heads.base import Features, Head, InputSpec, register_head, skip_removed_keys
from mmcache.heads.gated import batch_size, check_spec, reject_unknown, row_presence
from mmcache.heads.linear import select_modalities


def seq_dim(spec: dict[str, tuple[int, ...]]) -> int:
    """Feature size of the sequence a modality provides: tokens when it has them, else pooled."""
    return spec["tokens"][-1] if "tokens" in spec else spec["pooled"][-1]


def sequence_width(spec: dict[str, tuple[int, ...]], use_tokens: bool = True) -> int:
    """Width of a modality's sequence positions: `seq_dim` with `use_tokens`, else its pooled vector's."""
    return seq_dim(spec) if use_tokens else spec["pooled"][-1]


def sequence_projections(inputs: InputSpec, mods: list[str], width: int, use_tokens: bool = True) -> nn.ModuleDict:
    """Per modality of `mods`, Linear + LayerNorm from its sequence width (`sequence_width`) to `width`."""
    return nn.ModuleDict({m: nn.Sequential(nn.Linear(sequence_width(inputs[m], use_tokens), width), nn.LayerNorm(width))
                          for m in mods})


def token_sequence(feats: dict[str, torch.Tensor] | None, present: torch.Tensor, dtype: torch.dtype,
                   use_tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x [B,T,d], mask [B,T] bool) with padded / missing positions zeroed; pooled as one token if no tokens."""
    if feats is None:
        return None
    if use_tokens and "tokens" in feats:
        x = feats["tokens"].to(dtype)
        mask = feats["mask"].bool() if "mask" in feats else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if mask.shape != x.shape[:2]:
            raise MMCacheError(f"tokens {tuple(x.shape)} and mask {tuple(mask.shape)} disagree; re-extract the store")
    elif "pooled" in feats:
        x = feats["pooled"].to(dtype)[:, None, :]
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    else:
        return None
    mask = mask & present[:, None]
    # torch.where, not multiplication: NaN or inf padding must become exact zeros.
    x = torch.where(mask[..., None], x, torch.zeros((), dtype=dtype, device=x.device))
    return x, mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B,T,D] over positions where mask [B,T] is True; zeros for rows with none."""
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(-2) / m.sum(-2).clamp(min=1)


def masked_attention(attn: nn.MultiheadAttention, q: torch.Tensor, kv: torch.Tensor,
                     key_mask: torch.Tensor) -> torch.Tensor:
    """attn(q, kv, kv) ignoring keys where key_mask is False; rows with no real key get zeros, not NaN."""
    has = key_mask.any(-1)
    pad = ~key_mask
    # A fully padded row makes softmax NaN; unmask one (zero) key there and zero the result afterwards.
    pad = torch.where(has[:, None], pad, torch.arange(pad.shape[1], device=pad.device)[None, :] > 0)
    out, _ = attn(q, kv, kv, key_padding_mask=pad, need_weights=False)
    return out * has[:, None, None].to(out.dtype)


@register_head("xattn")
class CrossAttentionHead(Head):
    """Each modality attends to the others (masked multi-head attention), masked mean pooling, concat, classify."""

    uses = ("pooled", "tokens", "mask")  # arrays the trainer loads per store
    positive = ("D", "heads")

    def __init__(self, inputs: InputSpec, tasks: dict[str, int], D: int = 256, heads: int = 4, dropout: float = 0.1,
                 ffn: bool = True, use_tokens: bool = True, ablation: int = 0, modalities: list[str] | None = None,
                 **extra: Any) -> None:
        reject_unknown("xattn", extra, type(self))
        super().__init__(inputs, tasks, D=D, heads=heads, dropout=dropout, ffn=ffn, use_tokens=use_tokens,
                         ablation=ablation, modalities=modalities)
        if D % heads:
            raise MMCacheError(f"head xattn: D={D} must be divisible by heads={heads}")
        self.mods = select_modalities(list(self.inputs), modalities, ablation)
        check_spec(self.inputs, self.mods, "xattn")
        self.use_tokens = use_tokens
        self.proj = sequence_projections(self.inputs, self.mods, D, use_tokens)
        # Modality embeddings tell the keys of different modalities apart once concatenated.
        self.mod_emb = nn.Parameter(torch.zeros(len(self.mods), D))
        self.attn = nn.ModuleDict({m: nn.MultiheadAttention(D, heads, dropout=dropout, batch_first=True)
                                   for m in self.mods if len(self.mods) > 1})
        skip_removed_keys(self, lambda name: name.startswith("attn."))
        self.norm1 = nn.ModuleDict({m: nn.LayerNorm(D) for m in self.mods})
        self.ffn = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * D, D))
            for m in self.mods
        }) if ffn else None
        self.norm2 = nn.ModuleDict({m: nn.LayerNorm(D) for m in self.mods}) if ffn else None
        n = len(self.mods)
        self.fuse = nn.Sequential(nn.Linear(n * D + n, D), nn.GELU(), nn.Dropout(dropout))
        self.classifiers = nn.ModuleDict({t: nn.Linear(D, c) for t, c in self.tasks.items()})

    def pooled(self, features: Features) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled cross-attended vectors [B,M,D] (zeros for missing) and presence [B,M]."""
        B, device = batch_size(features)
        dtype = next(self.parameters()).dtype
        D = self.hparams["D"]
        seqs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        pres = []
        for i, m in enumerate(self.mods):
            p = row_presence(features.get(m), B, device)
            s = token_sequence(features.get(m), p, dtype, self.use_tokens)
            if s is None:
                p = torch.zeros_like(p)
            else:
                x, mask = s
                seqs[m] = (self.proj[m](x) + self.mod_emb[i], mask)
            pres.append(p)
        outs = []
        for m in self.mods:
            if m not in seqs:
                outs.append(torch.zeros(B, D, dtype=dtype, device=device))
                continue
            x, mask = seqs[m]
            others = [o for o in self.mods if o != m and o in seqs]
            if others:
                kv = torch.cat([seqs[o][0] for o in others], 1)
                kmask = torch.cat([seqs[o][1] for o in others], 1)
                x = x + masked_attention(cast(nn.MultiheadAttention, self.attn[m]), x, kv, kmask)
            # Normalised either way, so a modality absent from the batch equals one masked out row by row.
            x = self.norm1[m](x)
            if self.ffn is not None and self.norm2 is not None:
                x = self.norm2[m](x + self.ffn[m](x))
            outs.append(masked_mean(x, mask))
        return torch.stack(outs, 1), torch.stack(pres, 1)

    def forward(self, features: Features) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Logits per task."""
        v, present = self.pooled(features)
        h = self.fuse(torch.cat([v.flatten(1), present.to(v.dtype)], 1))
        return {t: clf(h) for t, clf in self.classifiers.items()}
