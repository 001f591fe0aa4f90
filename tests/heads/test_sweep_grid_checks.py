"""Sweep grids and tables: settings named twice, repeated values and seeds, keys the sweep sets itself, TOML
dotted keys, grid keys that look like metrics, and --columns checked before anything trains."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from mmcache.errors import MMCacheError
from mmcache.heads.sweep import format_table, load_grid_file, parse_grid, summarize
from tests.heads.conftest import run_heads as run


@pytest.mark.parametrize(("spec", "message"), [
    ("vtype=clip;image=resnet", "names 'image' twice (as 'vtype' and 'image')"),
    ("D=8;hp.D=16", "names 'hp.D' twice (as 'D' and 'hp.D')"),
    ("patience=1;early_stopping=2", "names 'early_stopping' twice (as 'patience' and 'early_stopping')"),
    ("select=accuracy;select_metric=loss", "names 'select_metric' twice"),
    ("lr=1e-3;lr=1e-2", "names 'lr' twice"),
    ("D=8,8", "D lists 8 twice"),
    ("lr=1e-3,0.001", "lr lists 0.001 twice"),
    ("seed=1,2", "'seed' is not a grid key: give the seeds with --seeds"),
    ("folds=3", "'folds' is not a grid key: give the folds with --folds"),
    ("run_name=x", "'run_name' is not a grid key"),
    ("track=tensorboard", "'track' is not a grid key: use --track"),
])
def test_parse_grid_refuses_ambiguous_grids(spec: str, message: str) -> None:
    with pytest.raises(MMCacheError) as e:
        parse_grid(spec)
    assert message in str(e.value)


def test_toml_dotted_keys_and_subtables_are_grid_keys(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text('seeds = [0, 1]\n[grid]\nhp.D = [8, 16]\nloss = "focal"\n[grid.loss]\n')
    with pytest.raises(MMCacheError, match="is not valid TOML"):  # `loss` a string and a table at once
        load_grid_file(f)
    f.write_text('[grid]\nhp.D = [8, 16]\nhp.dropout = 0.1\n"loss.gamma" = [1, 2]\n')
    spec, seeds = load_grid_file(f)
    assert parse_grid(spec) == {"hp.D": [8, 16], "hp.dropout": [0.1], "loss.gamma": [1, 2]}
    assert seeds is None
    f.write_text('[grid.hp]\nD = [8, 16]\n[grid.loss]\ngamma = 2\n')
    assert parse_grid(load_grid_file(f)[0]) == {"hp.D": [8, 16], "loss.gamma": [2]}
    f.write_text('seeds = [1, 1]\n[grid]\nlr = 1e-3\n')
    with pytest.raises(MMCacheError, match="seeds lists a seed twice"):
        load_grid_file(f)


def test_a_grid_key_named_like_a_metric_never_ranks_the_table() -> None:
    rows = [{"config": f"val_fraction={vf},lr={lr}", "val_fraction": vf, "lr": lr, "seed": 0, "head": "linear",
             "val_accuracy": acc, "test_accuracy": 0.5, "seconds": 1.0}
            for vf, lr, acc in ((0.1, 1e-3, 0.6), (0.2, 1e-3, 0.9), (0.3, 1e-2, 0.7))]
    summary = summarize(rows)
    assert [s["val_accuracy"] for s in summary] == [0.9, 0.7, 0.6]
    assert all("val_fraction_std" not in s for s in summary)
    assert [s["val_fraction"] for s in summary] == [0.2, 0.3, 0.1]  # kept as a setting, for --columns
    table = format_table(summary, columns=["config", "val_fraction", "val_top2_accuracy"])
    assert table.splitlines()[2].split() == ["val_fraction=0.2,lr=0.001", "0.2", "-"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--seeds", "0,0"], "--seeds lists a seed twice ('0,0')"),
    (["--grid", "seed=1,2"], "'seed' is not a grid key"),
    (["--grid", "D=4,4"], "D lists 4 twice"),
    (["--grid", "lr=1e-3", "--columns", "config,nope"], "--columns: unknown column(s) ['nope']"),
])
def test_sweep_cli_refuses_before_training(toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    rc = run(["sweep", "--dataset", "toy", "--vtype", "feat", "--cache-dir", str(toy_cache), "--epochs", "1",
              "--runs-dir", str(tmp_path / "runs"), *extra], monkeypatch)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and message in errors[0], err
    assert "sweep:" not in err  # nothing trained
    assert not (tmp_path / "runs").exists()


def test_grid_and_grid_file_naming_one_setting_is_refused(toy_cache: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "g.toml"
    f.write_text("[grid]\nhp.D = [4, 8]\n")
    rc = run(["sweep", "--dataset", "toy", "--vtype", "feat", "--cache-dir", str(toy_cache), "--epochs", "1",
              "--runs-dir", str(tmp_path / "runs"), "--grid-file", str(f), "--grid", "D=16"], monkeypatch)
    assert rc == 2
    assert f"--grid and --grid-file {f} both set ['hp.D']" in capsys.readouterr().err


def test_columns_of_grid_keys_and_any_metric_print_after_training(
        make_cache: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    cache = make_cache()
    out = tmp_path / "res" / "s"
    rc = run(["sweep", "--dataset", "toy", "--vtype", "feat", "--ttype", "feat", "--cache-dir", str(cache),
              "--epochs", "1", "--hp", "D=4", "--runs-dir", str(tmp_path / "runs"), "--out", str(out),
              "--grid", "lr=1e-3,1e-2;loss.gamma=2;loss=focal",
              "--columns", "config,loss.gamma,val_top2_accuracy,test_loss"], monkeypatch)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.splitlines()
    assert lines[0].split() == ["config", "loss.gamma", "val_top2_accuracy", "test_loss"]
    body = [line.split() for line in lines[2:4]]
    assert {b[0] for b in body} == {"lr=0.001,loss.gamma=2,loss=focal", "lr=0.01,loss.gamma=2,loss=focal"}
    assert all(b[1] == "2" and 0.0 <= float(b[2]) <= 1.0 and b[3] == "-" for b in body)
    summary = json.loads(out.with_suffix(".json").read_text())["summary"]
    assert all(s["loss.gamma"] == 2 and "val_top2_accuracy" in s for s in summary)


def test_output_places_that_cannot_be_written_are_refused_before_training(
        toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("")
    (tmp_path / "res" / "s.csv").mkdir(parents=True)
    common = ["--dataset", "toy", "--vtype", "feat", "--cache-dir", str(toy_cache), "--epochs", "1"]
    cases = [
        (["sweep", *common, "--out", str(blocker / "s")], f"--out {blocker / 's'}: {blocker} is a file, not a folder"),
        (["sweep", *common, "--out", str(tmp_path / "res" / "s")], f"{tmp_path / 'res' / 's.csv'} is a folder"),
        (["sweep", *common, "--save-runs", "--runs-dir", str(blocker / "runs"), "--out", str(tmp_path / "t")],
         f"--runs-dir {blocker / 'runs' / 'toy'}: {blocker} is a file, not a folder"),
        (["train", *common, "--runs-dir", str(blocker / "runs")], f"{blocker} is a file, not a folder"),
    ]
    for argv, message in cases:
        rc = run(argv, monkeypatch)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and message in errors[0], err
        assert "Traceback" not in err and "sweep:" not in err  # refused before training
    real_access = os.access  # tmp_path read-only (root may write anywhere, so pretend)
    monkeypatch.setattr("os.access", lambda path, mode: Path(path) != tmp_path and real_access(path, mode))
    rc = run(["sweep", *common, "--out", str(tmp_path / "ro" / "s")], monkeypatch)
    assert rc == 2
    assert f"error: --out {tmp_path / 'ro' / 's'}: {tmp_path} is not writable" in capsys.readouterr().err


def test_ctrl_c_says_what_is_kept(toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    import mmcache.heads.sweep
    import mmcache.heads.train

    runs = tmp_path / "runs"

    def sweep_interrupted(*args: object, **kw: object) -> None:  # one group written, then Ctrl-C
        (runs / "toy" / "sweeps" / "s" / "base_seed0").mkdir(parents=True)
        raise KeyboardInterrupt

    def train_interrupted(*args: object, **kw: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(mmcache.heads.sweep, "run_sweep", sweep_interrupted)
    monkeypatch.setattr(mmcache.heads.train, "train", train_interrupted)
    common = ["--dataset", "toy", "--vtype", "feat", "--cache-dir", str(toy_cache), "--runs-dir", str(runs)]
    assert run(["sweep", *common, "--save-runs", "--out", str(tmp_path / "s")], monkeypatch) == 130
    err = capsys.readouterr().err
    assert "interrupted: no table was written" in err
    assert f"the run folders finished before it stay in {runs / 'toy' / 'sweeps' / 's'}" in err
    assert "rerun the same command to resume" not in err  # a sweep does not resume
    assert run(["train", *common], monkeypatch) == 130
    err = capsys.readouterr().err
    assert "interrupted: no run folder was written; nothing resumes" in err
    assert "resume" not in err.replace("nothing resumes", "")
