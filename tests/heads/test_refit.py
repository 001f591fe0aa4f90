"""--refit trainval: the chosen epochs trained again on train + val, the last epoch evaluated on test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmcache.errors import MMCacheError
from mmcache.heads.train import TrainConfig, train, train_many
from tests.heads.conftest import build_cache


def cfg(tmp_path: Path, **kw) -> TrainConfig:  # type: ignore[no-untyped-def]
    base = dict(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(tmp_path / "cache"),
                runs_dir=str(tmp_path / "runs"), head="gated", head_hparams={"D": 8}, epochs=6, batch_size=32,
                lr=1e-2, device="cpu", quiet=True, save=False)
    return TrainConfig(**{**base, **kw})


def test_refit_trains_the_chosen_epochs_on_train_and_val(tmp_path: Path) -> None:
    build_cache(tmp_path / "cache", n=240)
    plain, refit = train_many([cfg(tmp_path), cfg(tmp_path, refit="trainval")])
    assert not isinstance(plain, MMCacheError) and not isinstance(refit, MMCacheError)
    rows = plain.config["resolved"]["rows"]
    assert refit.config["resolved"]["rows"]["train"] == rows["train"] + rows["val"]
    # The selection is the plain run's (same epochs, same value); the refit ran those epochs on train + val.
    assert refit.select["value"] == pytest.approx(plain.select["value"])
    assert refit.select["refit"] == "trainval" and refit.select["refit_epochs"] == plain.best_epoch
    assert refit.select["refit_rows"] == rows["train"] + rows["val"]
    assert not all(torch.equal(a, b) for a, b in zip(plain.head.state_dict().values(),
                                                     refit.head.state_dict().values(), strict=True))
    assert refit.metrics["test"]["label"]["n"] == plain.metrics["test"]["label"]["n"]


def test_refit_refusals(tmp_path: Path) -> None:
    build_cache(tmp_path / "cache", n=120)
    for kw, msg in (({"refit": "val"}, "the one refit is 'trainval'"),
                    ({"refit": "trainval", "solver": "lbfgs", "head": "linear", "head_hparams": {}}, "lbfgs"),
                    ({"refit": "trainval", "shots": 2}, "--shots")):
        with pytest.raises(MMCacheError, match=msg):
            train(cfg(tmp_path, **kw))
