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


# --- the reference code's variant -------------------------------------------------------------------------

REF_OFF = [{"branch_gates": False}, {"band_blocks": False}, {"agg_mlp": False}, {"branch_mlp": False},
           {"mix_token": False}, {"branch_pool": "score"}, {"fuse_mlp": False}, {"kd_branches": ""},
           {"adversarial": False}, {"aux_outputs": False}]


def make_ref(**hp: object) -> SCABGHead:
    torch.manual_seed(0)
    head = build_head("scabg-ref", INPUTS, TASKS, {**HP, **hp})
    assert isinstance(head, SCABGHead)
    return head


def test_reference_variant_builds_its_parts() -> None:
    ref = make_ref()
    same = make(variant="reference")
    assert ref.hparams == {**same.hparams} and ref.state_dict().keys() == same.state_dict().keys()
    assert not hasattr(ref, "gates") and len(ref.branch_gates) == 3  # a gate pair per branch
    gx = ref.branch_gates[0]["x"]
    assert gx.proj is None and set(ref.projs) == {"image", "text", "context"}  # one projection per modality
    assert gx.band_attn.wq.shape == (3, 16, 16) and gx.band_attn.queries.shape == (3, 3, 16)  # per band
    assert isinstance(ref.aggregators[0].out[-1], torch.nn.Linear)  # MLP output
    assert ref.branch_mlps is not None and ref.mix_logit is not None and ref.pool_logits is not None
    assert ref.branch_score is None
    assert float(torch.sigmoid(ref.mix_logit.detach())) == pytest.approx(torch.sigmoid(torch.tensor(0.7)).item())
    # KD heads on text-context and image-context (the reference's NLI and CLIP teachers), 2-way.
    assert [ref.branch_name(i) for i in ref.kd_index] == ["text-context", "image-context"]
    assert len(ref.adv_heads) == 3
    # Explicit flags win over the variant; the default variant is today's head.
    assert make_ref(mix_token=False).mix_logit is None
    assert make().hparams["branch_gates"] is False and make().kd_heads is None


def test_reference_forward_backward_with_masks_and_missing_modalities() -> None:
    head = make_ref().train()
    f = feats()
    f["image"]["mask"][0] = False
    f["text"]["pooled"][2] = float("nan")
    f["text"]["mask"][2] = False
    out = head(f)
    assert list(out) == ["sentiment", "_coarse", "_fine", "_kd", "_adv", "_branches", "_branch_mask", "_band_w"]
    assert out["_kd"].shape == (5, 2, 2) and out["_adv"].shape == (5, 3, 3)
    assert out["_branches"].shape == (5, 3, 8) and out["_band_w"].shape == (5, 3, 3)
    assert torch.allclose(out["_band_w"].sum(-1), torch.ones(5, 3), atol=1e-6)
    sum(v.float().pow(2).sum() for v in out.values()).backward()
    for n, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    # An absent modality (the context store not loaded): a branch counts where its other side is present.
    del f["context"]
    out = head(f)
    image_there = torch.tensor([0.0, 1, 1, 1, 1])  # row 0 has no image token
    text_there = torch.tensor([1.0, 1, 0, 1, 1])  # row 2 has no text
    assert torch.equal(out["_branch_mask"], torch.stack([torch.maximum(image_there, text_there), image_there,
                                                         text_there], 1))
    assert torch.isfinite(out["sentiment"]).all()


