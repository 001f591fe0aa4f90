"""Gated fusion: per-modality projections of `pooled` weighted by a learned gate before the classifier.

The gate sees every projected modality (and which ones are present) and emits one weight per
modality: independent sigmoids (`gate="sigmoid"`) or a softmax over modalities
(`gate="softmax"`; with a single modality its weight is 1, so no gate is built). A modality
absent from `features`, or a row whose token mask has no real token or whose `pooled` is not
finite, counts as missing: it gets weight 0 and the remaining weights are renormalised over
the present modalities.

hparams: D, dropout, gate, l2norm (unit-normalise each `pooled`), ablation / modalities (as for
`linear`). The helpers here (per-row presence, hparam checks) are shared by `xattn` and `scabg`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcache.errors import MMCacheError
from mmcache.heads.base import Features, Head, InputSpec, register_head, skip_removed_keys
from mmcache.heads.linear import select_modalities


def reject_unknown(head: str, extra: dict[str, Any], cls: type[Head]) -> None:
    """A clear error for hyperparameters the head does not take (instead of a TypeError)."""
    if extra:
        import inspect

        known = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "inputs", "tasks", "extra")]
        raise MMCacheError(f"head {head}: unknown hyperparameters {sorted(extra)}; it takes {known}")


def check_spec(inputs: InputSpec, mods: list[str], head: str) -> None:
    """Every used modality must provide `pooled` (tokens are optional)."""
    for m in mods:
        if "pooled" not in inputs[m]:
            raise MMCacheError(f"head {head}: modality {m!r} has no 'pooled' array (has {list(inputs[m])}); "
                               "extract it with a preset that writes pooled features")


def row_presence(feats: dict[str, torch.Tensor] | None, batch: int, device: torch.device) -> torch.Tensor:
    """[B] bool: rows where the modality is present (absent dict, empty mask or non-finite pooled = missing)."""
    if feats is None:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    present = torch.ones(batch, dtype=torch.bool, device=device)
    if "pooled" in feats:
        present &= torch.isfinite(feats["pooled"]).all(-1)
    if "mask" in feats and "tokens" in feats:
        present &= feats["mask"].bool().any(-1)
    return present


def batch_size(features: Features) -> tuple[int, torch.device]:
    """Batch size and device of the first array in `features`."""
    for d in features.values():
        for v in d.values():
            return v.shape[0], v.device
    raise MMCacheError("a head got no features at all; at least one modality must be present")


def clean_pooled(x: torch.Tensor, present: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`pooled` in the head's dtype with missing rows zeroed (NaN placeholders must not reach the weights)."""
    x = x.to(dtype)
    return torch.where(present[:, None], x, torch.zeros((), dtype=dtype, device=x.device))


@register_head("gated")
class GatedHead(Head):
    """Gated fusion of pooled features: sum_m w_m(all inputs) * proj_m(pooled_m), then a classifier per task."""

    uses = ("pooled",)  # arrays the trainer loads per store
    positive = ("D",)

    def __init__(self, inputs: InputSpec, tasks: dict[str, int], D: int = 256, dropout: float = 0.3,
                 gate: str = "sigmoid", l2norm: bool = False, ablation: int = 0, modalities: list[str] | None = None,
                 **extra: Any) -> None:
        reject_unknown("gated", extra, type(self))
        super().__init__(inputs, tasks, D=D, dropout=dropout, gate=gate, l2norm=l2norm, ablation=ablation,
                         modalities=modalities)
        if gate not in ("sigmoid", "softmax"):
            raise MMCacheError(f"head gated: gate={gate!r} must be 'sigmoid' or 'softmax'")
        self.mods = select_modalities(list(self.inputs), modalities, ablation)
        check_spec(self.inputs, self.mods, "gated")
        self.gate_kind = gate
        self.l2norm = l2norm
        self.proj = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(self.inputs[m]["pooled"][-1], D), nn.LayerNorm(D), nn.ReLU(),
                             nn.Dropout(dropout))
            for m in self.mods
        })
        n = len(self.mods)
        # The gate is conditioned on every projected modality plus the presence flags. A softmax over one
        # modality is 1 whatever the gate says: no gate then (it could not learn).
        self.gate = nn.Sequential(nn.Linear(n * D + n, D), nn.ReLU(), nn.Linear(D, n)) \
            if gate == "sigmoid" or n > 1 else None
        skip_removed_keys(self, lambda name: name.startswith("gate."))
        self.classifiers = nn.ModuleDict({t: nn.Linear(D, c) for t, c in self.tasks.items()})

    def gates(self, features: Features) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected modalities [B,M,D], gate weights [B,M] (0 for missing) and presence [B,M]."""
        B, device = batch_size(features)
        dtype = next(self.parameters()).dtype
        zs, pres = [], []
        for m in self.mods:
            f = features.get(m)
            p = row_presence(f, B, device)
            if f is None or "pooled" not in f:
                z = torch.zeros(B, self.hparams["D"], dtype=dtype, device=device)
            else:
                x = clean_pooled(f["pooled"], p, dtype)
                if self.l2norm:
                    x = F.normalize(x, dim=-1)
                z = self.proj[m](x) * p[:, None]
            zs.append(z)
            pres.append(p)
        z = torch.stack(zs, 1)
        present = torch.stack(pres, 1)
        if self.gate is None:
            return z, present.to(dtype), present
        g = self.gate(torch.cat([z.flatten(1), present.to(dtype)], 1))
        if self.gate_kind == "softmax":
            g = g.masked_fill(~present, float("-inf"))
            # A row with nothing present would be all -inf: give it zero weights instead of NaN.
            w = torch.softmax(torch.where(present.any(1, keepdim=True), g, torch.zeros_like(g)), 1) * present
        else:
            w = torch.sigmoid(g) * present
        return z, w, present

    def forward(self, features: Features) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Logits per task plus `_gate` [B,M] (the modality weights, order = `self.mods`)."""
        z, w, present = self.gates(features)
        fused = (w[:, :, None] * z).sum(1)
        if self.gate_kind == "sigmoid":
            # Mean over present modalities, so one missing modality does not shrink the fused vector.
            fused = fused / present.sum(1, keepdim=True).clamp(min=1)
        out: dict[str, torch.Tensor] = {t: clf(fused) for t, clf in self.classifiers.items()}
        out["_gate"] = w
        return out
