"""Criteria: focal vs CE, class-balanced alpha, KD, uncertainty weighting, the SCABG coarse/fine loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmcache.errors import MMCacheError
from mmcache.heads.losses import (
    CRITERIA,
    FocalCriterion,
    SCABGCriterion,
    build_criterion,
    class_balanced_alpha,
    focal_loss,
    kd_loss,
)


def _batch(n: int = 32, c: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 2, torch.randint(0, c, (n,), generator=g)


def test_registry_has_all_losses() -> None:
    assert {"ce", "focal", "scabg"} <= set(CRITERIA)
    with pytest.raises(MMCacheError, match="unknown loss"):
        build_criterion("nope", {"y": 3})
    with pytest.raises(MMCacheError, match="unknown options"):
        build_criterion("focal", {"y": 3}, gama=2)


@pytest.mark.parametrize("loss", ["ce", "focal", "scabg"])
def test_out_of_range_loss_options_are_refused(loss: str) -> None:
    """A value the loss would silently cut or misuse is one line naming it (kd_warmup=1.5 was truncated to 1)."""
    for opts, message in (({"kd_warmup": 1.5}, "kd_warmup=1.5 must be a whole number"),
                          ({"kd_warmup": -1}, "kd_warmup=-1 must be a whole number"),
                          ({"kd_T": 0}, "kd_T=0 > 0"), ({"kd_lambda": -0.1}, "kd_lambda=-0.1 must be >= 0"),
                          ({"label_smoothing": 1.0}, r"label_smoothing=1.0 must be in \[0, 1\)")):
        with pytest.raises(MMCacheError, match=message):
            build_criterion(loss, {"y": 3}, **opts)
    assert build_criterion(loss, {"y": 3}, kd_warmup=4.0).kd_warmup == 4  # a whole number written as a float


def test_focal_gamma0_uniform_alpha_equals_ce() -> None:
    logits, y = _batch()
    y[:5] = -100
    ce = F.cross_entropy(logits, y, ignore_index=-100)
    assert torch.allclose(focal_loss(logits, y, gamma=0.0), ce, atol=1e-6)
    # Through the criteria: uniform class counts make the class-balanced alpha uniform (all ones).
    counts = {"y": torch.tensor([50, 50, 50])}
    foc = build_criterion("focal", {"y": 3}, class_counts=counts, gamma=0.0)
    ce_crit = build_criterion("ce", {"y": 3}, class_counts=counts)
    lf, pf = foc({"y": logits}, {"y": y})
    lc, pc = ce_crit({"y": logits}, {"y": y})
    assert torch.allclose(lf, lc, atol=1e-6) and torch.allclose(lf, ce, atol=1e-6)
    assert set(pf) == {"focal_y"} and set(pc) == {"ce_y"}


def test_focal_formula_and_easy_examples_downweighted() -> None:
    logits, y = _batch()
    p = logits.softmax(-1)[torch.arange(len(y)), y]
    alpha = torch.tensor([0.5, 1.0, 1.5])
    want = (-alpha[y] * (1 - p) ** 2 * p.log()).mean()
    assert torch.allclose(focal_loss(logits, y, 2.0, alpha), want, atol=1e-6)
    assert focal_loss(logits, y, 2.0) < focal_loss(logits, y, 0.0)


def test_class_balanced_alpha() -> None:
    counts = torch.tensor([1000, 100, 10])
    a = class_balanced_alpha(counts, 0.999)
    raw = torch.tensor([(1 - 0.999) / (1 - 0.999 ** n) for n in (1000, 100, 10)])
    assert torch.allclose(a, raw / raw.sum() * 3, atol=1e-5)
    assert a[2] > a[1] > a[0] and math.isclose(float(a.sum()), 3.0, rel_tol=1e-5)
    crit = build_criterion("focal", {"y": 3}, class_counts={"y": counts})
    assert torch.allclose(crit.alpha_y, a)
    # alpha="none": no weights at all.
    assert not hasattr(build_criterion("focal", {"y": 3}, class_counts={"y": counts}, alpha="none"), "alpha_y")


def test_unlabelled_batch_gives_zero_not_nan() -> None:
    logits = torch.randn(4, 3, requires_grad=True)
    y = torch.full((4,), -100)
    for name in ("ce", "focal"):
        loss, _ = build_criterion(name, {"y": 3})({"y": logits}, {"y": y})
        assert float(loss.detach()) == 0.0
        loss.backward()
        assert torch.isfinite(logits.grad).all()


def test_kd_zero_when_student_equals_teacher() -> None:
    logits, _ = _batch()
    assert abs(float(kd_loss(logits, logits.clone(), 3.0))) < 1e-6
    other = torch.randn_like(logits)
    T = 3.0
    want = (T * T) * (F.softmax(other / T, -1) * (F.log_softmax(other / T, -1) - F.log_softmax(logits / T, -1))
                      ).sum(-1).mean()
    assert torch.allclose(kd_loss(logits, other, T), want, atol=1e-5)
    assert float(want) > 0


def test_kd_warmup_skip_and_nan_rows() -> None:
    logits, y = _batch()
    teacher = torch.randn_like(logits)
    crit = build_criterion("ce", {"y": 3}, kd_lambda=0.5, kd_T=2.0, kd_warmup=4)
    base, parts0 = crit({"y": logits}, {"y": y}, None, 2)
    assert "kd" not in parts0  # no teacher: no KD term
    kd = float(kd_loss(logits, teacher, 2.0))
    for epoch, frac in ((0, 0.0), (2, 0.5), (4, 1.0), (9, 1.0)):
        assert crit.kd_weight(epoch) == pytest.approx(0.5 * frac)
        loss, parts = crit({"y": logits}, {"y": y}, teacher, epoch)
        assert float(loss) == pytest.approx(float(base) + 0.5 * frac * kd, rel=1e-5)
    # Rows whose teacher is missing (NaN) are left out of the KD term.
    t2 = teacher.clone()
    t2[:4] = float("nan")
    assert float(kd_loss(logits, t2, 2.0)) == pytest.approx(float(kd_loss(logits[4:], teacher[4:], 2.0)), rel=1e-5)
    with pytest.raises(MMCacheError, match="teacher logits"):
        kd_loss(logits, teacher[:, :2], 2.0)
    # KD on the focal criterion too ("usable with any criterion").
    foc = build_criterion("focal", {"y": 3}, kd_lambda=0.02)
    lf, pf = foc({"y": logits}, {"y": y}, teacher, 0)
    lf0, _ = foc({"y": logits}, {"y": y}, None, 0)
    assert float(lf - lf0) == pytest.approx(0.02 * float(kd_loss(logits, teacher, 3.0)), rel=1e-4)


def test_uncertainty_weights_learn() -> None:
    """Kendall & Gal: s_t moves toward log L_t; the task with the larger loss gets the larger variance."""
    torch.manual_seed(0)
    tasks = {"easy": 2, "hard": 3}
    crit = build_criterion("ce", tasks, uncertainty=True)
    assert [p.shape for p in crit.parameters()] == [torch.Size([2])]
    x = torch.randn(256, 8)
    targets = {"easy": (x[:, 0] > 0).long(), "hard": torch.randint(0, 3, (256,))}  # hard: pure noise
    model = torch.nn.ModuleDict({t: torch.nn.Linear(8, c) for t, c in tasks.items()})
    opt = torch.optim.Adam([*model.parameters(), *crit.parameters()], lr=0.05)
    for _ in range(150):
        loss, parts = crit({t: m(x) for t, m in model.items()}, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    s_easy, s_hard = crit.log_vars.tolist()
    assert s_hard > s_easy + 1.0
    assert s_hard == pytest.approx(math.log(parts["ce_hard"]), abs=0.3)
    assert parts["logvar_easy"] == pytest.approx(s_easy, abs=0.1)


def test_scabg_aux_targets_and_class_order() -> None:
    crit = build_criterion("scabg", {"sent": 3})
    y = torch.tensor([0, 1, 2, -100])
    yc, yf = crit.aux_targets(y)
    assert yc.tolist() == [1, 0, 1, -100] and yf.tolist() == [0, -100, 1, -100]
    # Label order positive, negative, neutral: classes = [negative, neutral, positive] indices = [1, 2, 0].
    crit2 = build_criterion("scabg", {"sent": 3}, classes=[1, 2, 0])
    yc, yf = crit2.aux_targets(torch.tensor([0, 1, 2]))
    assert yc.tolist() == [1, 1, 0] and yf.tolist() == [1, 0, -100]
    with pytest.raises(MMCacheError, match="permutation"):
        build_criterion("scabg", {"sent": 3}, classes=[0, 0, 1])
    with pytest.raises(MMCacheError, match="3-way"):
        build_criterion("scabg", {"emo": 7})


def test_scabg_fine_loss_ignores_neutral_rows() -> None:
    crit = build_criterion("scabg", {"sent": 3}, aux_uncertainty=False)
    logits, y = _batch(16)
    y[:6] = 1  # neutral rows
    fine = torch.randn(16, 2, requires_grad=True)
    out = {"sent": logits, "_coarse": torch.randn(16, 2), "_fine": fine}
    loss, parts = crit(out, {"sent": y})
    loss.backward()
    assert torch.all(fine.grad[:6] == 0) and torch.any(fine.grad[6:] != 0)
    changed = fine.detach().clone()
    changed[:6] += 100.0
    loss2, _ = crit({**out, "_fine": changed}, {"sent": y})
    assert float(loss2) == pytest.approx(float(loss.detach()), rel=1e-6)
    emo = y != 1
    want_fine = float(F.cross_entropy(fine.detach()[emo], (y[emo] == 2).long()))
    assert parts["fine"] == pytest.approx(want_fine, rel=1e-5)
    want = float(F.cross_entropy(logits, y)) + parts["coarse"] + parts["fine"]
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)


def test_scabg_uncertainty_formula_and_learning() -> None:
    torch.manual_seed(0)
    crit = build_criterion("scabg", {"sent": 3})
    assert isinstance(crit, SCABGCriterion) and crit.aux_log_vars is not None
    logits, y = _batch(64)
    coarse, fine = torch.randn(64, 2), torch.randn(64, 2)
    with torch.no_grad():
        crit.aux_log_vars.copy_(torch.tensor([0.3, -0.4]))
    loss, parts = crit({"sent": logits, "_coarse": coarse, "_fine": fine}, {"sent": y})
    s1, s2 = 0.3, -0.4
    want = (float(F.cross_entropy(logits, y)) + 0.5 * math.exp(-s1) * parts["coarse"] + 0.5 * s1
            + 0.5 * math.exp(-s2) * parts["fine"] + 0.5 * s2)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    # The log-variances are parameters and learn: gradient steps move them toward log L.
    with torch.no_grad():
        crit.aux_log_vars.zero_()
    opt = torch.optim.SGD(crit.parameters(), lr=0.5)
    for _ in range(50):
        loss, parts = crit({"sent": logits, "_coarse": coarse, "_fine": fine}, {"sent": y})
        opt.zero_grad()
        loss.backward()
        opt.step()
    s = crit.aux_log_vars.detach()
    assert s.tolist() == pytest.approx([math.log(parts["coarse"]), math.log(parts["fine"])], abs=0.05)
    with pytest.raises(MMCacheError, match="_coarse"):
        crit({"sent": logits}, {"sent": y})
    # In eval mode (validation loss on task logits only) the aux terms are left out instead.
    main, parts = crit.eval()({"sent": logits}, {"sent": y})
    assert float(main) == pytest.approx(float(F.cross_entropy(logits, y))) and "coarse" not in parts


def test_scabg_focal_option_and_multitask() -> None:
    logits, y = _batch(32)
    coarse, fine = torch.randn(32, 2), torch.randn(32, 2)
    counts = {"sent": torch.tensor([10, 50, 40]), "emo": torch.tensor([5] * 7)}
    tasks = {"sent": 3, "emo": 7}
    emo_logits, emo_y = torch.randn(32, 7), torch.randint(0, 7, (32,))
    out = {"sent": logits, "emo": emo_logits, "_coarse": coarse, "_fine": fine}
    crit = build_criterion("scabg", tasks, class_counts=counts, focal=True, aux_uncertainty=False)
    loss, parts = crit(out, {"sent": y, "emo": emo_y})
    assert isinstance(crit, FocalCriterion)
    want = (float(focal_loss(logits, y, 2.0, class_balanced_alpha(counts["sent"])))
            + float(focal_loss(emo_logits, emo_y, 2.0, class_balanced_alpha(counts["emo"])))
            + parts["coarse"] + parts["fine"])
    assert float(loss) == pytest.approx(want, rel=1e-5)
    with pytest.raises(MMCacheError, match="label_smoothing"):
        build_criterion("scabg", {"sent": 3}, focal=True, label_smoothing=0.1)


def test_ce_balanced_weights_plain_cross_entropy() -> None:
    counts = {"t": torch.tensor([100, 10, 1])}
    logits, y = _batch()
    crit = build_criterion("ce", {"t": 3}, class_counts=counts, ce_balanced=True, beta=0.99)
    w = class_balanced_alpha(counts["t"], 0.99)
    loss, _ = crit({"t": logits}, {"t": y})
    torch.testing.assert_close(loss, F.cross_entropy(logits, y, weight=w))
    # The scabg loss's cross-entropy path takes it too (the reference weights plain CE as well as focal).
    sc = build_criterion("scabg", {"t": 3}, class_counts=counts, ce_balanced=True, beta=0.99, aux_uncertainty=False,
                         aux_weight=0.0)
    torch.testing.assert_close(sc({"t": logits, "_coarse": logits[:, :2], "_fine": logits[:, 1:]}, {"t": y})[0],
                               F.cross_entropy(logits, y, weight=w))
    with pytest.raises(MMCacheError, match="beta"):
        build_criterion("ce", {"t": 3}, ce_balanced=True, beta=1.0)


def test_kd_warmup_per_step() -> None:
    crit = build_criterion("ce", {"t": 3}, kd_lambda=0.1, kd_warmup=100, kd_warmup_unit="step")
    assert crit.kd_weight(0, step=25) == pytest.approx(0.025) and crit.kd_weight(3, step=400) == pytest.approx(0.1)
    logits, y = _batch()
    teacher = torch.randn_like(logits)
    _, parts = crit({"t": logits}, {"t": y}, teacher, 0, step=50)
    assert parts["kd_weight"] == pytest.approx(0.05)
    crit.eval()  # evaluation calls pass no step: the last training step's weight
    _, parts = crit({"t": logits}, {"t": y}, teacher, 0)
    assert parts["kd_weight"] == pytest.approx(0.05)
    fresh = build_criterion("ce", {"t": 3}, kd_warmup=10, kd_warmup_unit="step")
    with pytest.raises(MMCacheError, match="kd_warmup_unit=epoch"):
        fresh({"t": logits}, {"t": y}, teacher, 1)  # a trainer that passes epochs only
    with pytest.raises(MMCacheError, match="kd_warmup_unit"):
        build_criterion("ce", {"t": 3}, kd_warmup_unit="batch")
    # Per epoch, as before.
    assert build_criterion("ce", {"t": 3}, kd_lambda=0.1, kd_warmup=4).kd_weight(1) == pytest.approx(0.025)


def test_two_teachers_through_auxiliary_kd_heads() -> None:
    logits, y = _batch(n=16)
    g = torch.Generator().manual_seed(3)
    teachers = torch.randn(16, 2, 3, generator=g)
    kd_heads = torch.randn(16, 2, 2, generator=g)
    crit = build_criterion("scabg", {"t": 3}, kd_lambda=1.0, classes=[0, 1, 2])
    out = {"t": logits, "_coarse": logits[:, :2], "_fine": logits[:, 1:], "_kd": kd_heads}
    base, _ = crit({k: v for k, v in out.items() if k != "_kd"}, {"t": y})
    loss, parts = crit(out, {"t": y}, teachers)
    # A 3-way teacher [neg, neu, pos] becomes [neutral, emotional] for a 2-way head; the two KD terms add up.
    coarse = [torch.stack([t[:, 1], torch.logsumexp(t[:, [0, 2]], 1)], 1) for t in teachers.unbind(1)]
    want = sum(kd_loss(kd_heads[:, i], coarse[i], 3.0) for i in range(2))
    torch.testing.assert_close(loss - base, want)
    assert parts["kd"] == pytest.approx(float(want))
    with pytest.raises(MMCacheError, match="--teacher nli,clip"):
        crit(out, {"t": y}, teachers[:, :1])
    # Without KD heads, each teacher is distilled into the task logits and the terms are summed.
    plain = build_criterion("ce", {"t": 3}, kd_lambda=1.0)
    l2, _ = plain({"t": logits}, {"t": y}, teachers)
    l0, _ = plain({"t": logits}, {"t": y})
    torch.testing.assert_close(l2 - l0, kd_loss(logits, teachers[:, 0]) + kd_loss(logits, teachers[:, 1]))


def test_scabg_reference_terms() -> None:
    from mmcache.heads.losses import info_nce

    logits, y = _batch(n=8)
    g = torch.Generator().manual_seed(4)
    branches, band_w = torch.randn(8, 3, 5, generator=g), torch.softmax(torch.randn(8, 3, 4, generator=g), -1)
    adv = torch.randn(8, 3, 3, generator=g)
    mask = torch.ones(8, 3)
    mask[0, 2] = 0.0  # row 0 lacks branch 2: it drops out of the pairs with branch 2
    out = {"t": logits, "_coarse": logits[:, :2], "_fine": logits[:, 1:], "_adv": adv, "_branches": branches,
           "_branch_mask": mask, "_band_w": band_w}
    kw = {"aux_uncertainty": False, "aux_weight": 0.0}
    base, _ = build_criterion("scabg", {"t": 3}, **kw)(out, {"t": y})
    crit = build_criterion("scabg", {"t": 3}, adv_weight=0.5, nce_weight=0.25, band_weight=2.0, nce_T=0.1, **kw)
    loss, parts = crit(out, {"t": y})
    adv_want = torch.stack([F.cross_entropy(adv[:, i], y) for i in range(3)]).mean()
    keep = mask.bool()
    pairs = [(i, j, keep[:, i] & keep[:, j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    nce_want = torch.stack([info_nce(branches[m, i], branches[m, j], 0.1) for i, j, m in pairs]).mean()
    band_want = sum(F.mse_loss(band_w[m, i], band_w[m, j]) for i, j, m in pairs)
    torch.testing.assert_close(loss - base, 0.5 * adv_want + 0.25 * nce_want + 2.0 * band_want)
    assert set(parts) >= {"adv", "nce", "band"}
    # Warm-ups per step, and a head without the outputs a term needs is refused in one line.
    warm = build_criterion("scabg", {"t": 3}, adv_weight=0.5, adv_warmup=10, kd_warmup_unit="step", **kw)
    l_half, _ = warm(out, {"t": y}, step=5)
    torch.testing.assert_close(l_half - base, 0.25 * adv_want)
    with pytest.raises(MMCacheError, match="scabg-ref"):
        crit({k: v for k, v in out.items() if k != "_adv"}, {"t": y})
    # The reference recipe: its values unless set; an explicit option wins.
    ref = build_criterion("scabg", {"t": 3}, class_counts={"t": torch.tensor([5, 3, 2])}, variant="reference")
    assert ref.adv == (0.001, 12000) and ref.nce == (0.005, 9000) and ref.band == (0.005, 9000)
    assert ref.warmup_unit == "step" and ref.kd_warmup == 6000 and hasattr(ref, "cbw_t")
    assert build_criterion("scabg", {"t": 3}, variant="reference", nce_weight=0.1, kd_warmup=7).nce[0] == 0.1
    assert build_criterion("scabg", {"t": 3}, variant="reference", kd_warmup=7).kd_warmup == 7
    assert build_criterion("scabg", {"t": 3}, variant="reference", adv_weight=0.0).adv == (0.0, 12000)  # off is off
