"""Run folders under faults: SIGKILL at random moments of `heads sweep --save-runs` and `finetune run` (also during
its first checkpoint), a full disk, and the same seed in two processes giving the same run (compared exactly: the
same CPU and kernels)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.heads.conftest import build_cache

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MMCACHE_THREADS": "1"}


def _cli(module: str, *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=300)


def _kill_at(cmd: list[str], seconds: float) -> int:
    """Start `cmd`, SIGKILL it after `seconds` (when still running); its exit code."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        p.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
    return p.returncode


def _check_listed(runs: Path) -> list[str]:
    """`heads runs` over `runs`: every run it lists is complete and loads; returns the listed names."""
    from mmcache.heads.train import load_run
    from mmcache.runfolder import missing_files
    from mmcache.runs import collect

    rows = collect(runs) if runs.is_dir() else []
    for r in rows:
        d = runs / r["run"]
        assert not missing_files(d, json.loads((d / "metrics.json").read_text())), d
        load_run(d)
    return [r["run"] for r in rows]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("faults") / "cache"
    build_cache(cache, n=200)
    return cache


@pytest.mark.slow
def test_sweep_killed_at_random_moments_leaves_only_complete_runs(toy: Path, tmp_path: Path) -> None:
    rng = random.Random(19)
    runs = tmp_path / "runs"
    survived = tried = 0
    for k in range(3):
        cmd = [sys.executable, "-m", "mmcache.heads.cli", "sweep", "--dataset", "toy", "--vtype", "feat", "--ttype",
               "feat", "--cache-dir", str(toy), "--runs-dir", str(runs), "--grid", "head=linear,gated;lr=0.01,0.003",
               "--epochs", "3", "--save-runs", "--out", str(tmp_path / f"s{k}"), "--no-progress"]
        code = _kill_at(cmd, rng.uniform(3.0, 9.0))
        tried += 1
        listed = _check_listed(runs)  # no traceback, only complete runs
        res = subprocess.run([sys.executable, "-m", "mmcache.heads.cli", "runs", "--runs-dir", str(runs)],
                             capture_output=True, text=True, env=ENV)
        assert res.returncode == 0, res.stderr
        assert all("Traceback" not in x for x in (res.stdout, res.stderr))
        # The same command again: it finishes, or (runs of the killed sweep finished) says so in one line.
        again = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
        err = again.stderr.strip().splitlines()
        assert again.returncode == 0 or (again.returncode == 2 and len(err) == 1 and "earlier sweep" in err[0]), \
            again.stderr
        survived += 1
        assert len(_check_listed(runs)) >= len(listed)
        print(f"kill {k}: exit {code}, {len(listed)} complete run(s) listed")
    assert survived == tried


def _demo(tmp_path: Path) -> Path:
    from mmcache.data.demo import generate_demo

    return generate_demo(tmp_path / "demo", n=40, seed=1)


def _finetune_cmd(demo: Path, runs: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mmcache.finetune.cli", "run", "--dataset", "demo", "--data-dir", str(demo),
            "--image", "clip-tiny", "--text", "clip-tiny", "--runs-dir", str(runs), "--epochs", "2",
            "--batch-size", "8", "--num-workers", "0", "--save-every", "1", "--run-name", "r", "--hp", "D=16", *extra]


@pytest.mark.slow
def test_finetune_killed_at_random_moments_continues_with_the_same_command(tmp_path: Path) -> None:
    from mmcache.finetune.checkpoint import CKPT_DIR

    demo = _demo(tmp_path)
    rng = random.Random(7)
    survived = tried = 0
    for k in range(3):
        runs = tmp_path / f"runs{k}"
        cmd = _finetune_cmd(demo, runs)
        _kill_at(cmd, rng.uniform(4.0, 12.0))
        tried += 1
        assert _check_listed(runs) in ([], ["demo/r"])
        res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
        if res.returncode == 2 and "already exists" in res.stderr:  # the kill came after the folder was written
            assert _check_listed(runs) == ["demo/r"]
        else:
            assert res.returncode == 0, res.stderr
        assert _check_listed(runs) == ["demo/r"] and not (runs / "demo" / "r" / CKPT_DIR).exists()
        survived += 1
    assert survived == tried


