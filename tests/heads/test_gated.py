"""The gated fusion head: shapes, gradients, gate weights, missing modalities, learning."""

from __future__ import annotations

import json

import pytest
import torch

from mmcache.errors import MMCacheError
from mmcache.heads import build_head
from mmcache.heads.gated import GatedHead

INPUTS = {"image": {"pooled": (12,), "tokens": (5, 12), "mask": (5,)}, "text": {"pooled": (8,)},
          "context": {"pooled": (6,)}}
TASKS = {"label": 3, "aux": 2}


def feats(b: int = 6, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[:, 3:] = False
    return {"image": {"pooled": torch.randn(b, 12, generator=g), "tokens": torch.randn(b, 5, 12, generator=g),
                      "mask": mask},
            "text": {"pooled": torch.randn(b, 8, generator=g)}, "context": {"pooled": torch.randn(b, 6, generator=g)}}


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_forward_backward(gate: str) -> None:
    torch.manual_seed(0)
    head = build_head("gated", INPUTS, TASKS, {"D": 16, "gate": gate})
    assert isinstance(head, GatedHead) and head.mods == ["image", "text", "context"]
    out = head(feats())
    assert out["label"].shape == (6, 3) and out["aux"].shape == (6, 2) and out["_gate"].shape == (6, 3)
    (out["label"].sum() + out["aux"].sum()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    w = out["_gate"]
    assert torch.all((w >= 0) & (w <= 1))
    if gate == "softmax":
        assert torch.allclose(w.sum(1), torch.ones(6))


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_missing_modality_renormalised(gate: str) -> None:
    torch.manual_seed(0)
    head = build_head("gated", INPUTS, TASKS, {"D": 16, "gate": gate}).eval()
    f = feats()
    out = head({"image": f["image"], "text": f["text"]})  # context absent for the whole batch
    assert torch.all(out["_gate"][:, 2] == 0) and torch.isfinite(out["label"]).all()
    if gate == "softmax":
        assert torch.allclose(out["_gate"][:, :2].sum(1), torch.ones(6))
    # Row-wise: row 0 lacks its text (NaN placeholder) and row 1 its image (no real token).
    f["text"]["pooled"][0] = float("nan")
    f["image"]["mask"][1] = False
    out = head(f)
    assert torch.isfinite(out["label"]).all()
    assert out["_gate"][0, 1] == 0 and out["_gate"][1, 0] == 0
    if gate == "softmax":
        assert torch.allclose(out["_gate"].sum(1), torch.ones(6))
    # Rows are independent: the other rows are what they are without the damaged ones.
    rest = {m: {k: v[2:] for k, v in d.items()} for m, d in f.items()}
    assert torch.allclose(head(rest)["label"], out["label"][2:], atol=1e-6)
    # Nothing at all present: finite output, zero weights.
    none = head({"text": {"pooled": torch.full((2, 8), float("nan"))}})
    assert torch.isfinite(none["label"]).all() and torch.all(none["_gate"] == 0)


def test_ignores_tokens_and_dropped_modalities() -> None:
    torch.manual_seed(0)
    head = build_head("gated", INPUTS, TASKS, {"D": 16, "modalities": ["image", "text"]}).eval()
    assert head.mods == ["image", "text"]
    f = feats()
    ref = head(f)["label"]
    f["image"]["tokens"] = torch.randn_like(f["image"]["tokens"])
    f["context"]["pooled"] = torch.randn_like(f["context"]["pooled"])
    assert torch.equal(head(f)["label"], ref)
    f["text"]["pooled"] = torch.randn_like(f["text"]["pooled"])
    assert not torch.allclose(head(f)["label"], ref)
    img_only = build_head("gated", INPUTS, TASKS, {"D": 16, "ablation": 2})
    assert img_only.mods == ["image"]


def test_bad_hparams() -> None:
    with pytest.raises(MMCacheError, match="gate"):
        build_head("gated", INPUTS, TASKS, {"gate": "tanh"})
    with pytest.raises(MMCacheError, match="unknown hyperparameters"):
        build_head("gated", INPUTS, TASKS, {"Dim": 3})
    with pytest.raises(MMCacheError, match="pooled"):
        build_head("gated", {"image": {"tokens": (3, 4)}}, TASKS)


def test_learns_a_task_needing_both_modalities() -> None:
    """label = sign(a + b) with a from the image and b from the text: only fusion reaches high accuracy."""
    torch.manual_seed(0)
    n = 600
    a, b = torch.randint(-1, 2, (n,)), torch.randint(-1, 2, (n,))
    y = torch.sign(a + b) + 1
    pi, pt = torch.randn(3, 12), torch.randn(3, 8)
    f = {"image": {"pooled": pi[a + 1] + 0.3 * torch.randn(n, 12)},
         "text": {"pooled": pt[b + 1] + 0.3 * torch.randn(n, 8)}}
    head = build_head("gated", {"image": {"pooled": (12,)}, "text": {"pooled": (8,)}}, {"label": 3},
                      {"D": 32, "dropout": 0.0, "gate": "softmax"})
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(head(f)["label"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = (head.eval()(f)["label"].argmax(1) == y).float().mean()
    assert acc > 0.95


def test_config_round_trip() -> None:
    torch.manual_seed(0)
    head = build_head("gated", INPUTS, TASKS, {"D": 16, "gate": "softmax", "modalities": ["image", "text"]}).eval()
    cfg = json.loads(json.dumps(head.config))
    again = build_head(cfg["name"], cfg["inputs"], cfg["tasks"], cfg["hparams"]).eval()
    again.load_state_dict(head.state_dict())
    assert torch.equal(again(feats())["label"], head(feats())["label"])
