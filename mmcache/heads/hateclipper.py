"""Hate-CLIPper (Kumar & Nandakumar, 2022): two projected, unit-normalised embeddings combined by their outer
product (`fusion="cross"`, the feature interaction matrix, D*D values) or their element-wise product
(`fusion="align"`, D values), then `layers` dense layers and a linear output per task.

The reference reads CLIP's pooled image and text embeddings: per modality Linear(d->D) and dropout, L2
normalisation, the fusion, dropout, then [Linear, ReLU, dropout] x `layers`. With `unimodal=True` the two
projections are also concatenated to the fused vector, so a row with one modality missing keeps that modality's
own evidence (the pure product has none).

Which two modalities: image and text when both are used (the paper's pair), else the first two of the selection
(`modalities` / `ablation` as for `linear`); one modality is fused with itself (its second-order features). A
modality absent from `features`, or a row with a non-finite `pooled`, counts as missing: its projection is zero,
so a product with it is zero.

hparams: D (projection width), fusion (cross / align), hidden (width of the dense layers), layers, dropout (after
each projection), fusion_dropout (on the fused vector), hidden_dropout (after each dense layer), unimodal,
ablation / modalities.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcache.errors import MMCacheError
from mmcache.heads.base import Features, Head, InputSpec, register_head
from mmcache.heads.gated import batch_size, check_spec, clean_pooled, reject_unknown, row_presence
from mmcache.heads.linear import select_modalities

FUSIONS = ("cross", "align")


def fusion_pair(available: list[str], modalities: list[str] | None, ablation: int) -> list[str]:
    """The one or two modalities the head fuses: image and text when both are selected, else the first two (an
    explicit `modalities` of more than two is refused)."""
    chosen = select_modalities(available, modalities, ablation)
    if modalities and len(chosen) > 2:
        raise MMCacheError(f"head hateclipper fuses two modalities, --use names {len(chosen)} ({','.join(chosen)}); "
                           "name two, e.g. --use image,text")
    if "image" in chosen and "text" in chosen:
        return ["image", "text"]
    return chosen[:2]


@register_head("hateclipper")
class HateClipperHead(Head):
    """Projected image and text embeddings, their outer (cross) or element-wise (align) product, dense layers."""

    uses = ("pooled",)
    positive = ("D", "hidden", "layers")

    def __init__(self, inputs: InputSpec, tasks: dict[str, int], D: int = 32, fusion: str = "cross",
                 hidden: int = 512, layers: int = 2, dropout: float = 0.1, fusion_dropout: float = 0.4,
                 hidden_dropout: float = 0.2, unimodal: bool = False, ablation: int = 0,
                 modalities: list[str] | None = None, **extra: Any) -> None:
        reject_unknown("hateclipper", extra, type(self))
        super().__init__(inputs, tasks, D=D, fusion=fusion, hidden=hidden, layers=layers, dropout=dropout,
                         fusion_dropout=fusion_dropout, hidden_dropout=hidden_dropout, unimodal=unimodal,
                         ablation=ablation, modalities=modalities)
        if fusion not in FUSIONS:
            raise MMCacheError(f"head hateclipper: fusion={fusion!r} must be 'cross' (outer product) or 'align' "
                               "(element-wise product)")
        self.mods = fusion_pair(list(self.inputs), modalities, ablation)
        check_spec(self.inputs, self.mods, "hateclipper")
        self.fusion = fusion
        self.unimodal = unimodal
        self.proj = nn.ModuleDict({m: nn.Sequential(nn.Linear(self.inputs[m]["pooled"][-1], D), nn.Dropout(dropout))
                                   for m in self.mods})
        width = D * D if fusion == "cross" else D
        if unimodal:
            width += 2 * D
        blocks: list[nn.Module] = [nn.Dropout(fusion_dropout)]
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(hidden_dropout)]
            width = hidden
        self.body = nn.Sequential(*blocks)
        self.classifiers = nn.ModuleDict({t: nn.Linear(width, c) for t, c in self.tasks.items()})

    def project(self, features: Features) -> list[torch.Tensor]:
        """The two unit-normalised projections [B, D] (zero for missing rows); one modality is returned twice."""
        B, device = batch_size(features)
        dtype = next(self.parameters()).dtype
        out = []
        for m in self.mods:
            f = features.get(m)
            if f is None or "pooled" not in f:
                out.append(torch.zeros(B, self.hparams["D"], dtype=dtype, device=device))
                continue
            present = row_presence(f, B, device)
            z = F.normalize(self.proj[m](clean_pooled(f["pooled"], present, dtype)), dim=-1)
            out.append(z * present[:, None].to(dtype))
        return out if len(out) == 2 else [out[0], out[0]]

    def forward(self, features: Features) -> dict[str, torch.Tensor]:  # type: ignore[override]
        a, b = self.project(features)
        fused = torch.einsum("bi,bj->bij", a, b).flatten(1) if self.fusion == "cross" else a * b
        if self.unimodal:
            fused = torch.cat([fused, a, b], 1)
        h = self.body(fused)
        return {t: clf(h) for t, clf in self.classifiers.items()}
