"""Batched sweeps: every config trained together equals `heads train` for it alone (same seed), within float
tolerance; stores are loaded once; the grid file; torchrun splits config groups across ranks."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmcache.errors import MMCacheError
from mmcache.heads.stacked import stackable
from mmcache.heads.sweep import configs_from, load_grid_file, parse_grid, run_sweep, summarize
from mmcache.heads.train import Member, TrainConfig, train, train_many

MODS = {"image": "feat", "text": "feat"}


def base(cache: Path, **kw: object) -> TrainConfig:
    b: dict[str, object] = dict(dataset="toy", modalities=dict(MODS), cache_dir=str(cache), epochs=6, batch_size=64,
                                quiet=True, save=False)
    b.update(kw)
    return TrainConfig(**b)  # type: ignore[arg-type]


def assert_same(single: object, batched: object) -> None:
    """Same selected epoch, same curves, same metrics and weights up to float round-off."""
    a, b = single, batched
    assert a.best_epoch == b.best_epoch  # type: ignore[attr-defined]
    for ra, rb in zip(a.curves, b.curves, strict=True):  # type: ignore[attr-defined]
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4, abs=1e-5)
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-4, abs=1e-5)
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-6)
    for split, per in a.metrics.items():  # type: ignore[attr-defined]
        for k in ("accuracy", "macro_f1"):
            assert per["label"][k] == pytest.approx(b.metrics[split]["label"][k], abs=1e-9), (split, k)  # type: ignore
    sa, sb = a.head.state_dict(), b.head.state_dict()  # type: ignore[attr-defined]
    assert sa.keys() == sb.keys()
    for k in sa:
        if sa[k].is_floating_point():
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5, msg=k)


GRIDS = {
    # linear probes: one stacked computation (lr, weight decay, seed, optimizer differ per config); the adam
    # stack has unequal seed groups (2, 2, 1: one product per seed), the adamw one equal ones (one batched product)
    "stacked": [dict(head_hparams={"D": 0}, lr=lr, weight_decay=wd, seed=s, optimizer=o)
                for lr, wd, s, o in ((1e-2, 0.0, 0, "adam"), (3e-2, 1e-3, 0, "adam"), (1e-2, 0.0, 1, "adam"),
                                     (5e-2, 0.0, 1, "adam"), (3e-2, 0.0, 2, "adam"), (1e-2, 1e-2, 0, "adamw"),
                                     (5e-2, 1e-3, 1, "adamw"))]
    + [dict(head_hparams={"D": 0}, lr=0.05, optimizer="sgd", seed=2, schedule="none"),
       dict(head_hparams={"D": 0}, lr=0.05, optimizer="sgd", seed=3, schedule="none", label_smoothing=0.1,
            class_weights=True),
       dict(head_hparams={"D": 0, "l2norm": True}, lr=0.1, seed=0, warmup=0.2)],
    # fusion heads with dropout and BatchNorm: lockstep, each with its own optimizer and random stream
    "lockstep": [dict(head="linear", head_hparams={"D": 8, "dropout": 0.3}, lr=1e-2, seed=0),
                 dict(head="linear", head_hparams={"D": 8, "dropout": 0.5}, lr=3e-3, seed=1, weight_decay=1e-3),
                 dict(head="gated", head_hparams={"D": 8, "dropout": 0.2}, lr=1e-2, seed=0, oversample=True),
                 dict(head="linear", head_hparams={"D": 16}, lr=1e-2, seed=2, schedule="plateau",
                      select_metric="loss", early_stopping=2),
                 dict(head="linear", head_hparams={"D": 0}, lr=1e-2, seed=0, loss="focal")],
}


@pytest.mark.parametrize("kind", sorted(GRIDS))
def test_each_batched_config_equals_its_single_run(toy_cache: Path, kind: str) -> None:
    cfgs = [base(toy_cache, **kw) for kw in GRIDS[kind]]
    batched = train_many(cfgs)
    for cfg, got in zip(cfgs, batched, strict=True):
        assert not isinstance(got, MMCacheError)
        assert_same(train(cfg), got)


def test_stacked_probe_equals_the_module_loop(toy_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stacked computation (probes, alone or many) gives what the generic loop over the head module gives."""
    from mmcache.heads import stacked

    cfgs = [base(toy_cache, **kw) for kw in GRIDS["stacked"]]
    fast = train_many(cfgs)
    monkeypatch.setattr(stacked, "stackable", lambda m: False)
    for cfg, got in zip(cfgs, fast, strict=True):
        assert_same(train(cfg), got)


