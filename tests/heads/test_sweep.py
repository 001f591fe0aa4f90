"""Sweeps: grid parsing, config overrides, a real sweep on a synthetic cache, the SCABG ablation, the CLI."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmcache.errors import MMCacheError
from mmcache.heads import build_head
from mmcache.heads.sweep import (
    SCABG_ABLATION,
    apply_overrides,
    configs_from,
    expand_grid,
    format_table,
    parse_grid,
    run_sweep,
    summarize,
)
from mmcache.heads.train import TrainConfig


def test_parse_and_expand_grid() -> None:
    g = parse_grid("head=linear,gated; D=128,256;lr=1e-3;hp.classes=[2,1,0],[0,1,2];flag=true")
    assert g == {"head": ["linear", "gated"], "D": [128, 256], "lr": [0.001], "hp.classes": [[2, 1, 0], [0, 1, 2]],
                 "flag": [True]}
    combos = expand_grid(g)
    assert len(combos) == 8 and combos[0] == {"head": "linear", "D": 128, "lr": 0.001, "hp.classes": [2, 1, 0],
                                              "flag": True}
    assert expand_grid({}) == [{}]
    for bad in ("head", "head=", "D=1;D=2"):
        with pytest.raises(MMCacheError, match="grid"):
            parse_grid(bad)


def test_apply_overrides_routes_keys() -> None:
    base = TrainConfig(dataset="x", modalities={"image": "a"}, head_hparams={"D": 64}, loss_options={"gamma": 1})
    cfg = apply_overrides(base, {"head": "gated", "lr": 0.01, "D": 8, "hp.gate": "softmax", "loss.gamma": 2,
                                 "loss.kd_T": 4})
    assert (cfg.head, cfg.lr) == ("gated", 0.01)
    assert cfg.head_hparams == {"D": 8, "gate": "softmax"} and cfg.loss_options == {"gamma": 2, "kd_T": 4}
    assert base.head_hparams == {"D": 64} and base.loss_options == {"gamma": 1} and base.head == "linear"
    with pytest.raises(MMCacheError, match="one by one"):
        apply_overrides(base, {"head_hparams": {}})


def test_ablation_preset_builds_every_variant() -> None:
    configs = configs_from(None, True)
    names = [n for n, _ in configs]
    assert names == [n for n, _ in SCABG_ABLATION] and names[0] == "full" and len(set(names)) == len(names)
    base = TrainConfig(dataset="x", modalities={}, head_hparams={"hidden": 16, "out_dim": 8, "heads": 2,
                                                                 "branch_heads": 2})
    inputs = {"image": {"pooled": (6,), "tokens": (3, 6), "mask": (3,)}, "text": {"pooled": (5,)}}
    sizes = set()
    for name, ov in configs:
        cfg = apply_overrides(base, ov)
        assert cfg.head == "scabg"
        head = build_head(cfg.head, inputs, {"y": 3}, cfg.head_hparams)
        sizes.add(sum(p.numel() for p in head.parameters()))
        assert all(head.hparams[k[3:]] == v for k, v in ov.items() if k.startswith("hp.")), name
    assert len(sizes) >= 6  # the switched-off parts really are gone
    crossed = configs_from("lr=0.1,0.2", True)
    assert len(crossed) == 2 * len(SCABG_ABLATION) and crossed[1][0] == "lr=0.1/no-calibration"
    assert crossed[1][1]["lr"] == 0.1 and crossed[1][1]["hp.calibrate"] is False


def test_run_sweep_on_a_cache(make_cache: Callable[..., Path], tmp_path: Path) -> None:
    cache = make_cache(n=300)
    base = TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(cache),
                       runs_dir=str(tmp_path / "runs"), epochs=15, batch_size=64, lr=1e-2)
    configs = configs_from("head=linear,gated;D=8,16", False)
    configs.append(("broken", {"head": "gated", "hp.gate": "tanh"}))
    out = tmp_path / "sweeps" / "s1"
    rows = run_sweep(base, configs, seeds=[0, 1], out=out)
    assert len(rows) == 10
    good = [r for r in rows if "error" not in r]
    assert len(good) == 8 and all(r["seconds"] > 0 for r in good)
    assert {(r["head"], r["D"]) for r in good} == {("linear", 8), ("linear", 16), ("gated", 8), ("gated", 16)}
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and "val_accuracy" in r for r in good)
    assert max(r["test_accuracy"] for r in good) > 0.8  # the task is learnable with both modalities
    assert [r for r in rows if "error" in r][0]["error"].startswith("head gated: gate='tanh'")
    assert not (tmp_path / "runs" / "toy").exists()  # no run folders unless asked
    with open(out.with_suffix(".csv")) as f:
        assert len(list(csv.DictReader(f))) == 10
    saved = json.loads(out.with_suffix(".json").read_text())
    summary = summarize(rows)
    assert saved["summary"] == json.loads(json.dumps(summary))
    s = {x["config"]: x for x in summary}
    assert s["head=linear,D=8"]["runs"] == 2 and "test_accuracy_std" in s["head=linear,D=8"]
    mean = sum(r["test_accuracy"] for r in good if r["config"] == "head=gated,D=16") / 2
    assert s["head=gated,D=16"]["test_accuracy"] == pytest.approx(mean)
    table = format_table(summary)
    assert "head=gated,D=16" in table and "error" in table.splitlines()[-1] and "±" in table
    # Every run failing (here: no such dataset) is an error, not a table of errors.
    with pytest.raises(MMCacheError, match="every sweep run failed.*manifest"):
        run_sweep(apply_overrides(base, {"dataset": "nope"}), configs[:2])


def test_scabg_ablation_runs(make_cache: Callable[..., Path], tmp_path: Path) -> None:
    cache = make_cache(n=120, tokens=True)
    base = TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(cache),
                       runs_dir=str(tmp_path / "runs"), epochs=2, batch_size=64,
                       head_hparams={"hidden": 16, "out_dim": 8, "heads": 2, "branch_heads": 2, "queries": 2})
    rows = run_sweep(base, configs_from(None, True), seeds=[0])
    assert [r["config"] for r in rows] == [n for n, _ in SCABG_ABLATION]
    assert all("error" not in r and 0 <= r["test_accuracy"] <= 1 for r in rows), [r.get("error") for r in rows]


def test_sweep_cli(make_cache: Callable[..., Path], tmp_path: Path) -> None:
    from mmcache.heads.cli import app

    cache = make_cache(n=200)
    out = tmp_path / "res" / "grid"
    threads_before = torch.get_num_threads()
    res = CliRunner().invoke(app, ["sweep", "--dataset", "toy", "--vtype", "feat", "--ttype", "feat",
                                   "--grid", "head=linear,gated", "--epochs", "3", "--cache-dir", str(cache),
                                   "--runs-dir", str(tmp_path / "runs"), "--out", str(out), "--hp", "D=8",
                                   "--threads", "1"])
    threads_after = torch.get_num_threads()
    torch.set_num_threads(threads_before)
    assert res.exit_code == 0, res.output
    assert threads_after == 1  # --threads reaches every run of the sweep
    assert "head=linear" in res.output and "head=gated" in res.output and "test_accuracy" in res.output
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["head"] for r in rows] == ["linear", "gated"] and all("error" not in r for r in rows)


def test_table_shows_chosen_columns() -> None:
    summary = [{"config": "a", "runs": 2, "stores": "image-x", "head": "linear", "D": 8, "lr": 0.01,
                "val_auroc": 0.9, "val_auroc_std": 0.01, "val_accuracy": 0.8, "test_auroc": 0.85, "test_accuracy": 0.7,
                "test_macro_f1": 0.6, "test_weighted_f1": 0.65, "seconds": 1.5},
               {"config": "b", "runs": 2, "stores": "image-x", "head": "gated", "D": 8, "lr": 0.01,
                "val_auroc": 0.8, "val_accuracy": 0.7, "test_auroc": 0.75, "test_accuracy": 0.6,
                "test_macro_f1": 0.5, "test_weighted_f1": 0.55, "seconds": 2.0}]
    # the selection metric (val and test), test accuracy and macro F1; of the describing columns only what varies
    header = format_table(summary).splitlines()[0].split()
    assert header == ["config", "head", "runs", "val_auroc", "test_auroc", "test_accuracy", "test_macro_f1", "seconds"]
    table = format_table(summary)
    assert "0.9000 ± 0.0100" in table and "test_weighted_f1" not in table
    chosen = format_table(summary, columns=["config", "test_weighted_f1"])
    assert chosen.splitlines()[0].split() == ["config", "test_weighted_f1"] and "0.6500" in chosen
    md = format_table(summary, "md").splitlines()[0]
    assert "test_weighted_f1" in md and "stores" in md  # the markdown file keeps every column
    with pytest.raises(MMCacheError, match=r"--columns: unknown column\(s\) \['nope'\]"):
        format_table(summary, columns=["nope"])


def test_the_finetuned_column_names_the_mode_of_fine_tuned_stores() -> None:
    """The reference tables' "fine-tuned?" column: `no` for pretrained encoders' stores, the fine-tuning mode of
    stores extracted with `finetuned:RUN`, per modality when they differ."""
    from mmcache.heads.sweep import finetuned_of

    plain = {"spec": {"family": "clip", "preset": "clip"}}
    lora = {"spec": {"family": "finetuned", "mode": "lora", "preset": "finetuned:/runs/demo/r"}}
    assert finetuned_of({"image/clip": plain, "text/clip": plain}) == "no"
    assert finetuned_of({"image/ft": lora, "text/ft": lora}) == "lora"
    assert finetuned_of({"image/ft": lora, "text/clip": plain}) == "image:lora,text:no"
    assert finetuned_of({}) == "no"
