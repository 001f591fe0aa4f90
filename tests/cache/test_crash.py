"""SIGKILL a real writer process at random points, then resume: the store must equal a clean run bit for bit."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mmcache.cache import StoreReader
from tests.cache import store_writer as w

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("store_writer.py")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _snapshot(path: Path) -> tuple[list[str], dict[str, str], dict[str, np.ndarray]]:
    r = StoreReader(path)
    return r.ids, r.failed, r.load()


def _assert_prefix(killed: Path, clean: tuple[list[str], dict[str, str], dict[str, np.ndarray]]) -> int:
    """A killed store opens, and every committed row equals the clean run's row (no torn rows)."""
    ids, failed, arrays = _snapshot(killed)
    n = len(ids)
    assert ids == clean[0][:n]
    assert all(clean[1][k] == v for k, v in failed.items())
    for k, v in arrays.items():
        assert v.tobytes() == clean[2][k][:n].tobytes(), k
    return n


def _assert_equal(path: Path, clean: tuple[list[str], dict[str, str], dict[str, np.ndarray]]) -> None:
    ids, failed, arrays = _snapshot(path)
    assert ids == clean[0]
    assert failed == clean[1]
    assert arrays.keys() == clean[2].keys()
    for k in arrays:
        assert arrays[k].dtype == clean[2][k].dtype
        assert arrays[k].tobytes() == clean[2][k].tobytes(), f"{k} differs from the clean run"


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[tuple[list[str], dict[str, str], dict[str, np.ndarray]],
                                                            int]:
    path = tmp_path_factory.mktemp("clean") / "toy" / "image" / "toy.h5"
    events = w.count_events(path)
    snap = _snapshot(path)
    assert len(snap[0]) == sum(not w.is_broken(i) for i in range(w.N))
    assert len(snap[1]) == sum(w.is_broken(i) for i in range(w.N))
    return snap, events


@pytest.mark.timeout(120)
def test_sigkill_at_random_io_step_then_resume(clean: tuple, tmp_path: Path) -> None:
    snap, events = clean
    rng = random.Random(int(time.time()))
    # Always include the first rename (the file's creation); the rest are random steps.
    points = [1, *rng.sample(range(2, events + 1), 2)]
    for k in points:
        path = tmp_path / f"k{k}" / "toy" / "image" / "toy.h5"
        res = subprocess.run([sys.executable, str(SCRIPT), str(path), "--kill-at", str(k)], env=_env(),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == -signal.SIGKILL, (k, res.stderr)
        if path.exists():
            _assert_prefix(path, snap)
        w.run(path)  # the rerun resumes
        _assert_equal(path, snap)


@pytest.mark.timeout(120)
def test_sigkill_at_random_time_then_resume(clean: tuple, tmp_path: Path) -> None:
    snap, _ = clean
    rng = random.Random(int(time.time()) + 1)
    for t in range(2):
        path = tmp_path / f"t{t}" / "toy" / "image" / "toy.h5"
        proc = subprocess.Popen([sys.executable, str(SCRIPT), str(path)], env=_env(), stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.8))  # a clean run takes about 1 s here
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if path.exists():
            _assert_prefix(path, snap)
        w.run(path)
        _assert_equal(path, snap)
