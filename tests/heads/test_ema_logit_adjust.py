"""Weight averaging (`--ema`), post-hoc logit adjustment (`--logit-adjust`) and the training progress that
reaches heads and losses (`set_progress`): against by-hand computations on tiny runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcache.engine import EMA, TrainProgress, adjust_logits, logit_offsets, progress_hook
from mmcache.errors import MMCacheError
from mmcache.heads.data import load_cached
from mmcache.heads.metrics import classification_metrics
from mmcache.heads.stacked import stackable
from mmcache.heads.train import TrainConfig, _build_member, predict, predict_logits, train, train_many

from .test_batched_sweep import assert_same

MODS = {"image": "feat", "text": "feat"}


def cfg_of(cache: Path, **kw: object) -> TrainConfig:
    b: dict[str, object] = dict(dataset="toy", modalities=dict(MODS), cache_dir=str(cache), epochs=4, batch_size=64,
                                quiet=True, save=False, lr=3e-2, head_hparams={"D": 0})
    b.update(kw)
    return TrainConfig(**b)  # type: ignore[arg-type]


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> list[list[torch.Tensor]]:
    """The head's parameters before the first optimizer step and after every step (the first param group)."""
    seen: list[list[torch.Tensor]] = []

    def pre(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        if not seen:
            seen.append([p.detach().clone() for p in opt.param_groups[0]["params"]])

    def post(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        seen.append([p.detach().clone() for p in opt.param_groups[0]["params"]])

    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    h1 = register_optimizer_step_pre_hook(pre)
    h2 = register_optimizer_step_post_hook(post)
    yield seen
    h1.remove()
    h2.remove()


def test_ema_equals_a_by_hand_average_of_the_trajectory(toy_cache: Path, steps: list[list[torch.Tensor]]) -> None:
    decay = 0.9
    res = train(cfg_of(toy_cache, ema=decay, select_metric="loss"))
    spe = (len(steps) - 1) // 4  # 4 epochs
    ema = steps[0]
    by_epoch = []
    for t in range(1, len(steps)):
        ema = [decay * e + (1 - decay) * p for e, p in zip(ema, steps[t], strict=True)]
        if t % spe == 0:
            by_epoch.append(ema)
    want = by_epoch[res.best_epoch - 1]  # the average at the chosen epoch is what the run keeps
    got = list(res.head.parameters())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.detach(), w, rtol=1e-5, atol=1e-6)
    raw = steps[res.best_epoch * spe]
    assert any(not torch.allclose(g, r) for g, r in zip(got, raw, strict=True))  # not the trained weights
    # Validation ran on the averaged weights: the chosen epoch's curve row is the final val metrics'.
    row = res.curves[res.best_epoch - 1]
    assert row["val_accuracy"] == pytest.approx(res.metrics["val"]["label"]["accuracy"], abs=1e-9)


def test_ema_off_keeps_the_trained_weights(toy_cache: Path, steps: list[list[torch.Tensor]]) -> None:
    data = load_cached("toy", MODS, str(toy_cache), seed=0)
    assert stackable(_build_member(cfg_of(toy_cache), data.for_seed(0)))  # off: probes still train stacked
    assert not stackable(_build_member(cfg_of(toy_cache, ema=0.99), data.for_seed(0)))
    res = train(cfg_of(toy_cache, select_metric="loss", head_hparams={"D": 8}))
    spe = (len(steps) - 1) // 4
    for g, w in zip(res.head.parameters(), steps[res.best_epoch * spe], strict=True):
        torch.testing.assert_close(g.detach(), w, rtol=1e-5, atol=1e-6)
    assert res.config["ema"] == 0.0


def test_ema_module_swaps_and_restores() -> None:
    lin = torch.nn.Linear(3, 2)
    w0 = lin.weight.detach().clone()
    ema = EMA(lin, 0.5)
    with torch.no_grad():
        lin.weight.add_(2.0)
    ema.update()
    with ema.applied():
        torch.testing.assert_close(lin.weight.detach(), w0 + 1.0)
    torch.testing.assert_close(lin.weight.detach(), w0 + 2.0)
    with pytest.raises(MMCacheError, match="--ema"):
        EMA(lin, 1.0)


def test_each_sweep_config_with_ema_equals_its_single_run(toy_cache: Path) -> None:
    grid = [dict(ema=0.9), dict(ema=0.0, lr=1e-2), dict(ema=0.95, lr=1e-2, optimizer="adamw", weight_decay=1e-3),
            dict(head_hparams={"D": 8, "dropout": 0.3}, ema=0.9, seed=1),
            dict(head="gated", head_hparams={"D": 8, "dropout": 0.2}, ema=0.8),
            dict(logit_adjust=1.0), dict(head_hparams={"D": 8}, logit_adjust=-0.5, ema=0.9)]
    cfgs = [cfg_of(toy_cache, **kw) for kw in grid]
    batched = train_many(cfgs)
    for cfg, got in zip(cfgs, batched, strict=True):
        assert not isinstance(got, MMCacheError)
        assert_same(train(cfg), got)


def test_ema_is_refused_with_lbfgs_and_out_of_range(toy_cache: Path) -> None:
    with pytest.raises(MMCacheError, match="lbfgs"):
        train(cfg_of(toy_cache, ema=0.9, solver="lbfgs"))
    with pytest.raises(MMCacheError, match="--ema"):
        train(cfg_of(toy_cache, ema=1.5))


# ---------------------------------------------------------------- logit adjustment


@pytest.mark.parametrize("tau", [1.5, -1.0])
def test_logit_adjustment_subtracts_tau_log_prior(make_cache: object, tmp_path: Path, tau: float) -> None:
    cache = make_cache(majority=0.4)  # type: ignore[operator]
    res = train(cfg_of(cache, logit_adjust=tau, save=True, runs_dir=str(tmp_path / "runs"), run_name="la"))
    data = load_cached("toy", MODS, str(cache), seed=0)
    y_train = data.targets["label"][data.split_index["train"]]
    prior = torch.bincount(y_train, minlength=3).double() / len(y_train)
    offsets = (tau * prior.log()).tolist()
    assert res.config["resolved"]["logit_adjust"] == {"tau": tau, "offsets": {"label": pytest.approx(offsets)}}
    idx = data.split_index["test"]
    raw = predict_logits(res.head, data, idx)["label"].double()
    adjusted = raw - torch.tensor(offsets, dtype=torch.float64)
    assert not torch.equal(raw.argmax(1), adjusted.argmax(1))  # the prior moves some predictions here
    want = classification_metrics(data.targets["label"][idx].numpy(), adjusted.numpy(), data.labels.tasks["label"])
    for k in ("accuracy", "macro_f1"):
        assert res.metrics["test"]["label"][k] == pytest.approx(want[k], abs=1e-9)
    # `heads predict` applies the run's adjustment: predicted classes and probabilities from adjusted logits.
    rows = list(csv.DictReader(predict(res.run_dir, split="test").open()))
    names = data.labels.tasks["label"]
    assert [r["predicted"] for r in rows] == [names[int(i)] for i in adjusted.argmax(1)]
    probs = np.array([[float(r[f"p_{n}"]) for n in names] for r in rows])
    np.testing.assert_allclose(probs, torch.softmax(adjusted, 1).numpy(), atol=2e-6)
    # `mmcache predict`'s Predictor too (features given directly: the toy stores have no extractor preset).
    from mmcache.data.base import Sample
    from mmcache.predict import Predictor

    config = json.loads((Path(res.run_dir) / "config.json").read_text())
    pred = Predictor(Path(res.run_dir), config, res.head, {}, {}, {}, "cpu")
    ids = [data.ids[i] for i in idx.tolist()]
    rows = data.batch(idx)
    feats = {m: {sid: {"pooled": rows[m]["pooled"][j]} for j, sid in enumerate(ids)} for m in MODS}
    out = pred._predict([Sample(id=s, split="") for s in ids], feats, {})
    assert [o.label for o in out] == [names[int(i)] for i in adjusted.argmax(1)]


def test_logit_offsets_and_errors() -> None:
    counts = {"t": torch.tensor([6, 3, 1])}
    off = logit_offsets(counts, 2.0)
    np.testing.assert_allclose(off["t"], 2.0 * np.log([0.6, 0.3, 0.1]))
    assert logit_offsets(counts, 0.0) == {}
    x = torch.zeros(2, 3)
    torch.testing.assert_close(adjust_logits({"t": x}, off)["t"], -torch.tensor([off["t"]] * 2, dtype=torch.float32))
    np.testing.assert_allclose(adjust_logits({"t": np.zeros((1, 3))}, off)["t"], -np.array([off["t"]]))
    with pytest.raises(MMCacheError, match="'b' of task 't' has no train rows"):
        logit_offsets({"t": torch.tensor([4, 0, 1])}, 1.0, {"t": ["a", "b", "c"]})


def test_reference_head_adds_the_prior_by_default(make_cache: object) -> None:
    cache = make_cache(tokens=True, n=120)  # type: ignore[operator]
    cfg = cfg_of(cache, head="scabg-ref", head_hparams={"D": 16, "hidden": 16, "out_dim": 8, "heads": 2,
                                                        "branch_heads": 2, "queries": 2}, epochs=1)
    data = load_cached("toy", MODS, str(cache), seed=0).for_seed(0)
    m = _build_member(cfg, data)
    assert m.tau == -1.0 and min(m.offsets["label"]) > 0  # subtracting -log p(y): the reference adds log p(y)
    assert _build_member(cfg_of(cache, head="linear"), data).tau == 0.0
    assert _build_member(cfg_of(cache, head="scabg-ref", head_hparams=cfg.head_hparams, logit_adjust=0.0),
                         data).offsets == {}


# ---------------------------------------------------------------- progress: GRL schedule, late decay, KD ramp


def _grl_strengths(cache: Path, monkeypatch: pytest.MonkeyPatch, **hp: object) -> list[float]:
    import mmcache.heads.scabg as scabg

    seen: list[float] = []
    real = scabg.grad_reverse

    def spy(x: torch.Tensor, strength: float) -> torch.Tensor:
        if torch.is_grad_enabled():
            seen.append(strength)
        return real(x, strength)

    monkeypatch.setattr(scabg, "grad_reverse", spy)
    hparams = {"D": 16, "out_dim": 8, "heads": 2, "branch_heads": 2, "queries": 2, **hp}
    train(cfg_of(cache, head="scabg-ref", head_hparams=hparams, epochs=2, batch_size=32, loss="scabg",
                 loss_options={"variant": "reference"}))
    return seen


def test_grl_strength_follows_its_schedule_per_step(make_cache: object, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = make_cache(tokens=True, n=120)  # type: ignore[operator]
    branches = 1  # image-text: one branch, one adversarial head, one reversal per step
    got = _grl_strengths(cache, monkeypatch, grl=0.4, grl_warmup=5)  # the reference's: linear over steps
    n = len(got) // branches
    assert n >= 6
    np.testing.assert_allclose(got, [0.4 * min(1.0, s / 5) for s in range(n)], rtol=1e-12)
    got = _grl_strengths(cache, monkeypatch, grl=0.4, grl_schedule="dann")
    n = len(got)
    np.testing.assert_allclose(got, [0.4 * (2 / (1 + math.exp(-10 * s / n)) - 1) for s in range(n)], rtol=1e-12)
    assert got == sorted(got) and got[0] == 0.0
    got = _grl_strengths(cache, monkeypatch, grl=0.4, grl_schedule="constant")
    assert set(got) == {0.4}


def test_late_decay_of_the_adversarial_and_infonce_weights() -> None:
    from mmcache.heads.losses import build_criterion

    g = torch.Generator().manual_seed(0)
    n = 8
    logits = torch.randn(n, 3, generator=g)
    y = torch.arange(n) % 3
    out = {"t": logits, "_coarse": logits[:, :2], "_fine": logits[:, 1:], "_adv": torch.randn(n, 3, 3, generator=g),
           "_branches": torch.randn(n, 3, 5, generator=g), "_branch_mask": torch.ones(n, 3),
           "_band_w": torch.softmax(torch.randn(n, 3, 4, generator=g), -1)}
    kw = {"aux_uncertainty": False, "aux_weight": 0.0, "variant": "reference", "adv_warmup": 0, "nce_warmup": 0,
          "band_warmup": 0, "ce_balanced": False}
    crit = build_criterion("scabg", {"t": 3}, **kw)
    assert (crit.late_start, crit.late_decay) == (0.6, {"adv": 0.5, "nce": 0.25})
    crit.set_progress(TrainProgress(0, 59, 100))
    early, parts = crit(out, {"t": y})
    crit.set_progress(TrainProgress(0, 60, 100))
    late, _ = crit(out, {"t": y})
    want = 0.001 * parts["adv"] * (1 - 0.5) + 0.005 * parts["nce"] * (1 - 0.25)
    assert float(early - late) == pytest.approx(want, rel=1e-5)
    off = build_criterion("scabg", {"t": 3}, **{**kw, "late_start": 1.0})  # 1 = never
    off.set_progress(TrainProgress(0, 99, 100))
    assert float(off(out, {"t": y})[0]) == pytest.approx(float(early), rel=1e-6)
    default = build_criterion("scabg", {"t": 3})
    assert default.late_start == 1.0
    with pytest.raises(MMCacheError, match="late_adv_decay"):
        build_criterion("scabg", {"t": 3}, late_adv_decay=2.0)


def test_kd_weight_ramps_per_step_through_the_progress_hook() -> None:
    from mmcache.heads.losses import build_criterion

    crit = build_criterion("ce", {"t": 3}, kd_lambda=0.5, kd_warmup=10, kd_warmup_unit="step")
    head = torch.nn.Linear(2, 3)
    tell = progress_hook(head, crit)
    logits = {"t": torch.randn(4, 3)}
    teacher = torch.randn(4, 3)
    weights = []
    for s in range(12):
        tell(TrainProgress(0, s, 12))
        weights.append(crit(logits, {"t": torch.tensor([0, 1, 2, 0])}, teacher)[1]["kd_weight"] if s else 0.0)
    np.testing.assert_allclose(weights, [0.5 * min(1.0, s / 10) for s in range(12)])


def test_flags_and_grid_keys(toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from mmcache.heads.cli import main
    from mmcache.heads.sweep import apply_overrides, expand_grid, parse_grid

    runs = tmp_path / "runs"
    monkeypatch.setattr(sys, "argv", ["heads", "train", "--dataset", "toy", "--vtype", "feat", "--ttype", "feat",
                                      "--cache-dir", str(toy_cache), "--runs-dir", str(runs), "--epochs", "2",
                                      "--D", "0", "--ema", "0.9", "--logit-adjust", "-0.5", "--run-name", "f", "-q"])
    with pytest.raises(SystemExit) as e:
        main()
    assert not e.value.code
    cfg = json.loads((runs / "toy" / "f" / "config.json").read_text())
    assert cfg["ema"] == 0.9 and cfg["logit_adjust"] == -0.5 and cfg["resolved"]["logit_adjust"]["tau"] == -0.5
    cfgs = [apply_overrides(cfg_of(toy_cache), ov) for ov in expand_grid(parse_grid("ema=0,0.999;logit_adjust=-1,1"))]
    assert [(c.ema, c.logit_adjust) for c in cfgs] == [(0, -1), (0, 1), (0.999, -1), (0.999, 1)]
