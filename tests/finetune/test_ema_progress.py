"""`finetune run` on the engine's weight averaging, logit adjustment and per-step training progress."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmcache.data.demo import generate_demo
from mmcache.finetune.run import FinetuneConfig, finetune
from mmcache.heads.losses import Criterion


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("ft") / "demo", n=60, seed=1)


def _cfg(demo_dir: Path, tmp_path: Path, **kw: object) -> FinetuneConfig:
    base = dict(dataset="demo", data_dir=str(demo_dir), encoders={"image": "clip-tiny", "text": "clip-tiny"},
                runs_dir=str(tmp_path / "runs"), epochs=2, batch_size=16, num_workers=0, quiet=True,
                head_hparams={"D": 8}, encoder_lr=1e-3, lr=3e-2, run_name="r", freeze_encoders=True)
    base.update(kw)
    return FinetuneConfig(**base)  # type: ignore[arg-type]


def test_ema_weights_are_evaluated_and_saved(demo_dir: Path, tmp_path: Path) -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    seen: list[list[torch.Tensor]] = []

    def pre(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        if not seen:
            seen.append([p.detach().clone() for p in opt.param_groups[0]["params"]])

    def post(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        seen.append([p.detach().clone() for p in opt.param_groups[0]["params"]])

    hooks = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    try:
        res = finetune(_cfg(demo_dir, tmp_path, ema=0.8))
    finally:
        for h in hooks:
            h.remove()
    spe = (len(seen) - 1) // 2
    ema = seen[0]
    for t in range(1, res.best_epoch * spe + 1):
        ema = [0.8 * e + 0.2 * p for e, p in zip(ema, seen[t], strict=True)]
    saved = load_file(str(Path(res.run_dir) / "model.safetensors"))
    names = [n for n, p in res.head.named_parameters() if p.requires_grad]
    for n, want in zip(names, ema, strict=True):
        torch.testing.assert_close(saved[n], want, rtol=1e-5, atol=1e-6, msg=n)
    assert json.loads((Path(res.run_dir) / "config.json").read_text())["ema"] == 0.8


def test_progress_reaches_the_loss_every_step_and_kd_ramps_per_step(demo_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int, int, float]] = []
    real = Criterion.set_progress

    def spy(self: Criterion, progress: object) -> None:
        real(self, progress)  # type: ignore[arg-type]
        seen.append((progress.epoch, progress.step, progress.total_steps,  # type: ignore[attr-defined]
                     self.kd_weight(*self.progress)))

    monkeypatch.setattr(Criterion, "set_progress", spy)
    finetune(_cfg(demo_dir, tmp_path, loss_options={"kd_lambda": 0.4, "kd_warmup": 4, "kd_warmup_unit": "step"}))
    steps = [s for _, s, _, _ in seen]
    assert steps == list(range(len(steps))) and len(steps) >= 4  # one call per step, in order
    total = seen[0][2]
    assert total == len(steps) and [e for e, *_ in seen] == [s // (total // 2) for s in steps]
    np.testing.assert_allclose([w for *_, w in seen], [0.4 * min(1.0, s / 4) for s in steps])


def test_logit_adjustment_is_recorded_and_applied(demo_dir: Path, tmp_path: Path) -> None:
    res = finetune(_cfg(demo_dir, tmp_path, logit_adjust=2.0, epochs=1))
    resolved = json.loads((Path(res.run_dir) / "config.json").read_text())["resolved"]
    from mmcache.data.base import load_dataset

    ds = load_dataset("demo", str(demo_dir))
    y = [s.labels["label"] for s in ds.samples if s.split == "train"]
    prior = np.bincount(y, minlength=3) / len(y)
    assert resolved["logit_adjust"]["tau"] == 2.0
    np.testing.assert_allclose(resolved["logit_adjust"]["offsets"]["label"], 2.0 * np.log(prior))


def test_a_run_with_ema_resumes_to_the_same_result(demo_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from .test_resume import _assert_same_run, _interrupt_after, _Stop

    runs = tmp_path / "runs"
    kw = dict(save_every=1, epochs=2, ema=0.7, run_name="r", runs_dir=str(runs))
    ref = finetune(_cfg(demo_dir, tmp_path, **{**kw, "run_name": "ref"}))
    _interrupt_after(monkeypatch, 3)  # mid epoch 1: the averages so far live in the checkpoint
    with pytest.raises(_Stop):
        finetune(_cfg(demo_dir, tmp_path, **kw))
    monkeypatch.undo()
    res = finetune(_cfg(demo_dir, tmp_path, **kw))
    assert ref is not None and res is not None
    _assert_same_run(ref.run_dir, res.run_dir)  # type: ignore[arg-type]


def test_cli_flags(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from mmcache.finetune.cli import main

    runs = tmp_path / "runs"
    monkeypatch.setattr(sys, "argv", [
        "finetune", "run", "--dataset", "demo", "--data-dir", str(demo_dir), "--image", "clip-tiny", "--epochs", "1",
        "--batch-size", "16", "--num-workers", "0", "--freeze-encoders", "--runs-dir", str(runs), "--run-name", "c",
        "--ema", "0.5", "--logit-adjust", "1", "--loss-opt", "kd_warmup_unit=step", "--loss-opt", "kd_warmup=3"])
    try:
        main()
    except SystemExit as e:
        assert not e.code
    cfg = json.loads((runs / "demo" / "c" / "config.json").read_text())
    assert cfg["ema"] == 0.5 and cfg["logit_adjust"] == 1.0
    assert cfg["loss_options"] == {"kd_warmup_unit": "step", "kd_warmup": 3}


def test_scabg_reference_recipe_fine_tunes_with_its_schedules(demo_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference recipe (per-step warm-ups, late decay, gradient-reversal ramp) runs in `finetune run`, its
    validation loss taken on the task logits alone, and the reversal strength follows the step."""
    import mmcache.heads.scabg as scabg

    seen: list[float] = []
    real = scabg.grad_reverse

    def spy(x: torch.Tensor, strength: float) -> torch.Tensor:
        if torch.is_grad_enabled():
            seen.append(strength)
        return real(x, strength)

    monkeypatch.setattr(scabg, "grad_reverse", spy)
    hp = {"D": 16, "out_dim": 8, "heads": 2, "branch_heads": 2, "queries": 2, "grl": 0.3, "grl_warmup": 3}
    res = finetune(_cfg(demo_dir, tmp_path, head="scabg-ref", head_hparams=hp, loss="scabg",
                        loss_options={"variant": "reference"}))
    assert all(np.isfinite(c["val_loss"]) for c in res.curves)
    np.testing.assert_allclose(seen, [0.3 * min(1.0, s / 3) for s in range(len(seen))])
    assert len(seen) >= 4
    assert res.config["resolved"]["logit_adjust"]["tau"] == -1.0  # the reference adds log p(y) at evaluation
