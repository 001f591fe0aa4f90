"""The linear-probe fusion head: per modality Linear(d->D), BatchNorm, ReLU, Dropout; concatenate; Linear per task.

The branch Linear has no bias: BatchNorm subtracts the batch mean, which would cancel it.

With `D=0` it is a plain multinomial logistic regression on the concatenated pooled features
(the head the full-batch `--solver lbfgs` fits).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcache.errors import MMCacheError
from mmcache.heads.base import Features, Head, InputSpec, register_head

# The reference's `ablation` codes: 0 both, 1 text only, 2 image only.
ABLATIONS: dict[int, list[str] | None] = {0: None, 1: ["text"], 2: ["image"]}


def select_modalities(available: list[str], modalities: list[str] | None = None, ablation: int = 0) -> list[str]:
    """Modalities a head uses: `modalities` if given, else the `ablation` code's subset of `available`."""
    if modalities is not None:
        if not isinstance(modalities, (list, tuple)) or not all(isinstance(m, str) and m for m in modalities):
            raise MMCacheError(f"--use (modalities) must name loaded modalities, e.g. image,text; got {modalities!r}")
        if len(set(modalities)) < len(modalities):
            raise MMCacheError(f"--use (modalities) names a modality twice: {list(modalities)}")
    if modalities:
        chosen = list(modalities)
    else:
        if ablation not in ABLATIONS:
            raise MMCacheError(f"--ablation must be one of {sorted(ABLATIONS)} (0 all, 1 text only, 2 image only); "
                               f"got {ablation}")
        chosen = ABLATIONS[ablation] or list(available)
    missing = [m for m in chosen if m not in available]
    if missing:
        raise MMCacheError(f"the head is asked to use {missing}, but only {available} are loaded; "
                           "add the store (--vtype/--ttype/...) or change --ablation/--use")
    return chosen


@register_head("linear")
class LinearHead(Head):
    """Per-modality projection branches on `pooled`, concatenated, one linear classifier per task.

    hparams: D (branch width; 0 = no branch, logistic regression on the raw features), dropout,
    ablation (0 all / 1 text / 2 image) or modalities (explicit list), l2norm (unit-normalise inputs),
    key (which array to read, default "pooled"). A dropped modality has no branch at all.
    """

    uses = ("pooled",)

    def __init__(self, inputs: InputSpec, tasks: dict[str, int], D: int = 256, dropout: float = 0.3,
                 ablation: int = 0, modalities: list[str] | None = None, l2norm: bool = False,
                 key: str = "pooled", **hparams: Any) -> None:
        if hparams:
            raise MMCacheError(f"unknown hparams for head 'linear': {sorted(hparams)}; known: D, dropout, ablation, "
                               "modalities, l2norm, key")
        super().__init__(inputs, tasks, D=D, dropout=dropout, ablation=ablation, modalities=modalities,
                         l2norm=l2norm, key=key)
        self.key = key
        self.l2norm = l2norm
        self.mods = select_modalities(list(inputs), modalities, ablation)
        for m in self.mods:
            if key not in inputs[m] or len(inputs[m][key]) != 1:
                raise MMCacheError(f"head 'linear' needs a `{key}` vector per row for {m!r}; its store has "
                                   f"{ {k: list(v) for k, v in inputs[m].items()} }")
        self.dims = {m: int(inputs[m][key][0]) for m in self.mods}
        if D > 0:
            self.branches = nn.ModuleDict({
                m: nn.Sequential(nn.Linear(d, D, bias=False), nn.BatchNorm1d(D), nn.ReLU(), nn.Dropout(dropout))
                for m, d in self.dims.items()})
            self.register_load_state_dict_pre_hook(_fold_branch_bias)
            self.widths = {m: D for m in self.mods}
        else:
            self.branches = nn.ModuleDict()
            self.widths = dict(self.dims)
        self.classifiers = nn.ModuleDict({t: nn.Linear(sum(self.widths.values()), c) for t, c in tasks.items()})

    def fused(self, features: Features) -> torch.Tensor:
        """The concatenated branch outputs [B, sum of widths]; a missing modality contributes zeros."""
        present = [m for m in self.mods if m in features and self.key in features[m]]
        if not present:
            raise MMCacheError(f"head 'linear' got none of its modalities {self.mods} (got {list(features)})")
        ref = features[present[0]][self.key]
        dtype = next(self.parameters()).dtype
        parts = []
        for m in self.mods:
            if m not in present:
                parts.append(ref.new_zeros(ref.shape[0], self.widths[m], dtype=dtype))
                continue
            x = features[m][self.key].to(dtype)
            # A row whose vector is not finite (a NaN from a failed upstream step) counts as missing:
            # it contributes zeros, as an absent modality does, instead of turning the logits into NaN.
            ok = torch.isfinite(x).all(-1, keepdim=True)
            x = torch.where(ok, x, torch.zeros((), dtype=x.dtype, device=x.device))
            if self.l2norm:
                x = F.normalize(x, dim=-1)
            y = self.branches[m](x) if m in self.branches else x
            parts.append(torch.where(ok, y, torch.zeros((), dtype=y.dtype, device=y.device)))
        return torch.cat(parts, dim=-1)

    def forward(self, features: Features) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Logits per task, each [B, num_classes]."""
        z = self.fused(features)
        return {t: clf(z) for t, clf in self.classifiers.items()}


def _fold_branch_bias(head: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load a state dict saved when the branch Linear had a bias: BatchNorm cancels it in training, and in
    evaluation BN(Wx + b) with running mean mu equals BN(Wx) with mean mu - b, so fold it there."""
    for key in [k for k in state if k.startswith(f"{prefix}branches.") and k.endswith(".0.bias")]:
        mean = key[:-len("0.bias")] + "1.running_mean"
        if mean in state:
            state[mean] = state[mean] - state[key]
        del state[key]
