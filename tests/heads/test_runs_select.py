"""`heads runs --best` / `--sort val` never compare values of different selection metrics."""

from __future__ import annotations

from pathlib import Path

from mmcache.runs import best_per_group, collect, sort_rows
from tests.runfolders import write_complete_run


def fake_run(runs: Path, name: str, metric: str, value: float, test_accuracy: float = 0.5) -> None:
    write_complete_run(runs / "toy" / name,
                       {"dataset": "toy", "modalities": {"image": "feat"}, "head": "linear", "lr": 1e-3, "seed": 0,
                        "resolved": {"head_hparams": {"D": 8}}},
                       {"select": {"task": "label", "metric": metric, "value": value},
                        "splits": {"test": {"label": {"accuracy": test_accuracy}}}, "seconds": 1.0})


def test_best_keeps_one_run_per_selection_metric(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    fake_run(runs, "acc-low", "accuracy", 0.40)
    fake_run(runs, "acc-high", "accuracy", 0.60)
    fake_run(runs, "top2", "top2_accuracy", 0.90)  # a larger number of another metric: not "better accuracy"
    fake_run(runs, "loss-high", "loss", 1.30)  # a loss above every accuracy: not the best of anything
    fake_run(runs, "loss-low", "loss", 0.70)
    best = {r["run"]: r for r in best_per_group(collect(runs))}
    assert set(best) == {"toy/acc-high", "toy/top2", "toy/loss-low"}
    assert best["toy/acc-high"]["val"] == 0.60
    assert best["toy/loss-low"]["val"] == 0.70


def test_sort_val_groups_by_selection_metric_best_first(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    fake_run(runs, "acc-low", "accuracy", 0.40)
    fake_run(runs, "loss-high", "loss", 1.30)
    fake_run(runs, "acc-high", "accuracy", 0.60)
    fake_run(runs, "loss-low", "loss", 0.70)
    fake_run(runs, "auroc", "auroc", 0.80)
    order = [r["run"] for r in sort_rows(collect(runs), "val")]
    assert order == ["toy/acc-high", "toy/acc-low", "toy/auroc", "toy/loss-low", "toy/loss-high"]
