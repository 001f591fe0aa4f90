"""`finetune run --init-head RUN`: the head starts from a `heads train` run of the same head and input shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmcache.data.base import load_dataset
from mmcache.data.demo import generate_demo
from mmcache.errors import MMCacheError
from mmcache.extract.runner import Request, extract
from mmcache.finetune.run import FinetuneConfig, finetune
from mmcache.heads.train import TrainConfig, train


@pytest.fixture(scope="module")
def head_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(demo folder, a `heads train` run on its cached clip-tiny features)."""
    root = tmp_path_factory.mktemp("init")
    demo = generate_demo(root / "demo", n=60, seed=4)
    ds = load_dataset("demo", demo)
    extract(ds, [Request("image", "clip", "clip-tiny"), Request("text", "clip", "clip-tiny")], cache_dir=root / "cache",
            num_workers=0, progress=False)
    res = train(TrainConfig(dataset="demo", modalities={"image": "clip", "text": "clip"}, cache_dir=str(root / "cache"),
                            runs_dir=str(root / "runs"), head_hparams={"D": 32}, epochs=3, run_name="h", quiet=True))
    assert res.run_dir is not None
    return demo, res.run_dir


def _cfg(demo: Path, tmp_path: Path, run: Path, **kw: object) -> FinetuneConfig:
    base = dict(dataset="demo", data_dir=str(demo), encoders={"image": "clip-tiny", "text": "clip-tiny"},
                runs_dir=str(tmp_path / "runs"), epochs=1, batch_size=16, num_workers=0, quiet=True, run_name="ft",
                init_head=str(run))
    base.update(kw)
    return FinetuneConfig(**base)  # type: ignore[arg-type]


def test_head_starts_from_the_run(head_run: tuple[Path, Path], tmp_path: Path) -> None:
    demo, run = head_run
    # Nothing trains (learning rates 0): the fine-tuned head's parameters are the run's.
    res = finetune(_cfg(demo, tmp_path, run, freeze_encoders=True, encoder_lr=0.0, lr=0.0))
    assert res is not None and res.head.name == "linear" and res.head.hparams["D"] == 32  # taken from the run
    got, want = load_file(str(Path(res.run_dir) / "model.safetensors")), load_file(str(run / "model.safetensors"))
    params = [k for k in want if "running_" not in k and "num_batches" not in k]
    assert params and all(torch.equal(got[k], want[k]) for k in params)
    assert res.config["init_head"] == str(run)


def test_a_different_head_is_refused_naming_the_difference(head_run: tuple[Path, Path], tmp_path: Path) -> None:
    demo, run = head_run
    with pytest.raises(MMCacheError, match=r"head hyperparameter D=32 in the run, 64 here"):
        finetune(_cfg(demo, tmp_path, run, head_hparams={"D": 64}))
    with pytest.raises(MMCacheError, match=r"the run's head is 'linear', this one 'gated'"):
        finetune(_cfg(demo, tmp_path, run, head="gated"))
    with pytest.raises(MMCacheError, match=r"reads image pooled of shape \[128\], these encoders give \[\d+\]"):
        finetune(_cfg(demo, tmp_path, run, encoders={"image": "resnet-tiny", "text": "clip-tiny"}))
    with pytest.raises(MMCacheError, match=r"reads text pooled of shape \[128\], these encoders give none"):
        finetune(_cfg(demo, tmp_path, run, encoders={"image": "clip-tiny"}))
    with pytest.raises(MMCacheError, match="head.json not found"):
        finetune(_cfg(demo, tmp_path, run, init_head=str(tmp_path)))