def test_probe_grids_take_the_stacked_path(toy_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmcache.heads import stacked
    from mmcache.heads import train as train_mod

    calls: dict[str, int] = {"stacked": 0, "lockstep": 0}
    real_stack, real_lock = stacked._fit_stack, train_mod._fit_lockstep

    def spy_stack(members: list[Member], *a: object) -> None:
        calls["stacked"] += len(members)
        real_stack(members, *a)  # type: ignore[arg-type]

    def spy_lock(members: list[Member], *a: object) -> None:
        calls["lockstep"] += len(members)
        real_lock(members, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(stacked, "_fit_stack", spy_stack)
    monkeypatch.setattr(train_mod, "_fit_lockstep", spy_lock)
    train_many([base(toy_cache, **kw) for kw in GRIDS["stacked"]])
    assert calls == {"stacked": len(GRIDS["stacked"]), "lockstep": 0}
    calls.update(stacked=0, lockstep=0)
    train_many([base(toy_cache, **kw) for kw in GRIDS["lockstep"]])
    assert calls == {"stacked": 0, "lockstep": len(GRIDS["lockstep"])}


def test_sweep_loads_each_store_once(toy_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmcache.heads import train as train_mod

    loads: list[dict[str, str]] = []
    real = train_mod.load_cached

    def spy(dataset: str, modalities: dict[str, str], *a: object, **kw: object) -> object:
        loads.append(dict(modalities))
        return real(dataset, modalities, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(train_mod, "load_cached", spy)
    rows = run_sweep(base(toy_cache), configs_from("head=linear,gated;D=4,8;lr=1e-2,3e-2", False), seeds=[0, 1])
    assert len(rows) == 16 and all("error" not in r for r in rows)
    assert loads == [MODS]
    # encoder choice is a grid key: one load per store selection
    loads.clear()
    rows = run_sweep(base(toy_cache, modalities={"image": "feat"}), configs_from("ttype=feat;vtype=feat;D=0,8", False))
    assert loads == [MODS] and all(r["stores"] == "image-feat+text-feat" for r in rows)


def test_summary_is_sorted_by_validation_metric(toy_cache: Path, tmp_path: Path) -> None:
    rows = run_sweep(base(toy_cache), configs_from("D=0;lr=1e-4,3e-2;ablation=0,1", False), seeds=[0, 1],
                     out=tmp_path / "s")
    summary = summarize(rows)
    vals = [s["val_accuracy"] for s in summary]
    assert vals == sorted(vals, reverse=True) and summary[0]["runs"] == 2 and "val_accuracy_std" in summary[0]
    md = (tmp_path / "s.md").read_text().splitlines()
    header = [c.strip() for c in md[0].strip("|").split("|")]
    table = [ln for ln in md if ln.startswith("|")]  # the legend of the paired comparisons follows the table
    assert header[:7] == ["config", "stores", "finetuned", "head", "D", "lr", "runs"] and len(table) == 2 + 4
    assert all(r["finetuned"] == "no" for r in rows)  # features of pretrained encoders
    assert summary[0]["config"] in md[2]


def test_grid_file(tmp_path: Path) -> None:
    p = tmp_path / "study.toml"
    p.write_text('seeds = [0, 1, 2]\n[grid]\nvtype = ["clip", "resnet"]\nD = [128, 256]\nlr = 1e-3\nl2norm = true\n')
    spec, seeds = load_grid_file(p)
    assert seeds == [0, 1, 2]
    assert parse_grid(spec) == {"vtype": ["clip", "resnet"], "D": [128, 256], "lr": [0.001], "l2norm": [True]}
    # Text holding a separator or a quote stays one value (written as a JSON string in the spec).
    p.write_text("""[grid]\nuse = ["image,text", "image"]\nhp.tag = ["a;b", 'say "hi"', "[x]"]\n""")
    spec, _ = load_grid_file(p)
    assert parse_grid(spec) == {"use": ["image,text", "image"], "hp.tag": ["a;b", 'say "hi"', "[x]"]}
    # The same on the command line: a quoted value is read whole.
    assert parse_grid('use="image,text",image;lr=1e-3') == {"use": ["image,text", "image"], "lr": [0.001]}
    p.write_text("[grid\n")
    with pytest.raises(MMCacheError, match="not valid TOML"):
        load_grid_file(p)
    with pytest.raises(MMCacheError, match="not found"):
        load_grid_file(tmp_path / "missing.toml")


def test_bad_configs_fail_alone(toy_cache: Path) -> None:
    good = base(toy_cache, head_hparams={"D": 0})
    out = train_many([good, dataclasses.replace(good, lr=-1.0), dataclasses.replace(good, head="nope")], errors=True)
    assert not isinstance(out[0], MMCacheError)
    assert isinstance(out[1], MMCacheError) and "--lr" in str(out[1])
    assert isinstance(out[2], MMCacheError) and "unknown head" in str(out[2])


def test_stackable_needs_a_plain_probe(toy_cache: Path) -> None:
    from mmcache.heads.data import load_cached
    from mmcache.heads.train import _build_member

    data = load_cached("toy", MODS, toy_cache)
    assert stackable(_build_member(base(toy_cache, head_hparams={"D": 0}), data))
    for kw in (dict(head_hparams={"D": 8}), dict(head_hparams={"D": 0}, loss="focal"),
               dict(head_hparams={"D": 0}, schedule="plateau"), dict(head_hparams={"D": 0}, loss_options={"uncertainty": True})):
        assert not stackable(_build_member(base(toy_cache, **kw), data)), kw


@pytest.mark.slow
def test_sweep_under_torchrun_splits_groups(toy_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweeps" / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mmcache.heads.cli", "sweep", "--dataset", "toy", "--cache-dir", str(toy_cache), "--vtype", "feat",
           "--ttype", "feat", "--grid", "head=linear,gated;D=4,8", "--epochs", "4", "--batch-size", "64",
           "--threads", "1", "--out", str(out),
           "--runs-dir", str(tmp_path / "runs")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rank 0 of 2" in res.stderr and "rank 1 of 2" in res.stderr
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert sorted(r["config"] for r in rows) == sorted(["head=linear,D=4", "head=linear,D=8", "head=gated,D=4",
                                                       "head=gated,D=8"])
    # the same table as one process
    single = run_sweep(base(toy_cache, epochs=4), configs_from("head=linear,gated;D=4,8", False))
    by_name = {r["config"]: r for r in single}
    for r in rows:
        assert r["test_accuracy"] == pytest.approx(by_name[r["config"]]["test_accuracy"], abs=1e-9)


def test_modalities_and_use_grid_keys_choose_what_the_head_uses(toy_cache: Path) -> None:
    """`modalities` / `use` in a grid set the head's modalities, never the store mapping."""
    rows = run_sweep(base(toy_cache, head_hparams={"D": 8}, lr=1e-2, epochs=15),
                     configs_from('modalities=["image"],["image","text"]', False) + configs_from("use=text", False))
    assert all("error" not in r for r in rows), rows
    assert all(r["stores"] == "image-feat+text-feat" for r in rows)
    accs = {r["config"]: r["test_accuracy"] for r in rows}
    both, image, text = accs["modalities=['image', 'text']"], accs["modalities=['image']"], accs["use=text"]
    assert both > max(image, text) + 0.2, accs  # fusion needs both; each alone caps near 5/9


def test_fit_seconds_share_the_groups_time(toy_cache: Path) -> None:
    """Each config of a lockstep group gets a part of the group's fitting time (by its own forward time)."""
    import time

    cfgs = [base(toy_cache, head_hparams={"D": d}, head=h) for h, d in (("linear", 4), ("gated", 8), ("xattn", 8))]
    t = time.perf_counter()
    res = train_many(cfgs)
    wall = time.perf_counter() - t
    secs = [r.fit_seconds for r in res]  # type: ignore[union-attr]
    assert all(s > 0 for s in secs) and sum(secs) < wall


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_stacked_cross_entropy_and_its_gradient_are_torchs(smoothing: float, weighted: bool) -> None:
    """The written-out loss and gradient of the stacked probes equal F.cross_entropy and autograd, per config,
    with class weights, label smoothing, unlabelled rows and a batch without any labelled row."""
    import torch.nn.functional as F

    from mmcache.engine import IGNORE
    from mmcache.heads.stacked import _ce_slots

    g = torch.Generator().manual_seed(0)
    s, b, k, c = 3, 7, 4, 5
    logits = (torch.randn(s, b, k, c, generator=g, dtype=torch.float64) * 3).requires_grad_()
    y = torch.randint(0, c, (s, b), generator=g)
    y[0, :3] = IGNORE
    y[2] = IGNORE  # no labelled row: loss and gradient 0
    weight = torch.rand(c, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    loss, d = _ce_slots(logits.detach(), y, weight, smoothing, grad=True)
    assert d is not None
    want = torch.zeros(s, k, dtype=torch.float64)
    for i in range(s):
        for j in range(k):
            if (y[i] != IGNORE).any():
                want[i, j] = F.cross_entropy(logits[i, :, j], y[i], weight=weight, ignore_index=IGNORE,
                                             label_smoothing=smoothing)
    want.sum().backward()
    torch.testing.assert_close(loss.view(s, k), want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d, logits.grad, rtol=1e-10, atol=1e-12)
    assert float(d[2].abs().sum()) == 0.0 and float(loss.view(s, k)[2].abs().sum()) == 0.0
