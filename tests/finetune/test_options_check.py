"""`finetune run` refuses options out of range, options that contradict each other and options the run would not
use, in one line naming the flag, before any data or model is loaded; and the inputs it meets on the way (a last
batch of one row, undecodable probe rows, LoRA targets off the encoder's path, a head from another fine-tuned run)
are trained past, named or warned about."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mmcache.engine import new_run_dir
from mmcache.errors import MMCacheError
from mmcache.finetune import run as ft
from mmcache.finetune.run import FinetuneConfig, finetune
from mmcache.heads.losses import build_criterion


def _cfg(tmp_path: Path, **kw: Any) -> FinetuneConfig:
    # The data folder does not exist: every error below comes before anything is read.
    base: dict[str, Any] = dict(dataset="demo", data_dir=str(tmp_path / "no-data"), runs_dir=str(tmp_path / "runs"),
                                encoders={"image": "clip-tiny", "text": "clip-tiny"}, num_workers=0, quiet=True,
                                run_name="r")
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.mark.parametrize(("options", "message"), [
    ({"batch_size": 1}, r"--batch-size must be a whole number >= 2, got 1"),
    ({"limit": 0}, r"--limit must be a whole number >= 1, got 0"),
    ({"limit": -5}, r"--limit must be a whole number >= 1, got -5"),
    ({"lr": -1.0}, r"--lr must be a number >= 0, got -1.0"),
    ({"encoder_lr": float("nan")}, r"--encoder-lr must be a number >= 0, got nan"),
    ({"weight_decay": -0.1}, r"--weight-decay must be a number >= 0"),
    ({"warmup": 2.0}, r"--warmup must be a number >= 0 and <= 1, got 2.0"),
    ({"early_stopping": -1}, r"--patience must be a whole number >= 0, got -1"),
    ({"num_workers": -1}, r"--num-workers must be a whole number >= 0, got -1"),
    ({"lora": True, "lora_r": 0}, r"--lora-r must be a whole number >= 1, got 0"),
    ({"lora": True, "lora_alpha": 0}, r"--lora-alpha must be a number > 0, got 0"),
    ({"max_grad_norm": -1.0}, r"--max-grad-norm must be a number >= 0"),
    ({"stream": True, "steps_per_epoch": 0}, r"--steps-per-epoch must be a whole number >= 1, got 0"),
    ({"stream": True, "shuffle_buffer": 0}, r"--shuffle-buffer must be a whole number >= 1, got 0"),
    # Contradictions.
    ({"resume": True, "overwrite": True}, r"--resume continues .* --overwrite starts the run over; drop one"),
    ({"lora": True, "freeze_encoders": True}, r"^--lora applies to encoders that train, and --freeze-encoders"),
    ({"grad_checkpointing": True, "freeze_encoders": True}, r"^--grad-checkpointing applies to encoders that train"),
    # Options this run would not use.
    ({"contrastive_classes": ["positive"]}, r"--contrastive-classes .* which is off: add --contrastive-weight"),
    ({"val_data": "shards/val"}, r"^--val-data applies to streamed shards: add --stream"),
    ({"steps_per_epoch": 3}, r"^--steps-per-epoch applies to streamed shards: add --stream"),
    ({"shuffle_buffer": 5}, r"^--shuffle-buffer applies to streamed shards: add --stream"),
    ({"lora_r": 4}, r"^--lora-r sets the LoRA adapters: add --lora, or drop --lora-r"),
    ({"lora_alpha": 32}, r"^--lora-alpha sets the LoRA adapters"),
    ({"lora_targets": ["attn"]}, r"^--lora-targets sets the LoRA adapters"),
    ({"encoders": {"image": "clip-tiny[augment=true"}}, r"^--image 'clip-tiny\[augment=true': the preset's options "
                                                        r"bracket is not closed"),
    # A fine-tuned run's encoder is an extraction preset, not a starting point.
    ({"encoders": {"image": "ft=finetuned:runs/demo/r"}}, r"^--image ft=finetuned:runs/demo/r: fine-tuning starts "
                                                          r"from a base encoder preset"),
])
def test_bad_or_unused_options_are_one_line_errors(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(MMCacheError, match=message) as e:
        finetune(_cfg(tmp_path, **options))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists()  # refused before a run folder is made


def test_the_options_that_go_together_pass_the_check(tmp_path: Path) -> None:
    for options in ({"lora": True, "lora_r": 4, "lora_alpha": 8, "lora_targets": ["attn"]},
                    {"freeze_encoders": True, "lr": 0.0, "encoder_lr": 0.0},
                    {"contrastive_weight": 0.5, "contrastive_classes": ["positive"]},
                    {"stream": True, "val_data": "v", "steps_per_epoch": 2, "shuffle_buffer": 4}, {"limit": 1}):
        ft.validate_config(_cfg(tmp_path, **options))


@pytest.mark.parametrize("name", ["../../outside", "/tmp/elsewhere", "..", ".", "a/../../b"])
def test_a_run_name_never_leads_out_of_the_runs_folder(tmp_path: Path, name: str) -> None:
    with pytest.raises(MMCacheError, match=r"--run-name .*: a name is one folder name .*not a path"):
        finetune(_cfg(tmp_path, run_name=name))
    # heads train, cross-validation and sweeps name their folders through the same function.
    with pytest.raises(MMCacheError, match="not a path"):
        new_run_dir(tmp_path / "runs", "demo", name, ["heads"])
    from mmcache.runfolder import releasing

    with releasing():  # the names it takes (the sweep's and the run's) are given up at the end
        taken = new_run_dir(tmp_path / "runs", "demo", "sweeps/s/cfg_seed0", ["heads"])
    assert taken == tmp_path / "runs" / "demo" / "sweeps" / "s" / "cfg_seed0"
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no file, and nothing outside the runs folder
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["runs"])


def test_resume_of_a_finished_run_says_it_is_finished(tmp_path: Path) -> None:
    done = tmp_path / "runs" / "demo" / "r"
    done.mkdir(parents=True)
    (done / "metrics.json").write_text("{}")
    with pytest.raises(MMCacheError, match=r"is a finished run .* --overwrite instead of --resume"):
        finetune(_cfg(tmp_path, resume=True))


def test_cli_leaves_the_head_to_init_head_when_head_is_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmcache.finetune.cli import main

    seen: list[FinetuneConfig] = []
    monkeypatch.setattr(ft, "finetune", lambda cfg: seen.append(cfg))
    base = ["finetune", "run", "--dataset", "demo", "--image", "clip-tiny", "--init-head", str(tmp_path)]
    for extra, head in (([], None), (["--head", "gated"], "gated")):
        monkeypatch.setattr(sys, "argv", base + extra)
        try:
            main()
        except SystemExit as e:
            assert not e.code
        assert seen[-1].head == head and seen[-1].init_head == str(tmp_path)


def test_a_loss_option_of_the_wrong_kind_is_a_one_line_error() -> None:
    with pytest.raises(MMCacheError, match=r"loss focal: an option has a value of the wrong kind \(gamma='abc'"):
        build_criterion("focal", {"label": 3}, gamma="abc")
    with pytest.raises(MMCacheError, match=r"loss ce: an option has a value of the wrong kind \(kd_T=\[1\]"):
        build_criterion("ce", {"label": 3}, kd_T=[1])
    assert build_criterion("focal", {"label": 3}, gamma=1).gamma == 1.0  # type: ignore[attr-defined]


def test_an_epoch_whose_last_batch_holds_one_row_trains_past_it(tmp_path: Path) -> None:
    """The linear head's BatchNorm cannot train on one row: a batch left with one (17 rows in batches of 8) is
    skipped, as `heads train` skips it, instead of stopping the run with a traceback."""
    from mmcache.data.demo import generate_demo

    demo = generate_demo(tmp_path / "demo", n=60, seed=2)
    res = finetune(_cfg(tmp_path, data_dir=str(demo), limit=17, batch_size=8, epochs=1, freeze_encoders=True,
                        head_hparams={"D": 8}))
    assert res is not None and res.config["resolved"]["rows"]["train"] == 17
    assert res.config["resolved"]["train"]["samples"] == 17
    assert len(res.curves) == 1 and res.curves[0]["train_loss"] > 0


def test_the_shape_probe_looks_past_undecodable_rows_and_names_one_when_none_decodes(tmp_path: Path) -> None:
    import csv

    from mmcache.data.demo import generate_demo

    demo = generate_demo(tmp_path / "demo", n=60, seed=2)
    table = demo / "data.csv"
    rows = list(csv.DictReader(table.open()))
    val = [r for r in rows if r["split"] == "val"]

    def write(broken: int) -> None:
        for r in val[:broken]:
            r["image"] = "images/missing.jpg"
        with table.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    write(4)  # the first four validation rows fail to decode; the shapes come from the next ones
    cfg = _cfg(tmp_path, data_dir=str(demo), limit=8, batch_size=4, epochs=1, freeze_encoders=True,
               head_hparams={"D": 8}, encoders={"image": "clip-tiny"})
    res = finetune(cfg)
    assert res is not None and res.metrics["val"]["label"]["n"] == min(8, len(val)) - 4
    write(len(val))
    with pytest.raises(MMCacheError, match=rf"the first {min(8, len(val))} validation row\(s\) of 'demo' could not "
                                           rf"be decoded by every encoder \(row '{val[0]['id']}': image: .*missing.jpg"):
        finetune(replace(cfg, run_name="again"))


def test_cli_refuses_a_head_hyperparameter_given_twice_with_two_values(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from mmcache.finetune.cli import main

    seen: list[FinetuneConfig] = []
    monkeypatch.setattr(ft, "finetune", lambda cfg: seen.append(cfg))
    base = ["finetune", "run", "--dataset", "demo", "--image", "clip-tiny"]
    monkeypatch.setattr(sys, "argv", base + ["--hp", "D=8", "--D", "16"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2 and not seen
    assert capsys.readouterr().err.strip() == "error: --D 16 and --hp D=8 disagree; give D once"
    monkeypatch.setattr(sys, "argv", base + ["--freeze-encoders", "--encoder-lr", "1e-3"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2 and not seen
    assert "--encoder-lr applies to encoders that train, and --freeze-encoders trains none" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", base + ["--hp", "D=16", "--D", "16", "--dropout", "0.1"])
    try:
        main()
    except SystemExit as e2:
        assert not e2.code
    assert seen[-1].head_hparams == {"D": 16, "dropout": 0.1}


def test_lora_adapts_layers_the_encoder_runs_and_refuses_ones_it_never_runs(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """ResNet's features are the pooled last block: LoRA goes on its convolutions (its classifier `fc` is never
    run, so adapters there would train nothing and are refused)."""
    from safetensors.torch import load_file

    from mmcache.data.demo import generate_demo

    demo = generate_demo(tmp_path / "demo", n=40, seed=3)
    cfg = _cfg(tmp_path, data_dir=str(demo), encoders={"image": "resnet-tiny"}, lora=True, epochs=1, batch_size=8,
               head_hparams={"D": 8}, encoder_lr=1e-2)
    res = finetune(cfg)
    assert res is not None
    state = load_file(str(Path(res.run_dir) / "encoders.safetensors"))
    lora = sorted(k for k in state if "lora_B" in k)
    assert lora and all(".fc." not in k for k in lora) and any(".conv2." in k for k in lora)
    assert any(float(state[k].abs().max()) > 0 for k in lora)  # B starts at zero: the adapters trained
    # The run records the layers it adapted: its encoder rebuilds as trained even if the defaults change.
    assert res.config["resolved"]["lora_targets"] == {"image": ["conv1", "conv2", "conv3"]}
    import mmcache.finetune.preset  # noqa: F401  (registers finetuned:RUN)
    from mmcache.extract import build_extractor

    monkeypatch.setitem(ft.LORA_TARGETS, "resnet", ["fc"])
    enc = build_extractor(f"finetuned:{res.run_dir}", "image")
    assert any(".conv2.lora_A" in k for k in enc.state_dict())
    monkeypatch.undo()
    with pytest.raises(MMCacheError, match=r"^--lora on resnet-tiny: its adapted layers \(fc\) are not on the path "
                                           r"to its features"):
        finetune(replace(cfg, lora_targets=["fc"], run_name="fc"))


def test_init_head_from_a_finetune_run_warns_that_its_encoders_are_not_taken(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from mmcache.data.demo import generate_demo

    demo = generate_demo(tmp_path / "demo", n=40, seed=3)
    cfg = _cfg(tmp_path, data_dir=str(demo), encoders={"image": "clip-tiny"}, epochs=1, batch_size=8,
               head_hparams={"D": 8}, quiet=False)
    first = finetune(cfg)
    assert first is not None
    capsys.readouterr()
    res = finetune(replace(cfg, run_name="next", init_head=str(first.run_dir), head_hparams={}))
    assert res is not None and res.head.hparams["D"] == 8
    err = capsys.readouterr().err
    assert f"warning: --init-head {first.run_dir} is a `finetune run`: its head was trained on its own fine-tuned" in err
    # A head trained on frozen encoders' features is a head on the presets' features: no warning.
    frozen = finetune(replace(cfg, run_name="frozen", freeze_encoders=True))
    capsys.readouterr()
    finetune(replace(cfg, run_name="after-frozen", init_head=str(frozen.run_dir), head_hparams={}))  # type: ignore[union-attr]
    assert "is a `finetune run`" not in capsys.readouterr().err


def test_an_encoder_of_a_field_the_dataset_lacks_is_refused_before_any_model_loads(tmp_path: Path) -> None:
    from mmcache.data.demo import generate_demo

    demo = generate_demo(tmp_path / "demo", n=30, seed=3)
    for m, preset, article in (("video", "r3d-tiny", "a"), ("audio", "mel-tiny", "an")):
        with pytest.raises(MMCacheError, match=rf"^--{m} {preset}: no row of 'demo' has {article} {m} field; drop "
                                               rf"--{m}"):
            finetune(_cfg(tmp_path, data_dir=str(demo), encoders={"image": "clip-tiny", m: preset}))


def test_one_train_row_is_refused_before_the_encoders_load(tmp_path: Path) -> None:
    """With one train row the only batch would be skipped and the run would save an untrained head: refused,
    naming the way out, and no run folder is left."""
    from mmcache.data.demo import generate_demo

    demo = generate_demo(tmp_path / "demo", n=60, seed=2)
    with pytest.raises(MMCacheError, match=r"'demo' has 1 train row\(s\) to fine-tune on; a head needs at least 2 "
                                           r"\(raise --limit\)"):
        finetune(_cfg(tmp_path, data_dir=str(demo), limit=1, epochs=1, freeze_encoders=True))
    assert not (tmp_path / "runs" / "demo" / "r").exists() or not any((tmp_path / "runs" / "demo" / "r").iterdir())


@pytest.mark.parametrize(("extra", "message"), [
    (["--lora-r", "8"], r"^--lora-r sets the LoRA adapters: add --lora, or drop --lora-r$"),
    (["--freeze-encoders", "--lora-alpha", "16"], r"^--lora-alpha sets the LoRA adapters"),
    (["--shuffle-buffer", "1000"], r"^--shuffle-buffer applies to streamed shards: add --stream"),
    (["--freeze-encoders", "--encoder-lr", "1e-5"], r"^--encoder-lr applies to encoders that train, and --freeze-encoders "
                                                   r"trains none"),
])
def test_a_flag_the_run_would_not_use_is_refused_even_at_its_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        extra: list[str], message: str) -> None:
    """The command line knows which flags were typed: one the run would not use is refused even when its value
    is the default (`--lora-r 8` without `--lora` used to pass silently)."""
    import re

    from mmcache.finetune.cli import main

    seen: list[FinetuneConfig] = []
    monkeypatch.setattr(ft, "finetune", lambda cfg: seen.append(cfg))
    monkeypatch.setattr(sys, "argv", ["finetune", "run", "--dataset", "demo", "--image", "clip-tiny", *extra])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code not in (0, None) and not seen
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0].removeprefix("error: ")), err
    # The same flags with what uses them pass.
    monkeypatch.setattr(sys, "argv", ["finetune", "run", "--dataset", "demo", "--image", "clip-tiny", "--lora",
                                      "--lora-r", "8"])
    try:
        main()
    except SystemExit as e2:
        assert not e2.code
    assert seen and seen[-1].lora and seen[-1].lora_r == 8


def test_shard_urls_reach_the_run_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--data-dir` is text, not a path: a URL of streamed shards keeps its `//` (a path would make it `https:/`)."""
    from mmcache.finetune.cli import main

    seen: list[FinetuneConfig] = []
    monkeypatch.setattr(ft, "finetune", lambda cfg: seen.append(cfg))
    url = "https://example.org/shards/train-{000000..000009}.tar"
    monkeypatch.setattr(sys, "argv", ["finetune", "run", "--dataset", "webdataset", "--image", "clip-tiny", "--stream",
                                      "--data-dir", url, "--val-data", "shards//val"])
    try:
        main()
    except SystemExit as e:
        assert not e.code
    assert seen[-1].data_dir == url and seen[-1].val_data == "shards//val"


def test_a_loss_option_out_of_range_fails_before_any_encoder_loads(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The criterion is built from the classes and train counts alone, before the encoders: a bad loss option
    costs seconds, not a model load."""
    from mmcache.data.demo import generate_demo

    def no_encoder(*args: object, **kw: object) -> None:
        raise AssertionError("an encoder was loaded before the loss options were checked")

    monkeypatch.setattr(ft, "build_encoder", no_encoder)
    demo = generate_demo(tmp_path / "demo", n=40, seed=3)
    with pytest.raises(MMCacheError, match=r"label_smoothing"):
        finetune(_cfg(tmp_path, data_dir=str(demo), epochs=1, loss_options={"label_smoothing": 1.5}))