def test_finetune_killed_during_its_first_checkpoint_starts_again(tmp_path: Path) -> None:
    """What a kill inside the first checkpoint's write leaves (a temporary checkpoint folder, no latest.json): the
    same command starts the run again instead of refusing the folder."""
    from mmcache.finetune.checkpoint import CKPT_DIR

    demo = _demo(tmp_path)
    runs = tmp_path / "runs"
    part = runs / "demo" / "r" / CKPT_DIR / ".tmp-epoch1-step1-deadbeef"
    part.mkdir(parents=True)
    (part / "tensors.safetensors").write_bytes(b"\x10\x00")
    assert _check_listed(runs) == []
    res = _cli("mmcache.finetune.cli", *_finetune_cmd(demo, runs, "--epochs", "1")[3:])
    assert res.returncode == 0, res.stderr
    assert _check_listed(runs) == ["demo/r"] and not (runs / "demo" / "r" / CKPT_DIR).exists()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Path:
    disk = tmp_path / "disk"
    disk.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({res.stderr.strip() or res.returncode})")
    yield disk
    subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(toy: Path, tiny_disk: Path) -> None:
    runs = tiny_disk / "runs"
    res = _cli("mmcache.heads.cli", "train", "--dataset", "toy", "--vtype", "feat", "--cache-dir", str(toy),
               "--runs-dir", str(runs), "--run-name", "r", "--epochs", "2", "-q", "--hp", "D=512")
    err = [line for line in res.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert res.returncode == 2 and len(err) == 1 and "no space left" in err[0] and str(runs / "toy" / "r") in err[0], \
        res.stderr
    assert not (runs / "toy").exists() or not list((runs / "toy").iterdir())  # no run, no temporary folder, no lock
    assert _check_listed(runs) == []


def _metrics(run: Path) -> dict[str, object]:
    m = json.loads((run / "metrics.json").read_text())
    return {"splits": m["splits"], "best_epoch": m["best_epoch"], "select": m["select"]}


@pytest.mark.slow
def test_the_same_seed_gives_the_same_run_in_another_process(toy: Path, tmp_path: Path) -> None:
    """heads train, heads sweep and finetune run (VisualBERT over frcnn regions, then mmcache predict), each twice in
    separate processes: the metrics are equal, exactly."""
    got: dict[str, list[object]] = {}
    demo = _demo(tmp_path)
    for k in range(2):
        runs = tmp_path / f"runs{k}"
        res = _cli("mmcache.heads.cli", "train", "--dataset", "toy", "--vtype", "feat", "--ttype", "feat",
                   "--head", "gated", "--cache-dir", str(toy), "--runs-dir", str(runs), "--run-name", "t",
                   "--epochs", "3", "-q")
        assert res.returncode == 0, res.stderr
        got.setdefault("train", []).append(_metrics(runs / "toy" / "t"))
        res = _cli("mmcache.heads.cli", "sweep", "--dataset", "toy", "--vtype", "feat", "--cache-dir", str(toy),
                   "--runs-dir", str(runs), "--grid", "lr=0.01,0.003", "--epochs", "2", "--out",
                   str(runs / "sw"), "--no-progress")
        assert res.returncode == 0, res.stderr
        rows = json.loads((runs / "sw.json").read_text())
        kept = [{k: v for k, v in r.items() if k.startswith(("val_", "test_")) or k in ("config", "best_epoch")}
                for r in (rows["rows"] if isinstance(rows, dict) else rows)]
        got.setdefault("sweep", []).append(kept)
        cache = tmp_path / f"cache{k}"
        res = _cli("mmcache.cli", "extract", "demo", "--data-dir", str(demo), "--image", "frcnn=frcnn-tiny",
                   "--cache-dir", str(cache), "--no-progress")
        assert res.returncode == 0, res.stderr
        res = _cli("mmcache.finetune.cli", "run", "--dataset", "demo", "--data-dir", str(demo), "--text",
                   "visualbert-tiny", "--image-store", "frcnn", "--cache-dir", str(cache), "--runs-dir", str(runs),
                   "--run-name", "vb", "--epochs", "2", "--batch-size", "8", "--num-workers", "0", "-q")
        assert res.returncode == 0, res.stderr
        got.setdefault("finetune", []).append(_metrics(runs / "demo" / "vb"))
        res = _cli("mmcache.cli", "predict", "--run", str(runs / "demo" / "vb"), "--out", str(runs / "p.csv"),
                   "--num-workers", "0", "--no-progress")
        assert res.returncode == 0, res.stderr
        got.setdefault("predict", []).append((runs / "p.csv").read_text())
    for what, (a, b) in got.items():
        assert a == b, what
