"""The cross-attention head: shapes, gradients, masks (padding never matters), missing modalities."""

from __future__ import annotations

import json

import pytest
import torch

from mmcache.errors import MMCacheError
from mmcache.heads import build_head
from mmcache.heads.xattn import CrossAttentionHead, masked_attention, masked_mean

INPUTS = {"image": {"pooled": (12,), "tokens": (7, 10), "mask": (7,)},
          "text": {"pooled": (8,), "tokens": (6, 9), "mask": (6,)}}
TASKS = {"label": 3}
HP = {"D": 16, "heads": 2}


def feats(b: int = 5, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    mi = torch.arange(7)[None] < torch.tensor([7, 3, 1, 5, 2])[:b, None]
    mt = torch.arange(6)[None] < torch.tensor([2, 6, 4, 1, 3])[:b, None]
    return {"image": {"pooled": torch.randn(b, 12, generator=g), "tokens": torch.randn(b, 7, 10, generator=g),
                      "mask": mi},
            "text": {"pooled": torch.randn(b, 8, generator=g), "tokens": torch.randn(b, 6, 9, generator=g),
                     "mask": mt}}


def test_forward_backward_all_parameters_get_gradients() -> None:
    torch.manual_seed(0)
    head = build_head("xattn", INPUTS, {"label": 3, "aux": 4}, HP)
    assert isinstance(head, CrossAttentionHead)
    out = head(feats())
    assert out["label"].shape == (5, 3) and out["aux"].shape == (5, 4)
    (out["label"].sum() + out["aux"].pow(2).sum()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_padding_does_not_change_outputs() -> None:
    torch.manual_seed(0)
    head = build_head("xattn", INPUTS, TASKS, HP).eval()
    f = feats()
    ref = head(f)["label"]
    for m in ("image", "text"):
        pad = ~f[m]["mask"]
        f[m]["tokens"][pad] = torch.randn(int(pad.sum()), f[m]["tokens"].shape[-1]) * 100
    assert torch.equal(head(f)["label"], ref)
    for m in ("image", "text"):
        f[m]["tokens"][~f[m]["mask"]] = float("nan")
    assert torch.equal(head(f)["label"], ref)
    # A real token does matter.
    f["image"]["tokens"][0, 0] += 1.0
    assert not torch.allclose(head(f)["label"][0], ref[0])


def test_cross_attention_mixes_modalities() -> None:
    """Text tokens change the image's attended representation: the output depends on both sequences."""
    torch.manual_seed(0)
    head = build_head("xattn", INPUTS, TASKS, {**HP, "ffn": False}).eval()
    f = feats()
    v_ref, _ = head.pooled(f)
    f["text"]["tokens"] = torch.randn_like(f["text"]["tokens"])
    v, _ = head.pooled(f)
    assert not torch.allclose(v[:, 0], v_ref[:, 0])  # image vector moved because its keys (text) moved


def test_without_masks_and_pooled_fallback() -> None:
    torch.manual_seed(0)
    inputs = {"image": {"pooled": (12,), "tokens": (7, 10)}, "text": {"pooled": (8,)}, "context": {"pooled": (4,)}}
    head = build_head("xattn", inputs, TASKS, HP)
    f = feats()
    f = {"image": {"pooled": f["image"]["pooled"], "tokens": f["image"]["tokens"]},
         "text": {"pooled": f["text"]["pooled"]}, "context": {"pooled": torch.randn(5, 4)}}
    out = head(f)
    assert out["label"].shape == (5, 3) and torch.isfinite(out["label"]).all()
    out["label"].sum().backward()
    assert head.proj["text"][0].weight.shape == (16, 8)  # text became a 1-token sequence of its pooled vector
    assert head.proj["text"][0].weight.grad.abs().sum() > 0


def test_missing_modality_whole_batch_equals_masked_rows() -> None:
    torch.manual_seed(0)
    head = build_head("xattn", INPUTS, TASKS, HP).eval()
    f = feats()
    absent = head({"image": f["image"]})["label"]
    assert torch.isfinite(absent).all()
    f["text"]["mask"][:] = False
    assert torch.allclose(head(f)["label"], absent, atol=1e-6)
    # Nothing at all: finite.
    f["image"]["mask"][:] = False
    assert torch.isfinite(head(f)["label"]).all()


def test_one_and_three_modalities() -> None:
    torch.manual_seed(0)
    inputs = {**INPUTS, "context": {"pooled": (8,), "tokens": (4, 8), "mask": (4,)}}
    f = feats()
    f["context"] = {"pooled": torch.randn(5, 8), "tokens": torch.randn(5, 4, 8), "mask": torch.ones(5, 4, dtype=bool)}
    head = build_head("xattn", inputs, TASKS, HP)
    assert head(f)["label"].shape == (5, 3)
    single = build_head("xattn", INPUTS, TASKS, {**HP, "ablation": 1})
    assert single.mods == ["text"] and single(f)["label"].shape == (5, 3)
    with pytest.raises(MMCacheError, match="divisible"):
        build_head("xattn", INPUTS, TASKS, {"D": 10, "heads": 3})


def test_masked_helpers() -> None:
    x = torch.arange(12.0).view(1, 4, 3)
    mask = torch.tensor([[True, False, True, False]])
    assert torch.allclose(masked_mean(x, mask), (x[0, 0] + x[0, 2]) / 2)
    assert torch.equal(masked_mean(x, torch.zeros(1, 4, dtype=torch.bool)), torch.zeros(1, 3))
    attn = torch.nn.MultiheadAttention(3, 1, batch_first=True)
    out = masked_attention(attn, x, x, torch.zeros(1, 4, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(1, 4, 3))


def test_config_round_trip() -> None:
    torch.manual_seed(0)
    head = build_head("xattn", INPUTS, TASKS, {**HP, "ffn": False}).eval()
    cfg = json.loads(json.dumps(head.config))
    again = build_head(cfg["name"], cfg["inputs"], cfg["tasks"], cfg["hparams"]).eval()
    again.load_state_dict(head.state_dict())
    assert torch.equal(again(feats())["label"], head(feats())["label"])


def test_gradients_finite_with_missing_rows() -> None:
    torch.manual_seed(0)
    head = build_head("xattn", INPUTS, TASKS, HP).train()
    f = feats()
    f["image"]["mask"][0] = False
    f["text"]["mask"][1] = False
    head(f)["label"].sum().backward()
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
