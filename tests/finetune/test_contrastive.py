"""`finetune run --contrastive-weight`: CLIP's symmetric InfoNCE on the pooled image/text embeddings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mmcache.finetune.run as ft_run
from mmcache.data import load_dataset
from mmcache.data.demo import generate_demo
from mmcache.errors import MMCacheError
from mmcache.extract import build_extractor
from mmcache.finetune.checkpoint import latest_checkpoint, load_checkpoint
from mmcache.finetune.run import FinetuneConfig, LiveModel, finetune
from mmcache.heads.base import build_head
from mmcache.heads.losses import ContrastiveLoss
from tests.finetune.test_resume import _assert_same_run, _interrupt_after, _Stop


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("contrastive") / "demo", n=90, seed=1)


def num(t: object) -> float:
    """A scalar tensor (detached: no autograd warning) or number as a float."""
    return float(t.detach() if isinstance(t, torch.Tensor) else t)  # type: ignore[arg-type]


def _cfg(demo_dir: Path, runs: Path, **kw: object) -> FinetuneConfig:
    base = dict(dataset="demo", data_dir=str(demo_dir), encoders={"image": "clip-tiny", "text": "clip-tiny"},
                runs_dir=str(runs), epochs=2, batch_size=16, num_workers=0, quiet=True, head_hparams={"D": 32},
                encoder_lr=1e-3, run_name="r")
    base.update(kw)
    return FinetuneConfig(**base)  # type: ignore[arg-type]


def _reference(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """By hand: cosine similarities times the scale, cross-entropy of each row (image->text) and column."""
    sim = scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()
    target = torch.arange(len(a))
    return (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2


def _live_batch(demo_dir: Path, n: int = 6) -> tuple[LiveModel, dict, list, dict[str, torch.Tensor]]:
    """A clip-tiny LiveModel with a contrastive loss, one fixed batch of demo rows, and its pooled embeddings."""
    ds = load_dataset("demo", demo_dir)
    rows = ds.split("train")[:n]
    encoders = {m: build_extractor("clip-tiny", m) for m in ("image", "text")}
    batches = {"image": torch.stack([encoders["image"].preprocess({"image": Image.open(s.image).convert("RGB")})
                                     for s in rows]),
               "text": torch.stack([encoders["text"].preprocess({"text": s.text}) for s in rows])}
    with torch.no_grad():
        pooled = {m: encoders[m](batches[m])["pooled"].float() for m in encoders}
    head = build_head("linear", {m: {"pooled": (128,)} for m in encoders}, {"label": 3}, {"D": 16})
    model = LiveModel(encoders, head, None, ContrastiveLoss(128, 128), ("image", "text"))
    return model, batches, rows, pooled


def test_the_loss_equals_a_reference_computation_on_a_fixed_batch(demo_dir: Path) -> None:
    model, batches, rows, pooled = _live_batch(demo_dir)
    keep = torch.ones(len(rows), dtype=torch.bool)
    logits, loss = model(batches, [s.id for s in rows], keep=keep)
    assert logits["label"].shape == (len(rows), 3)
    # CLIP's initial temperature 0.07: the scale is 1/0.07.
    assert num(model.contrastive.scale) == pytest.approx(1 / 0.07, rel=1e-6)
    want = _reference(pooled["image"], pooled["text"], 1 / 0.07)
    assert num(loss) == pytest.approx(num(want), rel=1e-4)
    assert num(loss) > 0
    # Without `keep` the model is the plain classifier.
    assert isinstance(model(batches, [s.id for s in rows]), dict)


def test_embeddings_of_other_widths_are_projected_to_the_smaller_one() -> None:
    torch.manual_seed(0)
    loss = ContrastiveLoss(16, 24)
    assert loss.proj_a.weight.shape == (16, 16) and loss.proj_b.weight.shape == (16, 24)
    a, b = torch.randn(5, 16), torch.randn(5, 24)
    want = _reference(a @ loss.proj_a.weight.t(), b @ loss.proj_b.weight.t(), 1 / 0.07)
    assert num(loss(a, b)) == pytest.approx(num(want), rel=1e-5)
    assert not list(ContrastiveLoss(8, 8).parameters())[1:], "equal widths: only the temperature is learned"


def test_masking_by_class_leaves_out_the_other_rows(demo_dir: Path) -> None:
    model, batches, rows, pooled = _live_batch(demo_dir)
    ds = load_dataset("demo", demo_dir)
    names = ds.labels.tasks["label"]
    classes = ft_run.contrastive_class_ids(_cfg(demo_dir, Path("unused"), contrastive_weight=1.0,
                                                contrastive_classes=["positive", "neutral"]), names, "label")
    assert classes == {names.index("positive"), names.index("neutral")}
    keep = ft_run._pair_rows([s.id for s in rows], ds.by_id(), "label", classes, torch.device("cpu"))
    assert keep.tolist() == [s.labels["label"] in classes for s in rows]
    assert 2 <= int(keep.sum()) < len(rows), "the fixed batch mixes kept and left-out rows"
    _, loss = model(batches, [s.id for s in rows], keep=keep)
    want = _reference(pooled["image"][keep], pooled["text"][keep], 1 / 0.07)
    assert num(loss) == pytest.approx(num(want), rel=1e-4)
    assert num(loss) != pytest.approx(num(_reference(pooled["image"], pooled["text"], 1 / 0.07)), rel=1e-3)
    # Left-out rows do not matter at all: scramble their embeddings, same loss and no gradient reaches them.
    a = pooled["image"].clone().requires_grad_(True)
    b = pooled["text"].clone()
    b[~keep] = torch.randn(int((~keep).sum()), b.shape[1])
    out = model.contrastive(a, b, keep)
    assert num(out) == pytest.approx(num(want), rel=1e-4)
    out.backward()
    assert a.grad is not None and bool((a.grad[~keep] == 0).all()) and bool(a.grad[keep].abs().sum() > 0)
    # Fewer than two kept rows: nothing to contrast, a zero that still reaches the parameters.
    one = torch.zeros(len(rows), dtype=torch.bool)
    one[0] = True
    assert num(model.contrastive(pooled["image"], pooled["text"], one)) == 0.0
    assert ft_run._pair_rows(["x"], {}, "label", None, torch.device("cpu")).tolist() == [True]


def test_the_temperature_gets_a_gradient_changes_and_is_clamped(demo_dir: Path) -> None:
    model, batches, rows, _ = _live_batch(demo_dir)
    _, loss = model(batches, [s.id for s in rows], keep=torch.ones(len(rows), dtype=torch.bool))
    loss.backward()
    scale = model.contrastive.logit_scale
    assert scale.grad is not None and num(scale.grad.abs()) > 0
    before = num(scale)
    torch.optim.AdamW(model.contrastive.parameters(), lr=0.1, weight_decay=0.0).step()
    assert num(scale) != pytest.approx(before, abs=1e-4)
    with torch.no_grad():
        scale.fill_(10.0)
    assert num(model.contrastive.scale) == pytest.approx(100.0)  # exp(10) capped at 100 in the loss
    model.contrastive.clamp_()
    assert num(scale) == pytest.approx(math.log(100))  # and the parameter kept there, as open_clip does
    with torch.no_grad():
        scale.fill_(-1.0)
    model.contrastive.clamp_()
    assert num(scale) == 0.0


def test_a_run_with_the_term_logs_it_and_resumes_to_the_same_result(demo_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    kw = dict(contrastive_weight=0.5, contrastive_classes=["positive", "neutral"], save_every=2)
    ref = finetune(_cfg(demo_dir, runs, run_name="ref", **kw))
    assert ref is not None
    curves = json.loads((ref.run_dir / "curves.json").read_text())
    assert [c["epoch"] for c in curves] == [1, 2]
    assert all(math.isfinite(c["train_contrastive"]) and c["train_contrastive"] > 0 for c in curves)
    assert "train_contrastive" in (ref.run_dir / "curves.csv").read_text().splitlines()[0]
    train = json.loads((ref.run_dir / "metrics.json").read_text())["train"]
    con = train["contrastive"]
    assert con["weight"] == 0.5 and con["classes"] == ["positive", "neutral"] and con["modalities"] == ["image", "text"]
    assert con["loss"] == pytest.approx([c["train_contrastive"] for c in curves])
    assert con["scale"] != pytest.approx(1 / 0.07, rel=1e-4)  # the temperature was trained
    # The temperature is in the trained parameters (head learning rate) and in every checkpoint; a killed run
    # continues to the same result.
    tags = _interrupt_after(monkeypatch, 2)
    with pytest.raises(_Stop):
        finetune(_cfg(demo_dir, runs, **kw))
    assert tags == ["epoch1-step2", "epoch1-step4"]
    ck = load_checkpoint(latest_checkpoint(runs / "demo" / "r"))  # type: ignore[arg-type]
    assert "contrastive.logit_scale" in ck["weights"]
    assert num(ck["weights"]["contrastive.logit_scale"]) != pytest.approx(math.log(1 / 0.07), abs=1e-6)
    assert any(len(g["params"]) == 1 and g["weight_decay"] == 0.0 and g["lr"] > 0
               for g in ck["optimizer"]["param_groups"])
    monkeypatch.undo()
    # Other contrastive options than the checkpoint's are refused.
    with pytest.raises(MMCacheError, match="contrastive_weight=0.5 there, 0.25 here"):
        finetune(_cfg(demo_dir, runs, **{**kw, "contrastive_weight": 0.25}))
    res = finetune(_cfg(demo_dir, runs, **kw))
    assert res is not None
    _assert_same_run(ref.run_dir, res.run_dir)  # type: ignore[arg-type]
    got = json.loads((res.run_dir / "curves.json").read_text())
    assert [c["train_contrastive"] for c in got] == pytest.approx([c["train_contrastive"] for c in curves], abs=1e-5)


def test_weight_zero_equals_a_run_without_the_term(demo_dir: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    plain = finetune(_cfg(demo_dir, runs, run_name="plain", epochs=1))
    zero = finetune(_cfg(demo_dir, runs, run_name="zero", epochs=1, contrastive_weight=0.0))
    on = finetune(_cfg(demo_dir, runs, run_name="on", epochs=1, contrastive_weight=1.0))
    assert plain is not None and zero is not None and on is not None
    _assert_same_run(plain.run_dir, zero.run_dir, atol=0)  # type: ignore[arg-type]
    assert "train_contrastive" not in json.loads((zero.run_dir / "curves.json").read_text())[0]
    assert "contrastive" not in json.loads((zero.run_dir / "metrics.json").read_text())["train"]
    # The term does change training (else the equality above would prove nothing).
    from safetensors.torch import load_file

    a, b = load_file(str(plain.run_dir / "model.safetensors")), load_file(str(on.run_dir / "model.safetensors"))
    assert any(not torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_bad_contrastive_options_are_one_line_errors(demo_dir: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with pytest.raises(MMCacheError, match=r"--contrastive-weight must be a number >= 0 \(0 = off\), got -0.1"):
        finetune(_cfg(demo_dir, runs, contrastive_weight=-0.1))
    with pytest.raises(MMCacheError, match=r"--contrastive-weight must be a number >= 0"):
        finetune(_cfg(demo_dir, runs, contrastive_weight=float("nan")))
    with pytest.raises(MMCacheError, match="unknown class 'true' of task 'label'; known: negative, neutral, positive"):
        finetune(_cfg(demo_dir, runs, contrastive_weight=1.0, contrastive_classes=["true", "neutral"]))
    with pytest.raises(MMCacheError, match="--contrastive-classes"):
        finetune(_cfg(demo_dir, runs, contrastive_weight=1.0, contrastive_classes=[""]))
    with pytest.raises(MMCacheError, match="pooled embeddings of two modalities; this run has image; add a second"):
        finetune(_cfg(demo_dir, runs, encoders={"image": "clip-tiny"}, contrastive_weight=1.0))


def test_the_cli_passes_the_flags(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from mmcache.finetune.cli import app

    seen: list[FinetuneConfig] = []
    monkeypatch.setattr(ft_run, "finetune", lambda cfg: seen.append(cfg))
    res = CliRunner().invoke(app, ["run", "--dataset", "demo", "--image", "clip-tiny", "--text", "clip-tiny",
                                   "--contrastive-weight", "0.3", "--contrastive-classes", "positive,neutral",
                                   "--no-epoch-checkpoint"])
    assert res.exit_code == 0, res.output
    (cfg,) = seen
    assert cfg.contrastive_weight == 0.3 and cfg.contrastive_classes == ["positive", "neutral"]
    assert cfg.epoch_checkpoint is False
