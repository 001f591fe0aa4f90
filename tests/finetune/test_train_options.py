"""`finetune run` options: epoch-end checkpoints on or off, train-time image augmentation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import mmcache.finetune.run as ft_run
from mmcache.data.demo import generate_demo
from mmcache.errors import MMCacheError
from mmcache.extract import build_extractor
from mmcache.extract.clip import ClipExtractor
from mmcache.finetune.checkpoint import CKPT_DIR, latest_checkpoint, load_checkpoint
from mmcache.finetune.run import FinetuneConfig, finetune
from tests.finetune.test_resume import _assert_same_run, _interrupt_after, _Stop


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("options") / "demo", n=90, seed=1)


def _cfg(demo_dir: Path, runs: Path, **kw: object) -> FinetuneConfig:
    base = dict(dataset="demo", data_dir=str(demo_dir), encoders={"image": "clip-tiny"}, runs_dir=str(runs),
                epochs=3, batch_size=16, num_workers=0, quiet=True, head_hparams={"D": 32}, encoder_lr=1e-3, run_name="r",
                freeze_encoders=True)
    base.update(kw)
    return FinetuneConfig(**base)  # type: ignore[arg-type]


def _record(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    tags: list[str] = []
    real = ft_run.save_checkpoint

    def save(run_dir: Path, state: dict, tag: str) -> Path:
        tags.append(tag)
        return real(run_dir, state, tag)

    monkeypatch.setattr(ft_run, "save_checkpoint", save)
    return tags


def test_no_epoch_checkpoint_writes_only_the_last_epoch_end(demo_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    tags = _record(monkeypatch)
    finetune(_cfg(demo_dir, runs, run_name="every"))  # 72 train rows: 5 steps per epoch
    assert tags == ["epoch1-end-step5", "epoch2-end-step10", "epoch3-end-step15"]
    tags.clear()
    finetune(_cfg(demo_dir, runs, run_name="last", epoch_checkpoint=False))
    assert tags == ["epoch3-end-step15"]
    tags.clear()
    # Step checkpoints (every 4 steps of an epoch) go on.
    finetune(_cfg(demo_dir, runs, run_name="steps", epoch_checkpoint=False, save_every=4, epochs=2))
    assert tags == ["epoch1-step4", "epoch2-step9", "epoch2-end-step10"]
    tags.clear()
    # Early stopping ends the run at an epoch end, which is then written.
    monkeypatch.setattr(ft_run.Selector, "update", _stop_after_epoch_2)
    res = finetune(_cfg(demo_dir, runs, run_name="early", epoch_checkpoint=False, epochs=5, early_stopping=1))
    assert res is not None and len(res.curves) == 2 and tags == ["epoch2-end-step10"]


def _stop_after_epoch_2(self: ft_run.Selector, epoch: int, value: float, state: Any) -> bool:
    """A selector that keeps epoch 1 and stops early after epoch 2."""
    if epoch == 1:
        self.best_value, self.best_epoch, self.best_state = value, 1, state()
    self.stopped = epoch >= 2
    return epoch == 1


def test_without_epoch_checkpoints_the_final_state_still_resumes_to_the_same_result(
        demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    ref = finetune(_cfg(demo_dir, runs, run_name="ref", epochs=2))
    # Killed after its last epoch's checkpoint, before the run folder is written.
    tags = _interrupt_after(monkeypatch, 1)
    with pytest.raises(_Stop):
        finetune(_cfg(demo_dir, runs, epochs=2, epoch_checkpoint=False))
    assert tags == ["epoch2-end-step10"]
    monkeypatch.undo()
    ck = load_checkpoint(latest_checkpoint(runs / "demo" / "r"))  # type: ignore[arg-type]
    assert ck["progress"]["epoch"] == 3 and len(ck["curves"]) == 2
    tags = _record(monkeypatch)
    # The flag may change on resume (it decides where a run checkpoints, not what it computes).
    res = finetune(_cfg(demo_dir, runs, epochs=2, epoch_checkpoint=True))
    assert tags == [], "nothing left to train"
    assert ref is not None and res is not None and [c["epoch"] for c in res.curves] == [1, 2]
    _assert_same_run(ref.run_dir, res.run_dir)  # type: ignore[arg-type]
    assert not (res.run_dir / CKPT_DIR).exists()  # type: ignore[operator]
    assert "epoch_checkpoint" in ft_run.RESUME_FREE


def test_augment_draws_views_only_while_training_and_keeps_the_spec(demo_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    real = ClipExtractor.preprocess

    def spy(self: ClipExtractor, decoded: dict) -> object:
        if self.modality == "image":
            calls.append(self.augmenting)
        return real(self, decoded)

    monkeypatch.setattr(ClipExtractor, "preprocess", spy)
    res = finetune(_cfg(demo_dir, tmp_path / "runs", encoders={"image": "clip-tiny[augment=true]"}, epochs=1,
                        freeze_encoders=False, limit=32))
    assert res is not None
    config = json.loads((res.run_dir / "config.json").read_text())
    rows = config["resolved"]["rows"]
    # Training rows are augmented (32); the shape probe (4 rows), validation (the epoch's and the final one) and
    # test never are.
    assert calls.count(True) == 32 and calls.count(False) == 4 + 2 * rows["val"] + rows["test"]
    assert config["encoders"]["image"] == "clip-tiny[augment=true]"
    assert config["resolved"]["specs"]["image"] == build_extractor("clip-tiny", "image").spec
    with pytest.raises(MMCacheError, match="augment=true augments what a training encoder sees.*--freeze-encoders"):
        finetune(_cfg(demo_dir, tmp_path / "runs", encoders={"image": "clip-tiny[augment=true]"}, run_name="f"))

