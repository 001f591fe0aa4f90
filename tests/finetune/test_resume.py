"""Checkpoints and resume of `finetune run`: a run killed at a random step continues to the same result."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mmcache.finetune.run as ft_run
from mmcache.data.demo import generate_demo
from mmcache.errors import MMCacheError
from mmcache.finetune.checkpoint import (
    CKPT_DIR,
    LATEST,
    from_tree,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    to_tree,
)
from mmcache.finetune.run import FinetuneConfig, finetune

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("resume") / "demo", n=90, seed=1)


def _cfg(demo_dir: Path, runs: Path, **kw: object) -> FinetuneConfig:
    base = dict(dataset="demo", data_dir=str(demo_dir), encoders={"image": "clip-tiny"}, runs_dir=str(runs),
                epochs=2, batch_size=16, num_workers=0, quiet=True, head_hparams={"D": 32}, encoder_lr=1e-3, run_name="r")
    base.update(kw)
    return FinetuneConfig(**base)  # type: ignore[arg-type]


def _assert_same_run(a: Path, b: Path, atol: float = 1e-5) -> None:
    """Same head and encoder weights, same curves and metrics (within float tolerance)."""
    for name in ("model.safetensors", "encoders.safetensors"):
        if not (a / name).exists():
            assert not (b / name).exists()
            continue
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys(), name
        for k in wa:
            assert torch.allclose(wa[k].float(), wb[k].float(), atol=atol), f"{name}: {k} differs"
    ca, cb = json.loads((a / "curves.json").read_text()), json.loads((b / "curves.json").read_text())
    assert len(ca) == len(cb)
    for ra, rb in zip(ca, cb, strict=True):
        for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
            assert ra[key] == pytest.approx(rb[key], abs=atol), (key, ra, rb)
    ma, mb = json.loads((a / "metrics.json").read_text()), json.loads((b / "metrics.json").read_text())
    assert ma["best_epoch"] == mb["best_epoch"]
    for split in ma["splits"]:
        for key in ("n", "accuracy", "macro_f1"):
            assert ma["splits"][split]["label"][key] == pytest.approx(mb["splits"][split]["label"][key], abs=atol)


def test_tree_round_trip_keeps_tuples_int_keys_and_tensors() -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": [{"torch": torch.get_rng_state(), "python": random.getstate()}],
             "best": None, "inf": float("inf")}
    tensors: dict[str, torch.Tensor] = {}
    tree = json.loads(json.dumps(to_tree(state, tensors)))  # what goes to disk is plain JSON
    back = from_tree(tree, tensors)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert set(back["optimizer"]["state"]) == {0, 1}
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert back["rng"][0]["python"] == random.getstate() and back["inf"] == float("inf")
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])  # torch takes it back
    tensors = {}
    clash = from_tree(to_tree({"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}}, tensors), tensors)
    assert clash["a.b"].item() == 1 and clash["a"]["b"].item() == 0


def test_checkpoint_write_is_atomic_and_replaces_the_previous(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = save_checkpoint(run, {"x": torch.ones(2), "n": 1}, "a")
    # A write killed half way leaves a temporary folder; latest.json still names the complete checkpoint.
    (run / CKPT_DIR / ".tmp-b-dead").mkdir()
    (run / CKPT_DIR / ".tmp-b-dead" / "tensors.safetensors").write_bytes(b"\x00" * 10)
    assert latest_checkpoint(run) == first
    assert load_checkpoint(first)["n"] == 1
    second = save_checkpoint(run, {"x": torch.zeros(2), "n": 2}, "b")
    assert latest_checkpoint(run) == second and not first.exists()
    assert sorted(p.name for p in (run / CKPT_DIR).iterdir()) == sorted([LATEST, second.name])
    assert sorted(p.name for p in second.iterdir()) == ["state.json", "tensors.safetensors"]  # nothing pickled
    assert torch.equal(load_checkpoint(second)["x"], torch.zeros(2))


class _Stop(Exception):
    pass


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, n: int) -> list[str]:
    """Make the run stop right after its n-th checkpoint is written (as a kill there would)."""
    tags: list[str] = []
    real = ft_run.save_checkpoint

    def save(run_dir: Path, state: dict, tag: str) -> Path:
        out = real(run_dir, state, tag)
        tags.append(tag)
        if len(tags) == n:
            raise _Stop(tag)
        return out

    monkeypatch.setattr(ft_run, "save_checkpoint", save)
    return tags


def test_full_finetune_resumes_mid_epoch_to_the_same_result(demo_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    kw = dict(grad_accum=2, save_every=1, epochs=2)  # 72 train rows: 5 batches, 3 steps per epoch
    ref = finetune(_cfg(demo_dir, runs, run_name="ref", **kw))
    tags = _interrupt_after(monkeypatch, 3)  # epoch 1: steps 1 and 2, its end; stop before epoch 2
    with pytest.raises(_Stop):
        finetune(_cfg(demo_dir, runs, **kw))
    assert tags == ["epoch1-step1", "epoch1-step2", "epoch1-end-step3"]
    monkeypatch.undo()
    ck = load_checkpoint(latest_checkpoint(runs / "demo" / "r"))  # type: ignore[arg-type]
    assert ck["progress"]["epoch"] == 2 and ck["progress"]["done"] == 0 and len(ck["curves"]) == 1
    assert ck["optimizer"]["state"], "optimizer moments are saved"
    # Stopped mid-epoch 2 (after its first step), then continued by rerunning the same command.
    tags = _interrupt_after(monkeypatch, 1)
    with pytest.raises(_Stop):
        finetune(_cfg(demo_dir, runs, **kw))
    assert tags == ["epoch2-step4"]
    ck = load_checkpoint(latest_checkpoint(runs / "demo" / "r"))  # type: ignore[arg-type]
    assert ck["progress"]["epoch"] == 2 and ck["progress"]["done"] == 32  # 2 batches of 16 trained
    monkeypatch.undo()
    res = finetune(_cfg(demo_dir, runs, **kw))
    assert ref is not None and res is not None
    _assert_same_run(ref.run_dir, res.run_dir)  # type: ignore[arg-type]
    assert not (res.run_dir / CKPT_DIR).exists()  # type: ignore[operator]  # a finished run keeps no checkpoint


def test_resume_refuses_other_options_and_missing_checkpoints(demo_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(_Stop):
        finetune(_cfg(demo_dir, runs, freeze_encoders=True))
    monkeypatch.undo()
    with pytest.raises(MMCacheError, match=r"other options \(epochs=2 there, 3 here\).*--overwrite"):
        finetune(_cfg(demo_dir, runs, freeze_encoders=True, epochs=3))
    with pytest.raises(MMCacheError, match="holds no checkpoint"):
        finetune(_cfg(demo_dir, runs, freeze_encoders=True, run_name="other", resume=True))
    # --resume without a name finds the newest run of the same options; --overwrite starts over.
    with pytest.raises(MMCacheError, match="no run folder .* holds a checkpoint"):
        finetune(_cfg(demo_dir, runs, freeze_encoders=True, run_name=None, resume=True))
    res = finetune(_cfg(demo_dir, runs, freeze_encoders=True, epochs=3, overwrite=True))
    assert res is not None and len(res.curves) == 3


def _tag_step(run: Path) -> int:
    try:
        tag = json.loads((run / CKPT_DIR / LATEST).read_text())["tag"]
    except (OSError, ValueError, KeyError):
        return 0
    return int(re.search(r"step(\d+)", tag).group(1))  # type: ignore[union-attr]


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """A real process (LoRA on both CLIP towers) killed with SIGKILL at a random step, then the same run again."""
    demo = generate_demo(tmp_path / "demo", n=50, seed=3)  # 43 train rows: 3 steps per epoch
    runs = tmp_path / "runs"
    cfg = dict(dataset="demo", data_dir=str(demo), encoders={"image": "clip-tiny", "text": "clip-tiny"}, lora=True,
               lora_r=4, epochs=2, batch_size=16, num_workers=0, head_hparams={"D": 32}, encoder_lr=1e-3, save_every=1,
               runs_dir=str(runs), quiet=True)
    ref = finetune(FinetuneConfig(**cfg, run_name="ref"))  # type: ignore[arg-type]
    assert ref is not None
    kill_at = random.Random().randint(1, 5)  # checkpoints at steps 1, 2, 3 (epoch end), 4, 5, 6 (the last)
    cmd = [sys.executable, "-m", "mmcache.finetune.cli", "run", "--dataset", "demo", "--data-dir", str(demo),
           "--image", "clip-tiny", "--text", "clip-tiny", "--lora", "--lora-r", "4", "--epochs", "2",
           "--batch-size", "16", "--num-workers", "0", "--D", "32", "--encoder-lr", "1e-3", "--save-every", "1",
           "--runs-dir", str(runs), "--run-name", "k"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    run = runs / "demo" / "k"
    deadline = time.monotonic() + 240
    while _tag_step(run) < kill_at and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before step {kill_at}: {err.decode()[-1500:]}"
    assert not (run / "metrics.json").exists() and latest_checkpoint(run) is not None
    # The same command again (here in-process) continues from the last complete checkpoint.
    res = finetune(FinetuneConfig(**cfg, run_name="k"))  # type: ignore[arg-type]
    assert res is not None and res.run_dir == run
    _assert_same_run(ref.run_dir, run)  # type: ignore[arg-type]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _torchrun(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
            "-m", "mmcache.finetune.cli", "run", *args]


@pytest.mark.slow
def test_torchrun_two_processes_resume_after_sigkill(tmp_path: Path) -> None:
    """A 2-process (gloo) run killed at a random step resumes on 2 processes to the uninterrupted run's result,
    and on 1 process to a finished run."""
    import shutil

    demo = generate_demo(tmp_path / "demo", n=50, seed=3)  # 43 train rows: 22 and 21 per rank, 3 batches of 8
    runs = tmp_path / "runs"
    args = ["--dataset", "demo", "--data-dir", str(demo), "--image", "clip-tiny", "--text", "clip-tiny", "--lora",
            "--lora-r", "4", "--epochs", "2", "--batch-size", "8", "--num-workers", "0", "--D", "32", "--encoder-lr", "1e-3",
            "--save-every", "1", "--runs-dir", str(runs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    ref = subprocess.run(_torchrun([*args, "--run-name", "ref"]), capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    kill_at = random.Random().randint(1, 4)  # checkpoints at steps 1, 2, 3 (epoch end), 4, 5, 6 (the last)
    proc = subprocess.Popen(_torchrun([*args, "--run-name", "k"]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    run = runs / "demo" / "k"
    deadline = time.monotonic() + 300
    while _tag_step(run) < kill_at and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # the launcher and both workers
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, err = proc.communicate(timeout=60)
    assert not (run / "metrics.json").exists(), f"the run ended before step {kill_at}: {err.decode()[-1500:]}"
    assert latest_checkpoint(run) is not None
    ck = load_checkpoint(latest_checkpoint(run))  # type: ignore[arg-type]
    assert ck["world"] == 2 and len(ck["rng"]) == 2  # every rank's random streams
    shutil.copytree(run, runs / "demo" / "one")
    res = subprocess.run(_torchrun([*args, "--run-name", "k"]), capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming" in res.stderr
    _assert_same_run(runs / "demo" / "ref", run)
    # The same checkpoint continued by one process: the schedule is re-planned, the run finishes.
    one = finetune(FinetuneConfig(dataset="demo", data_dir=str(demo), encoders={"image": "clip-tiny", "text": "clip-tiny"},
                                  lora=True, lora_r=4, epochs=2, batch_size=8, num_workers=0, head_hparams={"D": 32},
                                  encoder_lr=1e-3, save_every=1, runs_dir=str(runs), run_name="one", quiet=True))
    assert one is not None and [c["epoch"] for c in one.curves] == [1, 2]
    n_train = one.config["resolved"]["rows"]["train"]
    assert json.loads((runs / "demo" / "one" / "metrics.json").read_text())["train"]["samples"] == 2 * n_train


def test_where_and_how_a_run_goes_may_change_on_resume(demo_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(_Stop):
        finetune(_cfg(demo_dir, runs, freeze_encoders=True, save_every=1))
    monkeypatch.undo()
    res = finetune(_cfg(demo_dir, runs, freeze_encoders=True, save_every=0, device="cpu", track=None, quiet=True))
    assert res is not None and [c["epoch"] for c in res.curves] == [1, 2]
    from mmcache.finetune.run import RESUME_FREE

    assert {"num_workers", "device", "save_every", "track", "quiet"} <= set(RESUME_FREE)


def test_an_unnamed_run_says_how_to_continue_and_resume_finds_it(demo_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(_Stop):
        finetune(_cfg(demo_dir, runs, freeze_encoders=True, run_name=None, quiet=False))
    monkeypatch.undo()
    (run,) = (runs / "demo").iterdir()
    assert f"continue it with --run-name {run.name}" in capsys.readouterr().err
    res = finetune(_cfg(demo_dir, runs, freeze_encoders=True, run_name=None, resume=True))
    assert res is not None and res.run_dir == run and len(res.curves) == 2


def test_resume_config_check_across_versions(tmp_path: Path) -> None:
    """A checkpoint written before an option existed (absent there) continues when the option is at its
    default; an option this version no longer has is ignored; a real difference is named either way."""
    from dataclasses import replace

    from mmcache.finetune.run import FinetuneConfig, _resume_key, check_resume_config

    cfg = FinetuneConfig(dataset="demo", encoders={"image": "clip-tiny"}, epochs=2)
    older = {k: v for k, v in _resume_key(cfg).items() if k not in ("ema", "max_grad_norm")}
    check_resume_config({**older, "retired_option": 1}, cfg, tmp_path)
    with pytest.raises(MMCacheError, match=r"max_grad_norm=1.0 there, 0.5 here"):
        check_resume_config(older, replace(cfg, max_grad_norm=0.5), tmp_path)
    with pytest.raises(MMCacheError, match=r"contrastive_weight=0.5 there, 0.0 here"):
        check_resume_config({**_resume_key(cfg), "contrastive_weight": 0.5}, cfg, tmp_path)
