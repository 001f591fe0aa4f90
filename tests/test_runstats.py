"""heads runs --by-config: runs grouped by configuration, intervals and paired tests from the run folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from mmcache.heads.sweep import PREDS, run_sweep
from mmcache.heads.train import TrainConfig
from mmcache.runs import collect, runs_table
from mmcache.runstats import group_runs, grouped_table
from mmcache.stats import paired_bootstrap
from tests.heads.conftest import build_cache


def test_runs_by_config_match_the_sweep_statistics(tmp_path: Path) -> None:
    build_cache(tmp_path / "cache", n=300)
    base = TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(tmp_path / "cache"),
                       runs_dir=str(tmp_path / "runs"), head_hparams={"D": 8}, epochs=15, batch_size=64, lr=1e-2,
                       device="cpu")
    rows = run_sweep(base, [("both", {}), ("image", {"ablation": 2})], seeds=[0, 1, 2], save_runs=True,
                     out=tmp_path / "sw")
    runs = collect(tmp_path / "runs")
    assert len(runs) == 6 and all(isinstance(r["params"], int) and r["infer_ms_per_row"] > 0 for r in runs)
    assert "params" not in runs_table(runs).splitlines()[0]  # cost columns are asked for
    assert "infer_ms_per_row" in runs_table(runs, columns=["run", "params", "infer_ms_per_row"])
    groups = group_runs(runs, tmp_path / "runs", n_boot=300)
    assert [g["runs"] for g in groups] == [3, 3]
    best, other = groups
    acc = {c: [r["test_accuracy"] for r in sorted(rows, key=lambda r: r["seed"]) if r["config"] == c]
           for c in ("both", "image")}
    lo, hi = sps.t.interval(0.95, 2, loc=np.mean(acc["both"]), scale=sps.sem(acc["both"]))
    assert best["vs_best"] == "best" and best["test"] == pytest.approx(np.mean(acc["both"]))
    assert (best["test_low"], best["test_high"]) == pytest.approx((lo, hi))
    assert other["p_ttest"] == pytest.approx(sps.ttest_rel(acc["image"], acc["both"]).pvalue)
    # The bootstrap reads predictions_test.csv: the same numbers as on the sweep's in-memory predictions (6 digits).
    boot = paired_bootstrap([r[PREDS] for r in rows if r["config"] == "image"],
                            [r[PREDS] for r in rows if r["config"] == "both"], "accuracy", n_boot=300)
    assert other["vs_best"] == pytest.approx(boot["diff"]) and other["p_boot"] == pytest.approx(boot["p"])
    assert other["significant"] is True
    text = grouped_table(groups)
    assert "c1: toy/sweeps/sw/both_seed0" in text and "yes" in text
    assert grouped_table(groups, "csv").splitlines()[0].startswith("config,dataset,stores")
