"""End-to-end fine-tuning of live encoders with a head: full, LoRA, frozen; errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmcache.data.demo import generate_demo
from mmcache.errors import MMCacheError
from mmcache.extract.base import build_extractor
from mmcache.finetune.run import FinetuneConfig, finetune


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("ft") / "demo", n=90, seed=1)


def _cfg(demo_dir: Path, tmp_path: Path, **kw: object) -> FinetuneConfig:
    base = dict(dataset="demo", data_dir=str(demo_dir), encoders={"image": "clip-tiny", "text": "clip-tiny"},
                runs_dir=str(tmp_path / "runs"), epochs=2, batch_size=16, num_workers=0, quiet=True,
                head_hparams={"D": 32}, encoder_lr=1e-3, run_name="r")
    base.update(kw)
    return FinetuneConfig(**base)  # type: ignore[arg-type]


def test_full_finetune_changes_encoder_weights_and_writes_run(demo_dir: Path, tmp_path: Path) -> None:
    res = finetune(_cfg(demo_dir, tmp_path))
    d = Path(res.run_dir)
    for name in ("model.safetensors", "head.json", "config.json", "metrics.json", "encoders.safetensors",
                 "curves.csv", "confusion_label.png"):
        assert (d / name).exists(), name
    metrics = json.loads((d / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"val", "test"}
    assert 0.0 <= metrics["splits"]["test"]["label"]["accuracy"] <= 1.0
    assert metrics["best_epoch"] in (1, 2)
    trained = load_file(str(d / "encoders.safetensors"))
    init = build_extractor("clip-tiny", "image").state_dict()
    key = next(k for k in trained if k.startswith("image.") and k.endswith("conv1.weight"))
    # Same deterministic init as the preset, moved by training.
    assert not torch.allclose(trained[key].float(), init[key.removeprefix("image.")].float())
    # Every split row was evaluated once (ids aligned across towers).
    assert metrics["splits"]["val"]["label"]["n"] > 0


def test_lora_trains_only_adapters(demo_dir: Path, tmp_path: Path) -> None:
    res = finetune(_cfg(demo_dir, tmp_path, lora=True, lora_r=4, epochs=1, grad_accum=2))
    enc = load_file(str(Path(res.run_dir) / "encoders.safetensors"))
    assert enc, "LoRA adapters must be saved"
    assert all("lora_" in k for k in enc)
    # B starts at zero in LoRA; training moves it.
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in enc.items())


def test_frozen_encoders_save_head_only(demo_dir: Path, tmp_path: Path) -> None:
    res = finetune(_cfg(demo_dir, tmp_path, freeze_encoders=True, epochs=1))
    d = Path(res.run_dir)
    assert (d / "model.safetensors").exists() and not (d / "encoders.safetensors").exists()
    # `heads predict` reads cached features: a finetune run gets a clear error, not a traceback.
    from mmcache.heads.train import predict

    with pytest.raises(MMCacheError, match="not a `heads train` run"):
        predict(d)


def test_encoders_are_named_as_extract_names_stores(demo_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`NAME=PRESET[key=value,...]` as in `mmcache extract` (and its offline hints); a weights path never nests folders."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    weights = tmp_path / "models" / "clip.bin"
    weights.parent.mkdir()
    import open_clip

    from mmcache.extract.clip import TINY_CLIP_CFG

    torch.save(open_clip.model.CLIP(**TINY_CLIP_CFG).state_dict(), weights)
    res = finetune(_cfg(demo_dir, tmp_path, freeze_encoders=True, epochs=1, limit=16, run_name=None,
                        encoders={"image": f"img=clip-tiny[weights={weights},tokens=false]", "text": "clip-tiny"}))
    d = Path(res.run_dir)
    assert d.parent == tmp_path / "runs" / "demo" and d.name.startswith("finetune_linear_image-img+text-clip-tiny_")
    config = json.loads((d / "config.json").read_text())
    assert json.dumps(config).count(str(weights)) >= 1  # the full encoder string is kept in the run's config
    with pytest.raises(MMCacheError, match="unknown option 'tokenz'"):
        finetune(_cfg(demo_dir, tmp_path, encoders={"image": "clip-tiny[tokenz=false]"}))
    with pytest.raises(MMCacheError, match="one encoder per modality"):
        finetune(_cfg(demo_dir, tmp_path, encoders={"image": "clip-tiny,resnet-tiny"}))


def test_bad_lora_targets_is_a_user_error(demo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(MMCacheError, match="match no Linear"):
        finetune(_cfg(demo_dir, tmp_path, lora=True, lora_targets=["no_such_layer"]))


def test_no_encoders_is_a_user_error(demo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(MMCacheError, match="at least one encoder"):
        finetune(_cfg(demo_dir, tmp_path, encoders={}))


def test_torchrun_two_processes_ddp(demo_dir: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "mmcache.finetune.cli", "run", "--dataset", "demo", "--data-dir", str(demo_dir),
           "--image", "clip-tiny", "--text", "clip-tiny", "--epochs", "1", "--batch-size", "16",
           "--num-workers", "0", "--lora", "--runs-dir", str(tmp_path / "runs"), "--run-name", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    d = tmp_path / "runs" / "demo" / "ddp"
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["splits"]["test"]["label"]["n"] > 0
    # Only rank 0 writes the run; the LoRA adapters it saves are the trained (DDP-synchronised) ones.
    enc = load_file(str(d / "encoders.safetensors"))
    assert enc and all("lora_" in k for k in enc)
    assert "2 process(es)" in res.stderr


def test_metrics_report_parameters_throughput_and_memory(demo_dir: Path, tmp_path: Path) -> None:
    res = finetune(_cfg(demo_dir, tmp_path, lora=True, lora_r=4, epochs=1, limit=32))
    train = json.loads((Path(res.run_dir) / "metrics.json").read_text())["train"]
    assert 0 < train["trainable_params"] < train["total_params"]
    assert train["samples"] == 32 and train["samples_per_s"] > 0 and train["peak_memory_bytes"] > 0
    assert train["world_size"] == 1 and train["device"] == "cpu"


def test_gradients_are_clipped_by_default(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params: object, max_norm: float, *a: object, **k: object) -> torch.Tensor:
        calls.append(max_norm)
        return real(params, max_norm, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    finetune(_cfg(demo_dir, tmp_path, encoders={"image": "clip-tiny"}, epochs=1, limit=32, run_name="a"))
    assert calls == [1.0, 1.0]  # two steps of 16
    calls.clear()
    finetune(_cfg(demo_dir, tmp_path, encoders={"image": "clip-tiny"}, epochs=1, limit=32, run_name="b",
                  max_grad_norm=0.0))
    assert calls == []


def test_grad_checkpointing_gives_the_same_training(demo_dir: Path, tmp_path: Path) -> None:
    from mmcache.finetune.run import enable_grad_checkpointing

    enc = build_extractor("clip-tiny", "image")
    enable_grad_checkpointing(enc)
    assert enc.model.visual.transformer.grad_checkpointing is True
    text = build_extractor("clip-tiny", "text")
    enable_grad_checkpointing(text)
    assert text.model.transformer.grad_checkpointing is True
    kw = dict(encoders={"image": "clip-tiny"}, epochs=1, limit=32)
    a = finetune(_cfg(demo_dir, tmp_path, run_name="plain", **kw))
    b = finetune(_cfg(demo_dir, tmp_path, run_name="ckpt", grad_checkpointing=True, **kw))
    wa, wb = (load_file(str(Path(r.run_dir) / "encoders.safetensors")) for r in (a, b))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    with pytest.raises(MMCacheError, match="has no gradient checkpointing"):
        finetune(_cfg(demo_dir, tmp_path, run_name="rn", encoders={"image": "resnet-tiny"}, grad_checkpointing=True))


def test_full_finetune_saves_batchnorm_statistics(demo_dir: Path, tmp_path: Path) -> None:
    res = finetune(_cfg(demo_dir, tmp_path, encoders={"image": "resnet-tiny"}, epochs=1, limit=32))
    enc = load_file(str(Path(res.run_dir) / "encoders.safetensors"))
    init = build_extractor("resnet-tiny", "image").state_dict()
    assert "image.model.bn1.running_mean" in enc
    assert not torch.allclose(enc["image.model.bn1.running_mean"], init["model.bn1.running_mean"])
