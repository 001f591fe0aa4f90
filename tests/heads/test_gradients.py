"""Every parameter of every head can learn.

A parameter whose only path to the output goes through a softmax that cancels it (a bias added
to every logit of the softmax, scores over a single branch or key, a gate over one modality) or
through a normalisation that cancels it (a bias right before BatchNorm) gets a zero gradient in
exact arithmetic and float round-off in practice; heads must not build such parameters. Checked
in float64 on a random batch, for each head, its flags and several input layouts, against a
downstream loss with random weights on every output.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from mmcache.heads import HEADS, build_head

# Gradient norms of parameters that learn are 1e-4 and up here; inert ones are float64 round-off (~1e-16).
TOL = 1e-9

LAYOUTS: dict[str, dict[str, dict[str, tuple[int, ...]]]] = {
    "tokens3": {"image": {"pooled": (12,), "tokens": (7, 10), "mask": (7,)},
                "text": {"pooled": (8,), "tokens": (6, 9), "mask": (6,)},
                "context": {"pooled": (8,), "tokens": (5, 9), "mask": (5,)}},
    "tokens2": {"image": {"pooled": (12,), "tokens": (7, 10), "mask": (7,)},
                "text": {"pooled": (8,), "tokens": (6, 9), "mask": (6,)}},
    "pooled3": {"image": {"pooled": (12,)}, "text": {"pooled": (8,)}, "context": {"pooled": (8,)}},
    "text_only": {"text": {"pooled": (8,), "tokens": (6, 9), "mask": (6,)}},
}
TASKS = {"sentiment": 3, "aux": 2}


def batch(layout: dict[str, dict[str, tuple[int, ...]]], b: int = 6,
          missing: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Random float64 features with padding; with `missing`, a row whose text is missing (NaN pooled, no
    tokens) and a row whose image has no real token."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for m, spec in layout.items():
        f = {"pooled": torch.randn(b, *spec["pooled"], generator=g, dtype=torch.float64)}
        if "tokens" in spec:
            T = spec["tokens"][0]
            f["tokens"] = torch.randn(b, *spec["tokens"], generator=g, dtype=torch.float64)
            f["mask"] = torch.arange(T)[None] < torch.randint(1, T + 1, (b,), generator=g)[:, None]
        out[m] = f
    if missing and "text" in out:
        out["text"]["pooled"][1] = float("nan")  # missing text: the head's stand-in for the condition is used
        if "mask" in out["text"]:
            out["text"]["mask"][1] = False
    if missing and "image" in out and "mask" in out["image"]:
        out["image"]["mask"][2] = False
    return out


def inert_parameters(name: str, layout: str, hp: dict[str, Any]) -> list[str]:
    """Parameters whose gradient norm is at round-off level under a random downstream loss (train mode)."""
    torch.manual_seed(0)
    head = build_head(name, LAYOUTS[layout], TASKS, hp).double().train()
    out = head(batch(LAYOUTS[layout], missing=name != "linear"))  # the linear head reads pooled as it is
    g = torch.Generator().manual_seed(1)
    loss = sum((v * torch.randn(v.shape, generator=g, dtype=torch.float64)).sum() for v in out.values())
    assert isinstance(loss, torch.Tensor) and torch.isfinite(loss)
    loss.backward()
    bad = []
    for n, p in head.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n
        if p.grad is None or float(p.grad.norm()) <= TOL:
            bad.append(n)
    return bad


CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("linear", {"D": 0}), ("linear", {"D": 8, "dropout": 0.0}), ("linear", {"D": 8, "dropout": 0.0, "l2norm": True}),
    ("gated", {"D": 8, "dropout": 0.0, "gate": "sigmoid"}), ("gated", {"D": 8, "dropout": 0.0, "gate": "softmax"}),
    ("hateclipper", {"D": 4, "hidden": 8, "dropout": 0.0, "fusion_dropout": 0.0, "hidden_dropout": 0.0}),
    ("hateclipper", {"D": 4, "hidden": 8, "layers": 1, "fusion": "align", "dropout": 0.0, "fusion_dropout": 0.0,
                     "hidden_dropout": 0.0, "unimodal": True}),
    ("xattn", {"D": 8, "heads": 2, "dropout": 0.0}), ("xattn", {"D": 8, "heads": 2, "dropout": 0.0, "ffn": False}),
    ("scabg", {"hidden": 8, "out_dim": 8, "heads": 2, "branch_heads": 2, "queries": 2, "dropout": 0.0}),
    ("scabg-ref", {"hidden": 8, "out_dim": 8, "heads": 2, "branch_heads": 2, "queries": 2, "dropout": 0.0}),
    ("transformer", {"D": 8, "heads": 2, "layers": 2, "dropout": 0.0}),
    ("transformer", {"D": 8, "heads": 2, "layers": 1, "dropout": 0.0, "use_tokens": False}),
]


def test_every_head_is_covered() -> None:
    assert {n for n, _ in CONFIGS} == set(HEADS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name,hp", CONFIGS,
                         ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_every_parameter_learns(name: str, hp: dict[str, Any], layout: str) -> None:
    assert inert_parameters(name, layout, hp) == []


SCABG_FLAGS = {"calibrate": (True, False), "condition": (True, False), "bands": (3, 1), "band_queries": (True, False),
               "aggregate": (True, False), "cross_branch": (True, False), "compose": (True, False),
               "compose_mode": ("logits", "logprob")}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_scabg_parameter_learns_under_every_flag_combination(layout: str) -> None:
    base = next(dict(hp) for name, hp in CONFIGS if name == "scabg")
    failures = {}
    for values in itertools.product(*SCABG_FLAGS.values()):
        hp = {**base, **dict(zip(SCABG_FLAGS, values, strict=True))}
        if not hp["compose"] and hp["compose_mode"] == "logprob":
            continue  # the mode only applies to the composition
        bad = inert_parameters("scabg", layout, hp)
        if bad:
            failures[str({k: hp[k] for k in SCABG_FLAGS})] = bad
    assert failures == {}


# The reference variant's parts, each switched off in turn (one at a time: the product is too large to run).
SCABG_REF_FLAGS = {"branch_gates": False, "band_blocks": False, "agg_mlp": False, "branch_mlp": False,
                   "mix_token": False, "branch_pool": "score", "fuse_mlp": False, "kd_branches": "",
                   "adversarial": False, "aux_outputs": False, "bands": 1, "band_queries": False, "cross_branch": False,
                   "compose": False}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_scabg_reference_parameter_learns_with_each_part_off(layout: str) -> None:
    base = next(dict(hp) for name, hp in CONFIGS if name == "scabg-ref")
    failures = {}
    for key, value in SCABG_REF_FLAGS.items():
        bad = inert_parameters("scabg-ref", layout, {**base, key: value})
        if bad:
            failures[f"{key}={value}"] = bad
    assert failures == {}


def test_state_dicts_with_removed_parameters_load_with_the_same_outputs() -> None:
    """Checkpoints saved while those parameters existed still load; their values never mattered, except a
    branch bias before BatchNorm, which is folded into the running mean (exact in evaluation)."""
    g = torch.Generator().manual_seed(0)
    text = {"text": LAYOUTS["text_only"]["text"]}
    x = batch(text, missing=False)
    for name, hp, extra in (("gated", {"D": 8, "gate": "softmax"}, {"gate.0.weight": (8, 9), "gate.2.bias": (1,)}),
                            ("xattn", {"D": 8, "heads": 2}, {"attn.text.in_proj_weight": (24, 8)})):
        head = build_head(name, text, TASKS, hp).double().eval()
        ref = head(x)["sentiment"]
        old = {**head.state_dict(), **{k: torch.randn(s, generator=g) for k, s in extra.items()}}
        head.load_state_dict(old)
        assert torch.allclose(head(x)["sentiment"], ref)
    # linear: the old branch Linear(d, D) + BatchNorm1d(D), with a bias and running statistics.
    head = build_head("linear", LAYOUTS["pooled3"], TASKS, {"D": 8}).double().eval()
    x = batch(LAYOUTS["pooled3"], missing=False)
    old_branch = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.BatchNorm1d(8)).double().eval()
    with torch.no_grad():
        old_branch[1].running_mean.normal_(generator=g)
        old_branch[1].running_var.uniform_(0.5, 2.0, generator=g)
        old_branch[0].bias.normal_(generator=g)
    old = dict(head.state_dict())
    old.update({f"branches.image.{k}": v for k, v in old_branch.state_dict().items()})
    head.load_state_dict(old)
    torch.testing.assert_close(head.branches["image"][:2](x["image"]["pooled"]), old_branch(x["image"]["pooled"]))