def test_reference_padding_does_not_change_outputs() -> None:
    head = make_ref().eval()
    f = feats()
    g = {m: {k: v.clone() for k, v in d.items()} for m, d in f.items()}
    for m in g:
        g[m]["tokens"][~g[m]["mask"]] = 1e3  # garbage in the padding
    a, b = head(f), head(g)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("off", REF_OFF, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_reference_each_part_off_builds_and_runs(off: dict[str, object]) -> None:
    head = make_ref(**off)
    out = head(feats())
    assert out["sentiment"].shape == (5, 3)
    sum(v.float().pow(2).sum() for v in out.values()).backward()
    assert all(p.grad is not None for p in head.parameters())
    if "aux_outputs" in off:  # outputs only, no parameters
        assert not {"_branches", "_branch_mask", "_band_w"} & set(out)
    elif "branch_pool" not in off:  # per-row scores replace the static weights; every other part is removed
        assert sum(p.numel() for p in head.parameters()) < sum(p.numel() for p in make_ref().parameters())


def test_gradient_reversal_flips_the_branch_gradient() -> None:
    """The adversarial heads' loss pushes the branch vectors the other way, scaled by grl."""
    f = feats()
    grads = {}
    for grl in (0.0, 0.5, 1.0):
        head = make_ref(grl=grl, dropout=0.0).train()
        v = head.branch_vectors(f)["branches"]
        v.retain_grad()
        z, tokens = head._fuse(v, head.branch_vectors(f)["mask"])
        from mmcache.heads.scabg import grad_reverse
        adv = head.adv_heads[0](grad_reverse(tokens[:, 0], grl))
        adv.sum().backward()
        grads[grl] = v.grad[:, 0].clone()
    assert torch.equal(grads[0.0], torch.zeros_like(grads[0.0]))
    torch.testing.assert_close(grads[1.0], 2 * grads[0.5])
    head = make_ref(grl=1.0, dropout=0.0).train()
    v = head.branch_vectors(f)["branches"]
    v.retain_grad()
    head.adv_heads[0](head._fuse(v, head.branch_vectors(f)["mask"])[1][:, 0]).sum().backward()
    torch.testing.assert_close(v.grad[:, 0], -grads[1.0])


def test_reference_validation_errors() -> None:
    for hp, msg in (({"variant": "paper"}, "variant"), ({"branch_pool": "mean"}, "branch_pool"),
                    ({"kd_branches": "image-audio"}, "kd_branches"), ({"kd_classes": -1}, "kd_classes"),
                    ({"mix_token": "yes"}, "mix_token")):
        with pytest.raises(MMCacheError, match=msg):
            make_ref(**hp)
    # The variant without a context store: KD heads fall back to the first branch.
    two = {m: INPUTS[m] for m in ("image", "text")}
    head = build_head("scabg-ref", two, TASKS, HP)
    assert head.kd_index == [0] and head.mix_logit is None and head.pool_logits is None


def test_reference_config_round_trip() -> None:
    head = make_ref(kd_branches="image-text,text-context").eval()
    cfg = json.loads(json.dumps(head.config))
    again = build_head(cfg["name"], cfg["inputs"], cfg["tasks"], cfg["hparams"]).eval()
    again.load_state_dict(head.state_dict())
    f = feats()
    assert torch.equal(again(f)["_kd"], head(f)["_kd"])


def test_reference_recipe_trains_on_a_toy_cache_with_two_teachers(make_cache) -> None:  # type: ignore[no-untyped-def]
    """scabg-ref + the reference loss recipe, two teachers (--teacher oracle,second), step-wise KD warm-up:
    trains end to end through the trainer and beats chance."""
    import numpy as np

    from mmcache.cache.store import FeatureStore, store_path
    from mmcache.heads.data import load_cached
    from mmcache.heads.train import TrainConfig, train

    cache = make_cache(teacher=True, n=300)
    ids = [f"r{i:04d}" for i in range(300)]
    with FeatureStore(store_path(cache, "toy", "teacher", "second"), {"preset": "second"}, "toy", capacity=300) as st:
        st.write(ids, {"logits": np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32)})
    data = load_cached("toy", {"image": "feat", "text": "feat"}, cache, teacher="oracle,second")
    assert data.teacher is not None and data.teacher.shape == (300, 2, 3)
    assert torch.equal(data.teacher[:, 0].argmax(1), data.targets["label"])
    cfg = TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(cache),
                      runs_dir=str(cache.parent / "runs"), epochs=12, batch_size=32, lr=3e-3, quiet=True, save=False,
                      head="scabg-ref", head_hparams={"hidden": 16, "out_dim": 16, "heads": 2, "branch_heads": 2,
                                                      "queries": 2, "dropout": 0.0,
                                                      "kd_branches": "image-text,image-text"},
                      loss="scabg", loss_options={"variant": "reference", "kd_warmup": 20, "adv_warmup": 20,
                                                  "nce_warmup": 20, "band_warmup": 20},
                      teacher="oracle,second", select_metric="macro_f1")
    r = train(cfg)
    assert r.metrics["test"]["label"]["accuracy"] > 0.6  # chance is about 1/3


def test_reference_ablation_rows() -> None:
    from mmcache.heads.sweep import SCABG_ABLATION, configs_from

    default = configs_from(None, True)
    assert [n for n, _ in default] == [n for n, _ in SCABG_ABLATION] and default[0][1]["head"] == "scabg"
    ref = dict(configs_from(None, True, reference=True))
    assert ref["reference"] == {"head": "scabg-ref", "loss": "scabg", "loss.variant": "reference"}
    assert ref["no-adversarial"]["hp.adversarial"] is False and ref["no-adversarial"]["loss.adv_weight"] == 0.0
    assert ref["no-infonce"]["loss.nce_weight"] == 0.0 and ref["one-band"]["hp.bands"] == 1
    # Every row builds: its head flags are the head's and its loss options the loss's.
    from mmcache.heads.losses import build_criterion

    for ov in ref.values():
        hp = {k[3:]: v for k, v in ov.items() if k.startswith("hp.")}
        build_head(ov["head"], INPUTS, TASKS, {**HP, **hp})
        build_criterion("scabg", TASKS, **{k[5:]: v for k, v in ov.items() if k.startswith("loss.")})
