"""The transformer fusion head: [CLS] + typed modality tokens, masks, missing modalities, training on the cache,
batched sweeps, `finetune run`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mmcache.errors import MMCacheError
from mmcache.heads import build_head
from mmcache.heads.train import TrainConfig, train, train_many
from mmcache.heads.transformer import TransformerHead

INPUTS = {"image": {"pooled": (12,), "tokens": (7, 10), "mask": (7,)},
          "text": {"pooled": (8,), "tokens": (6, 9), "mask": (6,)}}
TASKS = {"label": 3}
HP = {"D": 16, "heads": 2, "layers": 2}


def feats(b: int = 5, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    mi = torch.arange(7)[None] < torch.tensor([7, 3, 1, 5, 2])[:b, None]
    mt = torch.arange(6)[None] < torch.tensor([2, 6, 4, 1, 3])[:b, None]
    return {"image": {"pooled": torch.randn(b, 12, generator=g), "tokens": torch.randn(b, 7, 10, generator=g),
                      "mask": mi},
            "text": {"pooled": torch.randn(b, 8, generator=g), "tokens": torch.randn(b, 6, 9, generator=g),
                     "mask": mt}}


def make(hp: dict[str, object] | None = None, inputs: dict[str, dict[str, tuple[int, ...]]] | None = None,
         tasks: dict[str, int] | None = None) -> TransformerHead:
    torch.manual_seed(0)
    head = build_head("transformer", inputs or INPUTS, tasks or TASKS, {**HP, **(hp or {})})
    assert isinstance(head, TransformerHead)
    return head


def test_shapes_layers_and_every_learnable_parameter_gets_a_gradient() -> None:
    head = make({"layers": 3}, tasks={"label": 3, "aux": 4})
    assert len(head.encoder.layers) == 3
    layer = head.encoder.layers[0]
    assert layer.norm_first and layer.self_attn.batch_first and layer.self_attn.num_heads == 2
    assert layer.linear1.out_features == 4 * 16
    out = head(feats())
    assert out["label"].shape == (5, 3) and out["aux"].shape == (5, 4)
    (out["label"].sum() + out["aux"].pow(2).sum()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_the_attention_key_bias_stays_zero_through_training() -> None:
    """The softmax cancels a key bias: it is held at zero, gets no gradient, and Adam leaves it there."""
    head = make()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for step in range(3):
        opt.zero_grad()
        head(feats(seed=step))["label"].pow(2).sum().backward()
        for layer in head.encoder.layers:
            original = layer.self_attn.parametrizations.in_proj_bias.original
            assert torch.count_nonzero(original.grad[16:32]) == 0
            assert original.grad[:16].abs().sum() > 0 and original.grad[32:].abs().sum() > 0
        opt.step()
    for layer in head.encoder.layers:
        assert torch.count_nonzero(layer.self_attn.in_proj_bias[16:32]) == 0
        assert torch.count_nonzero(layer.self_attn.in_proj_bias[:16]) > 0


def test_padding_never_changes_the_output() -> None:
    head = make().eval()
    f = feats()
    with torch.no_grad():
        ref = head(f)["label"]
        for m in ("image", "text"):
            pad = ~f[m]["mask"]
            f[m]["tokens"][pad] = torch.randn(int(pad.sum()), f[m]["tokens"].shape[-1]) * 100
        torch.testing.assert_close(head(f)["label"], ref, rtol=1e-5, atol=1e-6)
        for m in ("image", "text"):
            f[m]["tokens"][~f[m]["mask"]] = float("nan")
        torch.testing.assert_close(head(f)["label"], ref, rtol=1e-5, atol=1e-6)
        # A real token of either modality does matter: [CLS] attends to both.
        f["image"]["tokens"][0, 0] += 1.0
        moved = head(f)["label"]
        assert (moved[0] - ref[0]).abs().max() > 1e-4
        torch.testing.assert_close(moved[1:], ref[1:], rtol=1e-5, atol=1e-6)  # other rows untouched
        f["text"]["tokens"][1, 0] += 1.0
        assert (head(f)["label"][1] - ref[1]).abs().max() > 1e-4


def test_missing_modality_equals_masked_out_rows() -> None:
    """Text absent from the batch, masked out row by row, or NaN pooled: the same logits; a row with nothing
    present is classified from [CLS] alone (finite, and the same for every such row)."""
    head = make().eval()
    f = feats()
    with torch.no_grad():
        absent = head({"image": f["image"]})["label"]
        masked = head({"image": f["image"], "text": {**f["text"], "mask": torch.zeros(5, 6, dtype=torch.bool)}})
        nan = {**f["text"], "pooled": torch.full((5, 8), float("nan"))}
        nan_out = head({"image": f["image"], "text": nan})["label"]
        both = head(f)["label"]
        empty = head({"image": {**f["image"], "mask": torch.zeros(5, 7, dtype=torch.bool)}})["label"]
    torch.testing.assert_close(masked["label"], absent, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nan_out, absent, rtol=1e-5, atol=1e-6)
    assert (both - absent).abs().max() > 1e-4
    assert torch.isfinite(empty).all()
    torch.testing.assert_close(empty, empty[:1].expand(5, 3), rtol=1e-5, atol=1e-6)


def test_pooled_inputs_and_use_tokens_off() -> None:
    pooled_only = {"image": {"pooled": (12,)}, "text": {"pooled": (8,)}}
    head = make(inputs=pooled_only).eval()
    assert head.proj["image"][0].in_features == 12 and head.proj["text"][0].in_features == 8
    f = feats()
    with torch.no_grad():
        a = head({m: {"pooled": d["pooled"]} for m, d in f.items()})["label"]
    assert a.shape == (5, 3) and torch.isfinite(a).all()
    # use_tokens=False reads `pooled` even where tokens exist: tokens change nothing.
    off = make({"use_tokens": False}).eval()
    with torch.no_grad():
        ref = off(f)["label"]
        f["image"]["tokens"] += 5.0
        torch.testing.assert_close(off(f)["label"], ref, rtol=1e-5, atol=1e-6)
        f["image"]["pooled"] += 1.0
        assert (off(f)["label"] - ref).abs().max() > 1e-4


def test_ablation_and_modalities_choose_what_is_encoded() -> None:
    text_only = make({"ablation": 1}).eval()
    assert text_only.mods == ["text"] and set(text_only.proj) == {"text"} and text_only.type_emb.shape == (1, 16)
    f = feats()
    with torch.no_grad():
        ref = text_only(f)["label"]
        f["image"]["tokens"] += 3.0
        torch.testing.assert_close(text_only(f)["label"], ref, rtol=1e-5, atol=1e-6)
    assert make({"modalities": ["image"]}).mods == ["image"]
    with pytest.raises(MMCacheError, match="only \\['image', 'text'\\] are loaded"):
        make({"modalities": ["audio"]})


@pytest.mark.parametrize(("hp", "message"), [
    ({"D": 10, "heads": 4}, "D=10 must be a positive multiple of heads=4"),
    ({"heads": 0}, "heads must be a whole number >= 1, got 0"),
    ({"layers": 0}, "layers must be a whole number >= 1, got 0"),
    ({"layers": "2"}, "layers must be a whole number"),
    ({"dropout": 1.5}, "dropout must be a number in \\[0, 1\\)"),
    ({"ffn": True}, "unknown hyperparameters \\['ffn'\\]"),
])
def test_bad_hyperparameters_are_one_line_errors(hp: dict[str, object], message: str) -> None:
    with pytest.raises(MMCacheError, match=message) as e:
        make(hp)
    assert "\n" not in str(e.value)


def test_config_and_weights_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    head = make()
    head(feats())["label"].sum().backward()
    head.eval()
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp_path / "m.safetensors"))
    cfg = json.loads(json.dumps(head.config))
    assert cfg["name"] == "transformer" and cfg["hparams"]["layers"] == 2 and cfg["hparams"]["D"] == 16
    torch.manual_seed(7)
    again = build_head(cfg["name"], cfg["inputs"], cfg["tasks"], cfg["hparams"])
    again.load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=True)
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(feats(seed=3))["label"], head(feats(seed=3))["label"], rtol=1e-5, atol=1e-6)


def test_heads_train_fuses_token_stores(make_cache: object, tmp_path: Path) -> None:
    """On the cache: the label needs both modalities' tokens; the head learns it and its run folder predicts."""
    from mmcache.heads.train import predict

    cache = make_cache(n=600, tokens=True)  # type: ignore[operator]
    cfg = TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(cache),
                      runs_dir=str(tmp_path / "runs"), head="transformer",
                      head_hparams={"D": 16, "heads": 2, "layers": 1, "dropout": 0.0}, epochs=15, batch_size=64,
                      lr=3e-3, device="cpu", quiet=True, run_name="tr")
    res = train(cfg)
    assert res.metrics["test"]["label"]["accuracy"] > 0.9
    text_only = train(TrainConfig(**{**cfg.__dict__, "head_hparams": {**cfg.head_hparams, "ablation": 1},
                                     "run_name": "tr-text"}))
    assert text_only.metrics["test"]["label"]["accuracy"] < 0.75  # one modality caps it near 5/9
    head_json = json.loads((res.run_dir / "head.json").read_text())
    assert head_json["name"] == "transformer" and head_json["inputs"]["image"]["tokens"] == [3, 24]
    out = predict(res.run_dir, split="test", out=tmp_path / "p.csv", device="cpu")
    rows = out.read_text().splitlines()
    assert rows[0].startswith("id,label,predicted") and len(rows) - 1 == res.metrics["test"]["label"]["n"]


