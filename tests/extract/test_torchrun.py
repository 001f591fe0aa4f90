"""Two processes under torchrun (gloo, CPU) fill one store completely, with no duplicate rows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmcache.cache.store import StoreReader, store_path

from .conftest import N_DEMO


@pytest.mark.slow
def test_torchrun_two_ranks_complete_store(broken_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # A store already half full: ranks must only share out the missing rows.
    from mmcache.data import load_dataset
    from mmcache.extract.runner import Request, extract

    ds = load_dataset("demo", broken_root)
    extract(ds, [Request("text", "clip", "clip-tiny")], cache_dir=cache, limit=15, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mmcache.cli",
           "extract", "demo", "--data-dir", str(broken_root), "--cache-dir", str(cache), "--image", "clip=clip-tiny",
           "--text", "clip=clip-tiny", "--num-workers", "0", "--batch-size", "4", "--device", "cpu", "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    img = StoreReader(store_path(cache, "demo", "image", "clip"))
    txt = StoreReader(store_path(cache, "demo", "text", "clip"))
    assert len(txt.ids) == len(set(txt.ids)) == N_DEMO
    assert len(img.ids) == len(set(img.ids)) == N_DEMO - 3
    assert set(img.failed) == {"demo00001", "demo00002", "demo00003"}
    assert set(img.ids) | set(img.failed) == set(ds.ids())
    assert not list((cache / "demo" / "image").glob("*.part*"))  # parts merged and removed
    # One summary, from rank 0, counting both ranks' rows.
    assert sum(x.startswith("image/clip ") for x in res.stdout.splitlines()) == 1
    line = next(x for x in res.stdout.splitlines() if x.startswith("text/clip"))
    assert line.split()[1:4] == [str(N_DEMO - 15), "15", "0"]
    # Rows equal a single-process run.
    single = tmp_path / "single"
    extract(ds, [Request("image", "clip", "clip-tiny")], cache_dir=single, progress=False)
    ref = StoreReader(store_path(single, "demo", "image", "clip"))
    import numpy as np

    np.testing.assert_allclose(img.load(ref.ids)["pooled"].astype(float), ref.load()["pooled"].astype(float),
                               atol=2e-3)
