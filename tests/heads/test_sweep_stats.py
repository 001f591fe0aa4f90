"""Multi-seed tables: the 95% interval per config and the paired comparisons with the best config, checked
against scipy and the stats module on the sweep's own runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from mmcache.heads.sweep import PREDS, format_table, run_sweep, summarize
from mmcache.heads.train import TrainConfig
from mmcache.stats import paired_bootstrap
from tests.heads.conftest import build_cache


def base(tmp_path: Path) -> TrainConfig:
    return TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(tmp_path / "cache"),
                       runs_dir=str(tmp_path / "runs"), head_hparams={"D": 8}, epochs=15, batch_size=64, lr=1e-2, device="cpu")


def test_sweep_table_has_intervals_and_paired_tests_against_the_best(tmp_path: Path) -> None:
    build_cache(tmp_path / "cache", n=300)
    configs = [("both", {}), ("image-only", {"ablation": 2})]
    out = tmp_path / "sw"
    rows = run_sweep(base(tmp_path), configs, seeds=[0, 1, 2], out=out)
    summary = summarize(rows, n_boot=400)
    best, other = summary
    assert best["config"] == "both" and best["compared_on"] == "test_accuracy" and "vs_best" not in best
    acc = {c: [r["test_accuracy"] for r in sorted(rows, key=lambda r: r["seed"]) if r["config"] == c]
           for c in ("both", "image-only")}
    lo, hi = sps.t.interval(0.95, 2, loc=np.mean(acc["both"]), scale=sps.sem(acc["both"]))
    assert best["test_accuracy_low"] == pytest.approx(lo) and best["test_accuracy_high"] == pytest.approx(hi)
    assert other["p_ttest"] == pytest.approx(sps.ttest_rel(acc["image-only"], acc["both"]).pvalue)
    boot = paired_bootstrap([r[PREDS] for r in rows if r["config"] == "image-only"],
                            [r[PREDS] for r in rows if r["config"] == "both"], "accuracy", n_boot=400)
    assert other["vs_best"] == pytest.approx(np.mean(acc["image-only"]) - np.mean(acc["both"]))
    assert other["vs_best"] == pytest.approx(boot["diff"])
    assert (other["vs_best_low"], other["vs_best_high"], other["p_boot"]) == pytest.approx(
        (boot["ci_low"], boot["ci_high"], boot["p"]))
    # Image alone caps accuracy near 5/9 on this task: the gap is real.
    assert other["vs_best"] < -0.1 and other["p_boot"] < 0.05 and other["significant"] is True
    table = format_table(summary)
    assert "vs_best" in table and "p_ttest" in table and "best" in table and "paired bootstrap" in table.splitlines()[0]
    md = out.with_suffix(".md").read_text()
    assert f"[{best['test_accuracy_low']:.4f}, {best['test_accuracy_high']:.4f}]" in md and "yes |" in md
    # Predictions stay in memory: the files hold numbers only.
    assert PREDS not in out.with_suffix(".csv").read_text()
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["summary"][1]["p_ttest"] == pytest.approx(other["p_ttest"])
    assert all(PREDS not in r for r in saved["rows"])
    with out.with_suffix(".csv").open() as f:
        assert {"params", "peak_mem_mb", "infer_ms_per_row"} <= set(next(csv.DictReader(f)))


def test_a_config_equal_to_the_best_is_not_significant_and_two_seeds_give_no_ttest(tmp_path: Path) -> None:
    build_cache(tmp_path / "cache", n=200)
    rows = run_sweep(base(tmp_path), [("a", {}), ("b", {"lr": 1e-2})], seeds=[0, 1])  # b is a (lr 1e-2 is the base)
    s = summarize(rows, n_boot=200)
    assert s[1]["vs_best"] == pytest.approx(0.0, abs=1e-12) and s[1]["p_boot"] == 1.0 and not s[1]["significant"]
    assert "p_ttest" not in s[1]