def test_batched_sweep_equals_single_runs_with_dropout(make_cache: object) -> None:
    """Configs trained in lockstep draw dropout from their own random streams: each equals its run alone."""
    cache = make_cache(n=300, tokens=True)  # type: ignore[operator]
    cfgs = [TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(cache),
                        head="transformer", head_hparams=hp, epochs=3, batch_size=64, lr=lr, seed=seed, quiet=True,
                        save=False, device="cpu")
            for hp, lr, seed in (({"D": 8, "heads": 2, "layers": 1, "dropout": 0.2}, 1e-2, 0),
                                 ({"D": 8, "heads": 2, "layers": 2, "dropout": 0.1}, 3e-3, 1))]
    batched = train_many(cfgs)
    for cfg, got in zip(cfgs, batched, strict=True):
        assert not isinstance(got, MMCacheError)
        alone = train(cfg)
        assert alone.best_epoch == got.best_epoch
        for a, b in zip(alone.curves, got.curves, strict=True):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, abs=1e-5)
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4, abs=1e-5)
        for k, v in alone.head.state_dict().items():
            torch.testing.assert_close(v, got.head.state_dict()[k], rtol=1e-4, atol=1e-5, msg=k)


def test_heads_train_cli_takes_the_transformer_hyperparameters(make_cache: object, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from mmcache.heads.cli import main

    cache = make_cache(n=120, tokens=True)  # type: ignore[operator]
    runs = tmp_path / "runs"
    monkeypatch.setattr(sys, "argv", ["heads", "train", "--dataset", "toy", "--vtype", "feat", "--ttype", "feat",
                                      "--cache-dir", str(cache), "--runs-dir", str(runs), "--head", "transformer",
                                      "--D", "8", "--hp", "heads=2", "--hp", "layers=1", "--dropout", "0.0",
                                      "--epochs", "1", "--run-name", "cli", "-q"])
    with pytest.raises(SystemExit) as e:
        main()
    assert not e.value.code
    hp = json.loads((runs / "toy" / "cli" / "head.json").read_text())["hparams"]
    assert hp == {"D": 8, "layers": 1, "heads": 2, "dropout": 0.0, "use_tokens": True, "ablation": 0,
                  "modalities": None}


def test_finetune_run_with_the_transformer_head(tmp_path: Path) -> None:
    from mmcache.data.demo import generate_demo
    from mmcache.finetune.run import FinetuneConfig, finetune

    demo = generate_demo(tmp_path / "demo", n=40, seed=2)
    res = finetune(FinetuneConfig(dataset="demo", data_dir=str(demo), encoders={"image": "clip-tiny", "text": "clip-tiny"},
                                  runs_dir=str(tmp_path / "runs"), head="transformer",
                                  head_hparams={"D": 16, "heads": 2, "layers": 1}, epochs=1, batch_size=16,
                                  num_workers=0, quiet=True, run_name="ft", freeze_encoders=True))
    assert res is not None and res.run_dir is not None
    head = json.loads((res.run_dir / "head.json").read_text())
    # Live CLIP towers hand the head their token sequences, as a store would.
    assert head["name"] == "transformer" and set(head["inputs"]["image"]) == {"pooled", "tokens", "mask"}
    assert 0.0 <= res.metrics["test"]["label"]["accuracy"] <= 1.0
