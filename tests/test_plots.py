"""PNG plots: learning curves in every run folder, confusion matrices, the sweep comparison (size, labels, values)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmcache.heads.sweep import run_sweep
from mmcache.heads.train import TrainConfig, train
from mmcache.plots import plot_confusion, plot_curves, plot_sweep
from tests.heads.conftest import build_cache

MIN_PX = 600


def size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
        return im.size


def test_run_folder_plots(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    build_cache(cache, n=200)
    res = train(TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(cache),
                            runs_dir=str(tmp_path / "runs"), epochs=3, batch_size=64, head_hparams={"D": 8},
                            quiet=True, run_name="r"))
    for name in ("curves.png", "confusion_label.png"):
        w, h = size(res.run_dir / name)
        assert w >= MIN_PX and h >= MIN_PX, (name, w, h)


def test_curves_plot_axes_and_chosen_epoch(tmp_path: Path) -> None:
    curves = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "val_macro_f1": 0.5 + e / 20, "lr": 1e-3}
              for e in range(1, 6)]
    fig = plot_curves(curves, tmp_path / "c.png", "macro_f1", best=4, title="t")
    loss, metric = fig.axes
    assert (loss.get_xlabel(), loss.get_ylabel()) == ("epoch", "loss")
    assert (metric.get_xlabel(), metric.get_ylabel()) == ("epoch", "val macro_f1")
    assert [ln.get_label() for ln in loss.get_lines()] == ["train loss", "val loss", "chosen epoch (4)"]
    np.testing.assert_allclose(metric.get_lines()[0].get_ydata(), [r["val_macro_f1"] for r in curves])
    assert min(size(tmp_path / "c.png")) >= MIN_PX
    # the lbfgs probe: one point per L2 penalty on a log axis
    grid = [{"fit": i + 1, "l2": lam, "train_loss": 0.5, "val_loss": 0.6, "val_accuracy": 0.8}
            for i, lam in enumerate((1e-1, 1e-2, 1e-3))]
    fig = plot_curves(grid, tmp_path / "l.png", "accuracy", best=2)
    assert fig.axes[0].get_xlabel() == "L2 penalty" and fig.axes[0].get_xscale() == "log"


def test_confusion_shows_shares_and_counts(tmp_path: Path) -> None:
    cm = np.array([[5, 2, 0], [1, 7, 3], [0, 0, 0]])
    fig = plot_confusion(cm, ["negative", "neutral", "positive"], tmp_path / "m.png", "title")
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "true")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["negative", "neutral", "positive"]
    texts = {t.get_text() for t in ax.texts}
    assert {"0.71\n(5)", "0.29\n(2)", "0.64\n(7)", "0.00\n(0)"} <= texts  # row shares (an empty row: 0) and counts
    assert min(size(tmp_path / "m.png")) >= MIN_PX


def test_sweep_plot_next_to_its_tables(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    build_cache(cache, n=200)
    base = TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(cache),
                       runs_dir=str(tmp_path / "runs"), epochs=3, batch_size=64, lr=1e-2)
    out = tmp_path / "sweeps" / "s"
    run_sweep(base, [("D=4", {"D": 4}), ("D=8", {"D": 8})], seeds=[0, 1], out=out)
    assert min(size(out.with_suffix(".png"))) >= MIN_PX
    summary = [{"config": "a", "val_accuracy": 0.8, "val_accuracy_std": 0.05, "test_accuracy": 0.7},
               {"config": "b", "val_accuracy": 0.6, "val_accuracy_std": 0.01, "test_accuracy": 0.65}]
    fig = plot_sweep(summary, ["val_accuracy", "test_accuracy"], tmp_path / "p.png")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "config" and "mean ± std" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx([0.8, 0.6, 0.7, 0.65])  # grouped: one bar series per metric
    caps = [c for c in ax.containers if getattr(c, "has_yerr", False)]
    assert len(caps) == 2
