"""The SCABG head: every part and its flag, masks, missing modalities, the 3-way composition."""

from __future__ import annotations

import json

import pytest
import torch

from mmcache.errors import MMCacheError
from mmcache.heads import build_head
from mmcache.heads.scabg import SCABGHead, compose_three_way, default_branches

INPUTS = {"image": {"pooled": (12,), "tokens": (7, 10), "mask": (7,)},
          "text": {"pooled": (8,), "tokens": (6, 9), "mask": (6,)},
          "context": {"pooled": (8,), "tokens": (5, 9), "mask": (5,)}}
TASKS = {"sentiment": 3}
HP = {"hidden": 16, "out_dim": 8, "heads": 2, "branch_heads": 2, "queries": 3}
FLAGS_OFF = [{"calibrate": False}, {"condition": False}, {"bands": 1}, {"band_queries": False},
             {"aggregate": False}, {"cross_branch": False}, {"compose": False}, {"compose_mode": "logprob"}]


def feats(b: int = 5, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    lens = {"image": [7, 3, 1, 5, 2], "text": [2, 6, 4, 1, 3], "context": [5, 1, 2, 3, 4]}
    out = {}
    for m, spec in INPUTS.items():
        T, d = spec["tokens"]
        out[m] = {"pooled": torch.randn(b, spec["pooled"][0], generator=g),
                  "tokens": torch.randn(b, T, d, generator=g),
                  "mask": torch.arange(T)[None] < torch.tensor(lens[m][:b])[:, None]}
    return out


def make(**hp: object) -> SCABGHead:
    torch.manual_seed(0)
    head = build_head("scabg", INPUTS, TASKS, {**HP, **hp})
    assert isinstance(head, SCABGHead)
    return head


@pytest.mark.parametrize("off", [{}, *FLAGS_OFF], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "full")
def test_forward_backward_each_flag(off: dict[str, object]) -> None:
    head = make(**off)
    out = head(feats())
    assert list(out) == ["sentiment", "_coarse", "_fine"]
    assert out["sentiment"].shape == (5, 3) and out["_coarse"].shape == (5, 2) and out["_fine"].shape == (5, 2)
    (out["sentiment"].sum() + out["_coarse"].pow(2).sum() + out["_fine"].pow(2).sum()).backward()
    # Every parameter is reached (that each can learn, flag by flag, is test_gradients.py's check).
    for n, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    # Every row has its text here: the condition's stand-in gets exactly nothing (torch.where routes no gradient).
    if head.cond_default is not None:
        assert head.cond_default.grad is not None and not head.cond_default.grad.any()


def test_parameters_a_softmax_cancels_are_not_built() -> None:
    full = make()
    assert full.branch_score is not None and full.branch_score.bias is None  # shifts every branch score alike
    assert all(g.band_attn is not None and g.band_attn.k.bias is None for g in full.gates.values())
    two = build_head("scabg", {m: INPUTS[m] for m in ("image", "text")}, TASKS, HP)
    assert two.branch_pairs == [("image", "text")] and two.branch_score is None  # a softmax over one branch is 1
    pooled = build_head("scabg", {m: {"pooled": s["pooled"]} for m, s in INPUTS.items()}, TASKS, HP)
    attn = pooled.gates["image"].band_attn  # one key per row: the weights are 1 whatever the queries
    assert attn is not None and attn.single_key and not hasattr(attn, "queries") and not hasattr(attn, "k")
    assert make(bands=1).cond_default is None and make(condition=False, aggregate=False).cond_default is None
    assert build_head("scabg", {"text": INPUTS["text"]}, TASKS, HP).cond_default is None  # nothing to stand in for


def test_state_dicts_with_the_removed_parameters_still_load() -> None:
    """Checkpoints written when those parameters existed load, with the same outputs (they never mattered)."""
    f = feats()
    for hp, inputs in (({}, INPUTS), ({"bands": 1}, INPUTS), ({}, {m: {"pooled": s["pooled"]} for m, s in INPUTS.items()})):
        head = build_head("scabg", inputs, TASKS, {**HP, **hp}).eval()
        x = f if inputs is INPUTS else {m: {"pooled": f[m]["pooled"]} for m in f}
        ref = head(x)["sentiment"]
        old = dict(head.state_dict())
        g = torch.Generator().manual_seed(0)
        old["branch_score.bias"] = torch.randn(1, generator=g)
        old["cond_default"] = torch.randn(HP["hidden"], generator=g)
        H, Q = HP["hidden"], HP["queries"]
        for m in inputs:
            old[f"gates.{m}.band_attn.k.bias"] = torch.randn(H, generator=g)
            if "tokens" not in inputs[m]:  # one key per row: queries, q and k never mattered
                old.update({f"gates.{m}.band_attn.queries": torch.randn(3, Q, H, generator=g),
                            f"gates.{m}.band_attn.q.weight": torch.randn(H, H, generator=g),
                            f"gates.{m}.band_attn.q.bias": torch.randn(H, generator=g),
                            f"gates.{m}.band_attn.k.weight": torch.randn(H, H, generator=g)})
        again = build_head("scabg", inputs, TASKS, {**HP, **hp}).eval()
        again.load_state_dict(old)
        assert torch.allclose(again(x)["sentiment"], ref, atol=1e-6)
        with pytest.raises(RuntimeError, match="Unexpected"):  # anything else is still refused
            again.load_state_dict({**old, "fuse.9.weight": torch.zeros(1)})


def test_flags_remove_their_parts() -> None:
    full = make()
    g = full.gates["image"]
    assert g.self_attn is not None and g.W_c is not None and g.band_attn is not None and full.branch_attn is not None
    assert make(calibrate=False).gates["image"].self_attn is None
    assert make(condition=False).gates["image"].W_c is None
    assert make(band_queries=False).gates["image"].band_attn is None
    assert make(cross_branch=False).branch_attn is None
    assert full.gates["image"].W_g.out_features == 3
    one = make(bands=1).gates["image"]  # one band: no gate, so no calibration or condition either
    assert one.W_g is None and one.self_attn is None and one.W_c is None and make(bands=1).cond_proj is None
    assert make(condition=False, aggregate=False).cond_proj is None
    assert "sentiment" in make(compose=False).classifiers and "sentiment" not in full.classifiers
    assert sum(p.numel() for p in make(calibrate=False).parameters()) < sum(p.numel() for p in full.parameters())


def test_band_probabilities_sum_to_one() -> None:
    head = make(bands=4)
    probs = head.band_probabilities(feats())
    assert set(probs) == {"image", "text", "context"}
    for m, p in probs.items():
        assert p.shape == (5, INPUTS[m]["tokens"][0], 4)
        assert torch.all(p >= 0) and torch.allclose(p.sum(-1), torch.ones(p.shape[:2]), atol=1e-6)
    assert torch.all(make(bands=1).band_probabilities(feats())["text"] == 1.0)


def test_condition_vector_steers_the_gate() -> None:
    f = feats()
    g = feats(seed=1)
    for condition, moves in ((True, True), (False, False)):
        head = make(condition=condition).eval()
        p0 = head.band_probabilities(f)["image"]
        f2 = {**f, "text": {**f["text"], "pooled": g["text"]["pooled"]}}
        p1 = head.band_probabilities(f2)["image"]
        assert (not torch.allclose(p0, p1)) == moves


def test_aggregator_weights() -> None:
    head = make()
    f = torch.randn(4, 3, 16)
    c = torch.randn(4, 16)
    w = head.aggregators[0].weights(f, c)
    assert torch.allclose(w.sum(1), torch.ones(4))
    assert torch.allclose(w, torch.softmax((f * c[:, None]).sum(-1) / 4.0, -1))
    assert torch.allclose(make(aggregate=False).aggregators[0].weights(f, c), torch.full((4, 3), 1 / 3))


def test_padding_does_not_change_outputs() -> None:
    head = make().eval()
    f = feats()
    ref = head(f)
    for m in f:
        pad = ~f[m]["mask"]
        f[m]["tokens"][pad] = torch.randn(int(pad.sum()), f[m]["tokens"].shape[-1]) * 50
    out = head(f)
    for k in ref:
        assert torch.equal(out[k], ref[k]), k
    for m in f:
        f[m]["tokens"][~f[m]["mask"]] = float("nan")
    assert torch.equal(head(f)["sentiment"], ref["sentiment"])
    f["image"]["tokens"][0, 0] += 1.0  # a real token does matter
    assert not torch.allclose(head(f)["sentiment"][0], ref["sentiment"][0])


def test_missing_modalities() -> None:
    head = make().eval()
    f = feats()
    for keep in (["image", "text"], ["image"], ["text"], ["context"]):
        out = head({m: f[m] for m in keep})
        assert all(torch.isfinite(v).all() for v in out.values()), keep
    # A modality missing for the whole batch equals it masked out row by row.
    absent = head({m: f[m] for m in ("image", "text")})["sentiment"]
    f["context"]["mask"][:] = False
    assert torch.allclose(head(f)["sentiment"], absent, atol=1e-5)
    # Missing text also removes the condition: the learned default replaces it.
    c = head.condition_vector({"image": f["image"]})
    assert torch.equal(c, head.cond_default.expand(5, -1))
    f["text"]["pooled"][1] = float("nan")
    c = head.condition_vector(f)
    assert torch.equal(c[1], head.cond_default) and not torch.equal(c[0], head.cond_default)
    # Tokens-free stores: pooled as a one-token sequence.
    pooled_only = build_head("scabg", {m: {"pooled": s["pooled"]} for m, s in INPUTS.items()}, TASKS, HP)
    assert pooled_only({m: {"pooled": f[m]["pooled"]} for m in f})["sentiment"].shape == (5, 3)


def test_branches() -> None:
    assert default_branches(["text", "context", "image"]) == [("image", "text"), ("image", "context"),
                                                              ("text", "context")]
    assert default_branches(["image", "text"]) == [("image", "text")]
    assert default_branches(["text"]) == [("text", "text")]
    head = build_head("scabg", INPUTS, TASKS, {**HP, "branches": "image-text,text-context"})
    assert head.branch_pairs == [("image", "text"), ("text", "context")] and len(head.aggregators) == 2
    assert make().branch_pairs == [("image", "text"), ("image", "context"), ("text", "context")]
    with pytest.raises(MMCacheError, match="branch"):
        build_head("scabg", INPUTS, TASKS, {**HP, "branches": ["image-audio"]})


def test_three_way_composition_formula() -> None:
    coarse = torch.tensor([[0.5, 2.0], [1.0, -1.0]])  # [neutral, emotional]
    fine = torch.tensor([[3.0, -2.0], [0.0, 0.25]])  # [negative, positive]
    want = torch.tensor([[2.0 + 3.0, 0.5, 2.0 - 2.0], [-1.0 + 0.0, 1.0, -1.0 + 0.25]])
    assert torch.equal(compose_three_way(coarse, fine), want)
    # Label order positive, neutral, negative: classes (neg, neu, pos) = (2, 1, 0).
    assert torch.equal(compose_three_way(coarse, fine, [2, 1, 0]), want[:, [2, 1, 0]])
    # logprob mode is an exact factorisation: p(neg) = p(emo) * p(neg | emo).
    p = compose_three_way(coarse, fine, mode="logprob").softmax(-1)
    pc, pf = coarse.softmax(-1), fine.softmax(-1)
    assert torch.allclose(p, torch.stack([pc[:, 1] * pf[:, 0], pc[:, 0], pc[:, 1] * pf[:, 1]], 1), atol=1e-6)
    # The head's task output is that composition of its own coarse/fine outputs.
    head = make(classes=[1, 0, 2]).eval()
    out = head(feats())
    assert torch.allclose(out["sentiment"], compose_three_way(out["_coarse"], out["_fine"], [1, 0, 2]))
    plain = make(compose=False).eval()
    o2 = plain(feats())
    assert not torch.allclose(o2["sentiment"], compose_three_way(o2["_coarse"], o2["_fine"]))


def test_validation_and_multitask() -> None:
    with pytest.raises(MMCacheError, match="3-way"):
        build_head("scabg", INPUTS, {"emotion": 7}, HP)
    with pytest.raises(MMCacheError, match="permutation"):
        build_head("scabg", INPUTS, TASKS, {**HP, "classes": [0, 1, 1]})
    with pytest.raises(MMCacheError, match="unknown hyperparameters"):
        build_head("scabg", INPUTS, TASKS, {**HP, "band": 2})
    with pytest.raises(MMCacheError, match="task"):
        build_head("scabg", INPUTS, TASKS, {**HP, "task": "nope"})
    # MELD-style: emotion (7) first, sentiment (3) composed.
    head = build_head("scabg", INPUTS, {"emotion": 7, "sentiment": 3}, {**HP, "task": "sentiment"})
    out = head(feats())
    assert out["emotion"].shape == (5, 7) and out["sentiment"].shape == (5, 3)
    assert build_head("scabg", INPUTS, {"emotion": 7}, {**HP, "compose": False})(feats())["emotion"].shape == (5, 7)
    # `D` (the trainer's --D) sets the hidden size.
    assert build_head("scabg", INPUTS, TASKS, {**HP, "D": 32}).hparams["hidden"] == 32


def test_learns_with_scabg_loss() -> None:
    """A tiny token task (label = sign of image score + text score, one informative token each) is learned."""
    from mmcache.heads.losses import build_criterion

    torch.manual_seed(0)
    n, T = 384, 4
    a, b = torch.randint(-1, 2, (n,)), torch.randint(-1, 2, (n,))
    y = torch.sign(a + b) + 1
    pi, pt = torch.randn(3, 10) * 2, torch.randn(3, 9) * 2
    ti, tt = torch.randn(n, T, 10), torch.randn(n, T, 9)
    pos_i, pos_t = torch.randint(0, T, (n,)), torch.randint(0, T, (n,))
    ti[torch.arange(n), pos_i] = pi[a + 1]
    tt[torch.arange(n), pos_t] = pt[b + 1]
    ones = torch.ones(n, T, dtype=torch.bool)
    f = {"image": {"pooled": ti.mean(1), "tokens": ti, "mask": ones},
         "text": {"pooled": torch.randn(n, 8), "tokens": tt, "mask": ones}}
    inputs = {"image": {"pooled": (10,), "tokens": (T, 10), "mask": (T,)},
              "text": {"pooled": (8,), "tokens": (T, 9), "mask": (T,)}}
    head = build_head("scabg", inputs, TASKS, {**HP, "hidden": 32, "dropout": 0.0})
    crit = build_criterion("scabg", TASKS)
    opt = torch.optim.Adam([*head.parameters(), *crit.parameters()], lr=3e-3)
    for _ in range(8):
        for s in range(0, n, 64):
            sl = slice(s, s + 64)
            loss, _ = crit(head({m: {k: v[sl] for k, v in d.items()} for m, d in f.items()}), {"sentiment": y[sl]})
            opt.zero_grad()
            loss.backward()
            opt.step()
    acc = (head.eval()(f)["sentiment"].argmax(1) == y).float().mean()
    assert acc > 0.8
    assert torch.any(crit.aux_log_vars.detach() != 0)


def test_config_round_trip() -> None:
    """head.config (written as head.json by the trainer) rebuilds the same head: same state keys, same outputs."""
    head = make(bands=2, classes=[2, 1, 0], branches=["image-text", "text-context"]).eval()
    cfg = json.loads(json.dumps(head.config))
    again = build_head(cfg["name"], cfg["inputs"], cfg["tasks"], cfg["hparams"]).eval()
    again.load_state_dict(head.state_dict())
    f = feats()
    assert torch.equal(again(f)["sentiment"], head(f)["sentiment"])


def test_gradients_finite_with_missing_rows_and_modalities() -> None:
    """Fully padded rows and absent modalities must not turn gradients into NaN (softmax over no keys)."""
    head = make().train()
    f = feats()
    f["image"]["mask"][0] = False
    f["text"]["mask"][1] = False
    f["text"]["pooled"][2] = float("nan")
    del f["context"]
    out = head(f)
    (out["sentiment"].sum() + out["_coarse"].sum()).backward()
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert head.gates["image"].proj[0].weight.grad.abs().sum() > 0
