"""SIGKILL the real `mmcache extract` mid-run, rerun the extraction: the store equals a clean run bit for bit."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmcache.cache import StoreReader, store_path, verify_store
from mmcache.errors import MMCacheError

pytest.importorskip("mmcache.extract.runner")
torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
N, BATCH = 32, 4


def args(data: Path, cache: Path) -> list[str]:
    return ["extract", "demo", "--data-dir", str(data), "--cache-dir", str(cache), "--image", "clip=clip-tiny",
            "--batch-size", str(BATCH), "--num-workers", "0", "--limit", str(N), "--no-progress"]


@pytest.fixture
def one_thread() -> Iterator[None]:
    # Same thread count in this process and in the killed one, so both compute the same bits.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run_here(data: Path, cache: Path, ext: object) -> None:
    """The same extraction as the CLI's, in this process, with an extractor built once (building is slow)."""
    from mmcache.data import load_dataset
    from mmcache.extract.runner import Request, extract

    extract(load_dataset("demo", data), [Request("image", "clip", "clip-tiny")], cache_dir=cache,
            batch_size=BATCH, num_workers=0, limit=N, progress=False, extractors=[ext])


@pytest.mark.timeout(240)
def test_sigkill_real_extraction_then_resume(tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmcache.data.demo import generate_demo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from mmcache.extract.base import build_extractor

    data = generate_demo(tmp_path / "data", n=40, seed=0)
    ext = build_extractor("clip-tiny", "image")
    run_here(data, tmp_path / "clean", ext)
    clean = StoreReader(store_path(tmp_path / "clean", "demo", "image", "clip"))
    assert len(clean) == N
    want = clean.load()

    cache = tmp_path / "killed"
    path = store_path(cache, "demo", "image", "clip")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mmcache.cli", *args(data, cache)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    rows = 0
    while rows < BATCH and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
        try:
            rows = len(StoreReader(path)) if path.exists() else 0
        except MMCacheError:
            rows = 0  # a reader may race the file's creation; only committed rows count
    time.sleep(random.uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed = StoreReader(path)  # opens after the kill, and what it holds is a prefix of the clean run
    n = len(killed)
    assert 0 < n and killed.ids == clean.ids[:n]
    for k, v in killed.load().items():
        assert v.tobytes() == want[k][:n].tobytes()

    run_here(data, cache, ext)  # the rerun resumes
    got = StoreReader(path)
    assert got.ids == clean.ids and got.failed == clean.failed
    for k, v in got.load().items():
        assert v.tobytes() == want[k].tobytes(), f"{k} differs from the clean run (killed after {n} rows)"
    assert verify_store(path).ok
