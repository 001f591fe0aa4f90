"""One set of options: `heads train`, `heads sweep` and `finetune run` take the engine's shared options under the
same flags, help and checks, generated from the config fields; `--config FILE` (a run's config.json or a TOML
file) trains the same run again, with the flags typed beside it overriding."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from mmcache.engine.config import BaseConfig, option_of
from mmcache.finetune.config import FinetuneConfig
from mmcache.heads.config import TrainConfig
from tests.heads.conftest import build_cache
from tests.heads.conftest import run_heads as _heads


def _options(app: typer.Typer, name: str) -> dict[str, Any]:
    """The click options of command `name` of `app`, by parameter name."""
    cmd = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    return {p.name: p for p in cmd.params}


def test_the_shared_options_are_one_option_in_every_command() -> None:
    from mmcache.finetune.cli import app as ft_app
    from mmcache.heads.cli import app as heads_app

    train, sweep, ft = _options(heads_app, "train"), _options(heads_app, "sweep"), _options(ft_app, "run")
    shared = [f for f in dataclasses.fields(BaseConfig) if option_of(f).cli != "none"]
    assert len(shared) >= 20
    for f in shared:
        in_train, in_ft = train[f.name], ft[f.name]
        assert in_train.opts == in_ft.opts, f.name  # the same flag ...
        if f.name not in ("dataset", "cache_dir", "head", "runs_dir", "overwrite"):  # (defaults and a word differ)
            assert in_train.help == in_ft.help, f.name  # ... with the same help
        if f.name not in ("seed", "run_name", "overwrite", "quiet"):  # a sweep has --seeds and names its runs
            assert sweep[f.name].opts == in_train.opts, f.name
    # Each command's own fields are options too, and the fields set by other flags are not.
    for cls, opts in ((TrainConfig, train), (FinetuneConfig, ft)):
        for f in dataclasses.fields(cls):
            if f.name == "folds":  # `--folds K` is the command's own: it trains K configs with their `folds` set
                continue
            assert (f.name in opts) == (option_of(f).cli != "none"), (cls.__name__, f.name)
    assert "--optimizer" in ft["optimizer"].opts and "--schedule" in ft["schedule"].opts and "--task" in ft["tasks"].opts
    assert "--encoder-lr" in ft["encoder_lr"].opts


@pytest.mark.parametrize(("cls", "kw", "message"), [
    (TrainConfig, {"epochs": 0}, "--epochs must be a whole number >= 1, got 0"),
    (FinetuneConfig, {"epochs": 0}, "--epochs must be a whole number >= 1, got 0"),
    (TrainConfig, {"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'; choose one of adam, adamw, sgd"),
    (FinetuneConfig, {"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'; choose one of adam, adamw, sgd"),
    (FinetuneConfig, {"schedule": "step"}, "unknown schedule 'step'"),
    (FinetuneConfig, {"schedule": "none", "warmup": 0.2}, "--warmup warms up the cosine schedule; --schedule none"),
    (TrainConfig, {"ema": 1.0}, "--ema must be a decay in [0, 1)"),
    (FinetuneConfig, {"ema": 1.0}, "--ema must be a decay in [0, 1)"),
    (TrainConfig, {"tasks": "label"}, "--task must be a list of strings, got 'label'"),
    (FinetuneConfig, {"tasks": "label"}, "--task must be a list of strings, got 'label'"),
])
def test_a_shared_option_is_checked_the_same_way_in_both_configs(cls: type, kw: dict[str, Any],
                                                                  message: str) -> None:
    from mmcache.errors import MMCacheError

    base: dict[str, Any] = ({"dataset": "demo", "modalities": {"image": "feat"}} if cls is TrainConfig else
                            {"dataset": "demo", "encoders": {"image": "clip-tiny"}})
    with pytest.raises(MMCacheError) as e:
        cls(**base, **kw).validate()
    assert message in str(e.value) and "\n" not in str(e.value)


def _metrics(run: Path) -> dict[str, Any]:
    """A run's metrics: the chosen epoch and every split's metrics (not its timings and memory)."""
    obj = json.loads((run / "metrics.json").read_text())
    return {k: obj[k] for k in ("best_epoch", "select", "splits")}


def _config(run: Path) -> dict[str, Any]:
    obj = json.loads((run / "config.json").read_text())
    return {k: v for k, v in obj.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}


def test_heads_train_config_file_trains_the_same_run_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    build_cache(cache, n=300)
    common = ["--cache-dir", str(cache), "--runs-dir", str(runs), "--threads", "1", "--no-progress", "-q"]
    assert _heads(["train", "--dataset", "toy", "--vtype", "feat", "--ttype", "feat", "--head", "gated", "--D", "8",
                   "--dropout", "0.1", "--epochs", "6", "--lr", "3e-2", "--optimizer", "adamw", "--seed", "3",
                   "--ema", "0.5", "--batch-size", "32", "--label-smoothing", "0.1", "--run-name", "first", *common],
                  monkeypatch) == 0
    first = runs / "toy" / "first"
    assert _heads(["train", "--config", str(first / "config.json"), "--run-name", "again", *common],
                  monkeypatch) == 0
    again = runs / "toy" / "again"
    assert _config(again) == {**_config(first), "run_name": "again"}
    assert _metrics(first)["splits"]["test"]["label"]["accuracy"] > 0.6  # a run that learned (not a constant predictor)
    assert _metrics(again) == _metrics(first)  # the same run: every metric equal
    # A flag typed beside the file overrides it; the rest stays the file's.
    assert _heads(["train", "--config", str(first / "config.json"), "--epochs", "2", "--hp", "D=4", "--run-name",
                   "shorter", *common], monkeypatch) == 0
    shorter = _config(runs / "toy" / "shorter")
    assert shorter["epochs"] == 2 and shorter["head_hparams"] == {"D": 4, "dropout": 0.1}
    assert {k: v for k, v in shorter.items() if k not in ("epochs", "head_hparams", "run_name")} == {
        k: v for k, v in _config(first).items() if k not in ("epochs", "head_hparams", "run_name")}


def test_a_toml_config_file_and_a_sweep_over_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    build_cache(cache, n=300)
    toml = tmp_path / "probe.toml"
    toml.write_text(f'dataset = "toy"\ncache_dir = "{cache}"\nruns_dir = "{runs}"\nepochs = 3\nlr = 0.01\n'
                    'threads = 1\n[modalities]\nimage = "feat"\ntext = "feat"\n[head_hparams]\nD = 0\n')
    assert _heads(["train", "--config", str(toml), "--run-name", "probe", "--no-progress", "-q"], monkeypatch) == 0
    run = runs / "toy" / "probe"
    cfg = _config(run)
    assert cfg["epochs"] == 3 and cfg["lr"] == 0.01 and cfg["modalities"] == {"image": "feat", "text": "feat"}
    # A sweep from the run's config.json: its lr=0.01 row is the run.
    out = tmp_path / "sweep"
    assert _heads(["sweep", "--config", str(run / "config.json"), "--grid", "lr=0.01,0.001", "--out", str(out),
                   "--no-progress"], monkeypatch) == 0
    rows = {r["lr"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert rows[0.01]["test_accuracy"] == _metrics(run)["splits"]["test"]["label"]["accuracy"]
    assert rows[0.01]["seed"] == 0


@pytest.mark.parametrize(("content", "name", "message"), [
    (None, "missing.json", "--config {p}: cannot read it"),
    ("{not json", "bad.json", "--config {p}: not valid JSON"),
    ("epochs = [", "bad.toml", "--config {p}: not valid TOML"),
    ("[1, 2]", "list.json", "--config {p}: expected a table of options"),
    ('{"colour": "red"}', "other.json", "--config {p}: none of its keys is an option of `heads train`"),
    ('{"dataset": "toy", "epochs": 0, "modalities": {"image": "feat"}}', "zero.json",
     "--epochs must be a whole number >= 1, got 0"),
])
def test_a_bad_config_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str], content: str | None, name: str,
                                       message: str) -> None:
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    assert _heads(["train", "--config", str(p), "--runs-dir", str(tmp_path / "runs")], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(p=p)) and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_finetune_config_file_trains_the_same_run_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from mmcache.data.demo import generate_demo
    from mmcache.finetune.cli import main

    demo = generate_demo(tmp_path / "demo", n=40, seed=1)
    runs = tmp_path / "runs"

    def ft(*argv: str) -> int:
        monkeypatch.setattr(sys, "argv", ["finetune", "run", *argv])
        try:
            main()
        except SystemExit as e:
            return int(e.code or 0)
        return 0

    assert ft("--dataset", "demo", "--data-dir", str(demo), "--image", "clip-tiny", "--text", "clip-tiny",
              "--epochs", "1", "--batch-size", "8", "--num-workers", "0", "--hp", "D=8", "--lr", "3e-3",
              "--encoder-lr", "1e-4", "--optimizer", "adam", "--schedule", "none", "--warmup", "0",
              "--runs-dir", str(runs), "--run-name", "first", "--no-progress", "-q") == 0
    first = runs / "demo" / "first"
    saved = json.loads((first / "config.json").read_text())
    assert (saved["lr"], saved["encoder_lr"], saved["optimizer"], saved["schedule"]) == (3e-3, 1e-4, "adam", "none")
    assert ft("--config", str(first / "config.json"), "--run-name", "again", "--no-progress", "-q") == 0
    again = runs / "demo" / "again"
    assert _metrics(again) == _metrics(first)
    assert json.loads((again / "config.json").read_text())["encoders"] == saved["encoders"]
    capsys.readouterr()
    # The older flag of the head's rate still works and says its new name once.
    seen: list[FinetuneConfig] = []
    import mmcache.finetune.run as ft_run

    monkeypatch.setattr(ft_run, "finetune", lambda cfg: seen.append(cfg))
    assert ft("--config", str(first / "config.json"), "--head-lr", "0.02", "--run-name", "x") == 0
    assert seen[-1].lr == 0.02 and seen[-1].encoder_lr == 1e-4
    assert capsys.readouterr().err.count("--head-lr is now --lr") == 1


def test_a_config_written_before_encoder_lr_reads_in_the_new_names() -> None:
    old = {"dataset": "demo", "encoders": {"image": "clip-tiny"}, "lr": 2e-5, "head_lr": 5e-3, "resolved": {}}
    cfg = FinetuneConfig.from_json(old)
    assert (cfg.lr, cfg.encoder_lr) == (5e-3, 2e-5)
    # The older Python spelling keeps its meaning, with a warning.
    with pytest.warns(DeprecationWarning, match="older spelling"):
        py = FinetuneConfig(dataset="demo", encoders={"image": "clip-tiny"}, lr=2e-5, head_lr=5e-3)
    assert (py.lr, py.encoder_lr) == (5e-3, 2e-5)
    assert "head_lr" not in py.to_json()
