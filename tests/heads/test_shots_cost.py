"""--shots K and the cost record / per-row test predictions every run keeps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmcache.errors import MMCacheError
from mmcache.heads.shots import shot_rows
from mmcache.heads.train import TrainConfig, train, train_many
from mmcache.stats import read_predictions
from tests.heads.conftest import build_cache


def cfg(tmp_path: Path, **kw) -> TrainConfig:  # type: ignore[no-untyped-def]
    base = dict(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(tmp_path / "cache"),
                runs_dir=str(tmp_path / "runs"), head_hparams={"D": 8}, epochs=3, batch_size=16, device="cpu",
                quiet=True)
    return TrainConfig(**{**base, **kw})


def test_shot_rows_take_k_per_class_nested_across_k() -> None:
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, -100, 0, 0])
    one, two = shot_rows(y, 1, seed=3, n_classes=3), shot_rows(y, 2, seed=3, n_classes=3)
    assert np.bincount(y[one], minlength=3).tolist() == [1, 1, 1]
    assert np.bincount(y[two], minlength=3).tolist() == [2, 2, 2]
    assert set(one) <= set(two)  # the same seed adds rows, it does not redraw them
    assert np.bincount(y[shot_rows(y, 4, 3, 3)], minlength=3).tolist() == [4, 3, 2]  # all a class has


def test_shots_train_on_k_rows_per_class_and_seeds_draw_others(tmp_path: Path) -> None:
    build_cache(tmp_path / "cache", n=300)
    r0, r1, full = train_many([cfg(tmp_path, shots=4, seed=0, save=False), cfg(tmp_path, shots=4, seed=1, save=False),
                               cfg(tmp_path, save=False)])
    assert not isinstance(r0, MMCacheError) and not isinstance(r1, MMCacheError) and not isinstance(full, MMCacheError)
    rows = r0.config["resolved"]["rows"]
    assert rows["train"] == 12 and rows["val"] == full.config["resolved"]["rows"]["val"]
    assert r0.config["shots"] == 4
    with pytest.raises(MMCacheError, match="--shots must be a whole number >= 0"):
        train(cfg(tmp_path, shots=-1))


def test_every_run_records_its_cost_and_test_predictions(tmp_path: Path) -> None:
    info = build_cache(tmp_path / "cache", n=200)
    res = train(cfg(tmp_path, head="gated"))
    cost = json.loads((res.run_dir / "metrics.json").read_text())["cost"]
    n_params = sum(p.numel() for p in res.head.parameters())
    assert cost["params"] == n_params and cost["fit_seconds"] == pytest.approx(res.fit_seconds)
    assert cost["peak_mem_mb"] > 1 and 0 < cost["infer_ms_per_row"] < 1000
    preds = read_predictions(res.run_dir)
    assert preds is not None and len(preds.ids) == int((info["split"] == "test").sum())
    acc = float((preds.prob.argmax(1) == preds.y).mean())
    assert acc == pytest.approx(res.metrics["test"]["label"]["accuracy"])
