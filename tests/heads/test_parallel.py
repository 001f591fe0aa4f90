"""Data-parallel `heads train` under torchrun (2 gloo processes): each rank trains on its own rows of every batch,
gradients averaged; the run is close to the one-process run of the same config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmcache.heads.parallel import RankShard
from mmcache.heads.train import TrainConfig, train
from tests.heads.conftest import build_cache


def test_rank_shard_rows_cover_a_batch_once() -> None:
    idx = torch.arange(10, 21)
    parts = [RankShard(r, 3).rows(idx) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == idx.tolist()
    assert torch.equal(RankShard().rows(idx), idx) and RankShard(0, 3).min_batch() == 6


@pytest.mark.slow
@pytest.mark.parametrize("head, hp, load", [("gated", {"D": 8}, "stream"), ("linear", {"D": 0}, "memory")])
def test_heads_train_under_torchrun_is_data_parallel(tmp_path: Path, head: str, hp: dict[str, int], load: str) -> None:
    cache = tmp_path / "cache"
    build_cache(cache, n=400)
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mmcache.heads.cli", "train", "--dataset", "toy", "--cache-dir", str(cache), "--vtype", "feat",
           "--ttype", "feat", "--head", head, *(["--D", str(hp["D"])]), "--epochs", "20", "--batch-size", "64",
           "--lr", "1e-2", "--threads", "1", "--device", "cpu", "--runs-dir", str(runs), "--run-name", "ddp",
           "--load", load, "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = runs / "toy" / "ddp"
    config = json.loads((run / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2
    metrics = json.loads((run / "metrics.json").read_text())["splits"]
    assert len(list((runs / "toy").iterdir())) == 1  # one run folder, written by rank 0
    one = train(TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(cache),
                            head=head, head_hparams=hp, epochs=20, batch_size=64, lr=1e-2, device="cpu", quiet=True,
                            save=False))
    for split in ("val", "test"):
        got, want = metrics[split]["label"]["accuracy"], one.metrics[split]["label"]["accuracy"]
        assert got == pytest.approx(want, abs=0.06), (split, got, want)
        assert got > 0.8  # it learned the fusion, as the single process does
