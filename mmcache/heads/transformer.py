"""Transformer fusion: a learned [CLS] and every modality's tokens through pre-norm encoder layers.

Each modality's sequence (`tokens` [B,T,d] + `mask` [B,T], True = real; or `pooled` as a
1-token sequence when the store has no tokens or `use_tokens` is off) is projected to D
(Linear, LayerNorm) and gets its modality's learned type embedding. A learned [CLS] vector
is put in front of the concatenated sequences, and `layers` pre-norm `nn.TransformerEncoder`
layers (`norm_first=True`, `heads` attention heads, feed-forward width 4 D, GELU) run over
it with a key padding mask, so [CLS] and every token attend only to real tokens of present
modalities. The final LayerNorm of [CLS] feeds one linear classifier per task.

Padding never reaches the output: padded tokens are zeroed on entry and masked as keys in
every layer. A modality missing from `features`, a row whose mask has no real token or
whose `pooled` is not finite is masked out; a row with nothing present is classified from
[CLS] alone, so the logits stay finite.

The attention's key bias is held at zero (a parametrization multiplies it by 0): it adds the
same amount to every score of a query, which the softmax cancels, so it could not learn anyway.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmcache.errors import MMCacheError
from mmcache.heads.base import Features, Head, InputSpec, register_head
from mmcache.heads.gated import batch_size, check_spec, reject_unknown, row_presence
from mmcache.heads.linear import select_modalities
from mmcache.heads.xattn import sequence_projections, token_sequence


class _NoKeyBias(nn.Module):
    """Parametrization of a packed q/k/v in-projection bias that keeps its key slice at zero."""

    keep: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        keep = torch.ones(3 * dim)
        keep[dim:2 * dim] = 0
        self.register_buffer("keep", keep, persistent=False)

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return bias * self.keep.to(bias.dtype)


def _without_key_bias(attn: nn.MultiheadAttention) -> None:
    """Hold the key slice of the attention's in-projection bias at zero (the softmax cancels it): its gradient
    is exactly zero, also in copies of the module."""
    from torch.nn.utils import parametrize

    if attn.in_proj_bias is not None:
        with torch.no_grad():
            attn.in_proj_bias[attn.embed_dim:2 * attn.embed_dim].zero_()
        parametrize.register_parametrization(attn, "in_proj_bias", _NoKeyBias(attn.embed_dim))


@register_head("transformer")
class TransformerHead(Head):
    """[CLS] + type-embedded modality tokens through N pre-norm transformer layers; classify from [CLS]."""

    uses = ("pooled", "tokens", "mask")  # arrays the trainer loads per store
    positive = ("D", "layers", "heads")

    def __init__(self, inputs: InputSpec, tasks: dict[str, int], D: int = 256, layers: int = 2, heads: int = 4,
                 dropout: float = 0.1, use_tokens: bool = True, ablation: int = 0,
                 modalities: list[str] | None = None, **extra: Any) -> None:
        reject_unknown("transformer", extra, type(self))
        super().__init__(inputs, tasks, D=D, layers=layers, heads=heads, dropout=dropout, use_tokens=use_tokens,
                         ablation=ablation, modalities=modalities)
        if D < 1 or heads < 1 or D % heads:
            raise MMCacheError(f"head transformer: D={D} must be a positive multiple of heads={heads}")
        if layers < 1:
            raise MMCacheError(f"head transformer: layers must be at least 1, got {layers}")
        self.mods = select_modalities(list(self.inputs), modalities, ablation)
        check_spec(self.inputs, self.mods, "transformer")
        self.use_tokens = use_tokens
        self.proj = sequence_projections(self.inputs, self.mods, D, use_tokens)
        self.type_emb = nn.Parameter(torch.randn(len(self.mods), D) * 0.02)
        self.cls = nn.Parameter(torch.randn(D) * 0.02)
        layer = nn.TransformerEncoderLayer(D, heads, dim_feedforward=4 * D, dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        # Nested tensors are a fast path for post-norm layers only; asking for them with norm_first just warns.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        for block in self.encoder.layers:
            _without_key_bias(block.self_attn)
        self.norm = nn.LayerNorm(D)
        self.classifiers = nn.ModuleDict({t: nn.Linear(D, c) for t, c in self.tasks.items()})

    def sequence(self, features: Features) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder input [B, 1+sum T, D] ([CLS] first) and its mask [B, 1+sum T] (True = attend)."""
        B, device = batch_size(features)
        dtype = self.cls.dtype
        xs = [self.cls.expand(B, 1, -1)]
        keep = [torch.ones(B, 1, dtype=torch.bool, device=device)]
        for i, m in enumerate(self.mods):
            s = token_sequence(features.get(m), row_presence(features.get(m), B, device), dtype, self.use_tokens)
            if s is None:
                continue  # absent from the batch: the same as masked out in every row
            x, mask = s
            xs.append(self.proj[m](x) + self.type_emb[i])
            keep.append(mask)
        return torch.cat(xs, 1), torch.cat(keep, 1)

    def embed(self, features: Features) -> torch.Tensor:
        """The normalised [CLS] output [B, D] the classifiers read."""
        x, keep = self.sequence(features)
        out = self.encoder(x, src_key_padding_mask=~keep)
        return self.norm(out[:, 0])

    def forward(self, features: Features) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Logits per task, each [B, num_classes]."""
        h = self.embed(features)
        return {t: clf(h) for t, clf in self.classifiers.items()}
