"""Hostile command-line inputs to `heads train` / `heads sweep`: each is one `error:` line, exit 2, no traceback;
and flags given on the command line are never silently overridden."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mmcache.errors import MMCacheError, out_of_memory
from mmcache.utils import pick_device
from tests.heads.conftest import run_heads as run


def one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize(("extra", "message"), [
    (["--seed", "-1"], "--seed must be a whole number >= 0 and <= 4294967295, got -1"),
    (["--seed", str(2**32)], "--seed must be a whole number"),
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--device", "cuda:x"], "--device 'cuda:x' is not a device"),
    (["--device", "cuda:63"], "--device 'cuda:63': no such GPU on this machine"),
])
def test_train_refuses_bad_seed_and_device(toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    rc = run(["train", "--dataset", "toy", "--vtype", "feat", "--cache-dir", str(toy_cache),
              "--runs-dir", str(tmp_path / "runs"), "--epochs", "1", *extra], monkeypatch)
    assert rc == 2
    assert message in one_error(capsys)
    assert not (tmp_path / "runs").exists()  # refused before a run folder is made


def test_pick_device_checks_what_it_is_given() -> None:
    assert pick_device("cpu") == "cpu"
    assert pick_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(MMCacheError, match="no such GPU"):
        pick_device(f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(MMCacheError, match="is not a device"):
        pick_device("gpu0")


def test_a_head_too_large_for_memory_is_one_line(toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def no_memory(*args: object, **kwargs: object) -> None:  # the allocation torch refuses for a huge --D
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 51200000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", no_memory)
    rc = run(["train", "--dataset", "toy", "--vtype", "feat", "--cache-dir", str(toy_cache),
              "--runs-dir", str(tmp_path / "runs"), "--epochs", "1", "--D", "100000000"], monkeypatch)
    assert rc == 2
    line = one_error(capsys)
    assert "head 'linear' (D=100000000) does not fit in memory (tried to allocate 51.2 GB)" in line
    assert "smaller D" in line


def test_out_of_memory_is_told_from_other_errors() -> None:
    assert out_of_memory(MemoryError()) == "out of memory"
    assert out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 47.68 GiB (GPU 0; 79 GiB total)")) \
        == "tried to allocate 47.68 GiB"
    assert out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert out_of_memory(ValueError("out of memory")) is None


def test_an_out_of_memory_anywhere_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from mmcache.cliutil import run_app

    def app(**kwargs: object) -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(SystemExit) as e:
        run_app(app)
    assert e.value.code == 2
    assert "out of memory (tried to allocate 2.00 GiB); use a smaller --batch-size" in one_error(capsys)

    def bug(**kwargs: object) -> None:
        raise RuntimeError("some other failure")

    with pytest.raises(RuntimeError, match="some other failure"):  # not a memory error: not hidden
        run_app(bug)


@pytest.mark.parametrize(("seeds", "message"), [
    ("-1", "--seeds expects a comma list of whole numbers from 0 to 4294967295, got '-1'"),
    (" , ", "--seeds expects a comma list of whole numbers"),
    ("a", "--seeds expects a comma list of integers, got 'a'"),
])
def test_sweep_refuses_bad_seeds(toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str], seeds: str, message: str) -> None:
    rc = run(["sweep", "--dataset", "toy", "--vtype", "feat", "--cache-dir", str(toy_cache),
              "--runs-dir", str(tmp_path / "runs"), "--epochs", "1", f"--seeds={seeds}"], monkeypatch)
    assert rc == 2
    assert message in one_error(capsys)


def test_sweep_seeds_flag_wins_over_the_grid_file(toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    grid = tmp_path / "study.toml"
    grid.write_text("seeds = [0, 1, 2]\n[grid]\nD = [8]\n")
    base = ["sweep", "--dataset", "toy", "--vtype", "feat", "--cache-dir", str(toy_cache), "--runs-dir",
            str(tmp_path / "runs"), "--epochs", "1", "--grid-file", str(grid)]
    assert run([*base, "--seeds", "0", "--out", str(tmp_path / "flag")], monkeypatch) == 0
    assert [r["seed"] for r in json.loads((tmp_path / "flag.json").read_text())["rows"]] == [0]
    assert run([*base, "--out", str(tmp_path / "file")], monkeypatch) == 0  # no --seeds: the file's
    assert sorted(r["seed"] for r in json.loads((tmp_path / "file.json").read_text())["rows"]) == [0, 1, 2]


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot be read (Is a directory); pass a TOML file"),
    ("seeds = [-1]\n[grid]\nD = [8]\n", "seeds must be a non-empty list of whole numbers from 0 to 4294967295"),
    ("seeds = []\n[grid]\nD = [8]\n", "seeds must be a non-empty list"),
])
def test_sweep_refuses_unreadable_grid_files(toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str], content: str | None,
                                             message: str) -> None:
    grid = tmp_path / "grid.toml"
    if content is None:
        grid.mkdir()
    else:
        grid.write_text(content)
    rc = run(["sweep", "--dataset", "toy", "--vtype", "feat", "--cache-dir", str(toy_cache),
              "--runs-dir", str(tmp_path / "runs"), "--epochs", "1", "--grid-file", str(grid)], monkeypatch)
    assert rc == 2
    assert message in one_error(capsys)


def test_a_store_of_another_dataset_is_refused(make_cache: object, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Same ids, other rows: a store copied from another dataset's cache is refused, not trained on."""
    import shutil

    from tests.heads.conftest import build_cache

    cache = tmp_path / "cache"
    build_cache(cache, dataset="toy")
    build_cache(cache, dataset="other", seed=1)  # the same ids r0000... with other features and labels
    shutil.copy(cache / "other" / "image" / "feat.h5", cache / "toy" / "image" / "copied.h5")
    rc = run(["train", "--dataset", "toy", "--vtype", "copied", "--ttype", "feat", "--cache-dir", str(cache),
              "--runs-dir", str(tmp_path / "runs"), "--epochs", "1"], monkeypatch)
    assert rc == 2
    line = one_error(capsys)
    assert f"{cache / 'toy' / 'image' / 'copied.h5'} holds features of dataset 'other'" in line
    assert "is of 'toy'" in line


def test_non_finite_rows_and_classes_without_train_rows_are_warned(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from mmcache.cache.store import FeatureStore, store_path
    from mmcache.data.base import Dataset, LabelSpace, Sample
    from mmcache.heads.data import load_cached

    cache = tmp_path / "cache"
    n = 40
    split = ["train"] * 30 + ["val"] * 5 + ["test"] * 5
    label = [i % 2 for i in range(30)] + [2, 0, 1, 2, 0] + [0, 1, 2, 0, 1]  # class 2 never in train
    samples = [Sample(id=f"r{i:02d}", split=split[i], labels={"label": label[i]}) for i in range(n)]
    Dataset(name="t", samples=samples, labels=LabelSpace(tasks={"label": ["a", "b", "c"]}), root=cache
            ).write_manifest(cache / "t" / "manifest.json")
    x = np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)
    x[[3, 7]] = np.nan
    with FeatureStore(store_path(cache, "t", "image", "f"), {"preset": "p"}, "t", capacity=n, dtype="float32") as st:
        st.write([s.id for s in samples], {"pooled": x})
    data = load_cached("t", {"image": "f"}, cache)
    err = capsys.readouterr().err
    assert "2 rows of" in err and "hold NaN or inf in 'pooled' (e.g. 'r03', 'r07')" in err
    assert "task 'label': class(es) ['c'] have no train rows" in err
    assert len(data.ids) == n  # the rows stay (their modality counts as missing)
    load_cached("t", {"image": "f"}, cache, quiet=True)  # problems of the data are told even when quiet
    assert "hold NaN or inf" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--dataset", "toy", "--D", "abc"], "error: Invalid value for '--D'"),
    (["train", "--dataset", "toy", "--bogus"], "error: No such option: --bogus"),
    (["train"], "error: Missing option '--dataset'."),
    (["nope"], "error: No such command 'nope'."),
])
def test_command_line_mistakes_are_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                            argv: list[str], message: str) -> None:
    """click's own errors (wrong type, unknown option or command, missing option): one line, exit 2, no box."""
    assert run(argv, monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message), err
    assert "╭" not in err and "Usage:" not in err


def test_help_and_exit_codes_are_kept(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                      tmp_path: Path) -> None:
    assert run(["train", "--help"], monkeypatch) == 0
    assert "--dataset" in capsys.readouterr().out
    assert run([], monkeypatch) == 2  # no arguments: the help
    assert "Usage" in capsys.readouterr().out
    from mmcache.cache.cli import main as cache_main

    monkeypatch.setattr(sys, "argv", ["mmcache-cache", "verify", str(tmp_path / "nothing.h5")])
    with pytest.raises(SystemExit) as e:
        cache_main()
    assert e.value.code == 2


def test_tables_show_the_width_d_set_on_scabg(make_cache: object, tmp_path: Path) -> None:
    """scabg takes --D as its hidden width: sweep and run tables show it, not None."""
    from mmcache.heads.sweep import configs_from, run_sweep
    from mmcache.heads.train import TrainConfig
    from mmcache.runs import collect, head_width

    assert head_width({"D": None, "hidden": 32}) == 32 and head_width({"D": 8}) == 8 and head_width({}) is None
    cache = make_cache(n=60, tokens=True)  # type: ignore[operator]
    base = TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(cache),
                       runs_dir=str(tmp_path / "runs"), epochs=1, batch_size=32, head_hparams={"D": 16}, quiet=True)
    rows = run_sweep(base, configs_from("head=scabg,linear", False), out=tmp_path / "s", save_runs=True)
    assert {r["head"]: r["D"] for r in rows} == {"scabg": 16, "linear": 16}
    assert {r["head"]: r["D"] for r in collect(tmp_path)} == {"scabg": 16, "linear": 16}


def test_grid_takes_the_train_flag_names() -> None:
    """`--grid 'select=...;patience=...'` (the `heads train` flags) set those options; they were taken as head
    hyperparameters and every run failed."""
    from mmcache.heads.sweep import apply_overrides
    from mmcache.heads.train import TrainConfig

    base = TrainConfig(dataset="toy", modalities={"image": "feat"})
    cfg = apply_overrides(base, {"select": "label:macro_f1", "patience": 3, "l2_grid": [0.1, 0.01], "D": 8})
    assert cfg.select_metric == "label:macro_f1" and cfg.early_stopping == 3 and cfg.lbfgs_grid == [0.1, 0.01]
    assert cfg.head_hparams == {"D": 8}


def test_sweep_refuses_an_unknown_column_before_training(toy_cache: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc = run(["sweep", "--dataset", "toy", "--vtype", "feat", "--cache-dir", str(toy_cache), "--runs-dir",
              str(tmp_path / "runs"), "--epochs", "1", "--grid", "D=8", "--columns", "config,nope",
              "--out", str(tmp_path / "s")], monkeypatch)
    assert rc == 2
    assert "--columns: unknown column(s) ['nope']" in one_error(capsys)
    assert not (tmp_path / "s.csv").exists()  # nothing trained or written
    assert run(["sweep", "--dataset", "toy", "--vtype", "feat", "--cache-dir", str(toy_cache), "--runs-dir",
                str(tmp_path / "runs"), "--epochs", "1", "--grid", "D=8,16", "--columns", "config,D,test_auroc",
                "--out", str(tmp_path / "s")], monkeypatch) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["config", "D", "test_auroc"]


def test_sweep_folds_on_own_splits_is_one_error_before_any_run(toy_cache: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc = run(["sweep", "--dataset", "toy", "--vtype", "feat", "--cache-dir", str(toy_cache), "--runs-dir",
              str(tmp_path / "runs"), "--epochs", "1", "--grid", "D=8,16", "--folds", "3"], monkeypatch)
    assert rc == 2
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        ln for ln in err.splitlines() if "--folds: 'toy' has its own splits" in ln]
    assert "warning: sweep config" not in err and "sweep:" not in err  # refused once, before any config runs


@pytest.mark.parametrize(("extra", "message"), [
    (["--l2-grid", "1e-2"], "--l2-grid and --l2-batched set the penalties of --solver lbfgs"),  # was ignored
    (["--l2-batched"], "--l2-grid and --l2-batched set the penalties of --solver lbfgs"),
    (["--solver", "lbfgs", "--l2-grid", ","], "--l2-grid must list at least one penalty"),  # was the default grid
    (["--solver", "lbfgs", "--l2-grid", "inf"], "--l2-grid: every penalty must be a number > 0, got inf"),
    (["--solver", "lbfgs", "--l2-grid", "1e-2,-1"], "--l2-grid: every penalty must be a number > 0, got -1.0"),
    (["--schedule", "none", "--warmup", "0.2"], "--warmup warms up the cosine schedule; --schedule none has none"),
    (["--schedule", "plateau", "--warmup", "0.1"], "--schedule plateau has none"),
    (["--solver", "lbfgs", "--oversample"], "--oversample: --solver lbfgs fits full batch"),
    (["--solver", "lbfgs", "--patience", "3"], "--patience: --solver lbfgs fits full batch"),
    (["--solver", "lbfgs", "--weight-decay", "0.1"], "--weight-decay: --solver lbfgs fits full batch"),
])
def test_flags_that_would_be_ignored_are_refused(toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str], extra: list[str],
                                                 message: str) -> None:
    """--l2-grid is checked and never ignored; flags the run would not use are refused before any work."""
    rc = run(["train", "--dataset", "toy", "--vtype", "feat", "--cache-dir", str(toy_cache),
              "--runs-dir", str(tmp_path / "runs"), "--epochs", "1", *extra], monkeypatch)
    assert rc == 2
    assert message in one_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_a_non_finite_logit_adjustment_reads_plainly(toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    rc = run(["train", "--dataset", "toy", "--vtype", "feat", "--cache-dir", str(toy_cache),
              "--runs-dir", str(tmp_path / "runs"), "--epochs", "1", "--logit-adjust", "nan"], monkeypatch)
    assert rc == 2
    line = one_error(capsys)
    assert "--logit-adjust must be a number (finite), got nan" in line and "-inf" not in line


@pytest.mark.parametrize("hp", [{"D": 0}, {"D": 8}], ids=["stacked-probe", "per-config-loop"])
def test_one_labelled_train_row_is_refused_on_every_path(tmp_path: Path, hp: dict[str, int]) -> None:
    """A batch needs 2 rows: with one labelled train row nothing would train, on the stacked probe path as
    on the per-config loop; both say so instead of returning an untrained head."""
    import numpy as np

    from mmcache.cache.store import FeatureStore, store_path
    from mmcache.data.base import Dataset, LabelSpace, Sample
    from mmcache.errors import MMCacheError
    from mmcache.heads.train import TrainConfig, train

    cache = tmp_path / "cache"
    split = ["train"] * 3 + ["val"] * 4 + ["test"] * 4
    label = [1, None, None, 0, 1, 0, 1, 0, 1, 0, 1]  # two of the three train rows are unlabelled
    samples = [Sample(id=f"r{i:02d}", split=s, labels={} if y is None else {"label": y})
               for i, (s, y) in enumerate(zip(split, label, strict=True))]
    Dataset(name="t", samples=samples, labels=LabelSpace(tasks={"label": ["a", "b"]}), root=cache
            ).write_manifest(cache / "t" / "manifest.json")
    x = np.random.default_rng(0).normal(size=(len(samples), 4)).astype(np.float32)
    with FeatureStore(store_path(cache, "t", "image", "f"), {"preset": "p"}, "t", capacity=len(samples),
                      dtype="float32") as st:
        st.write([s.id for s in samples], {"pooled": x})
    cfg = TrainConfig(dataset="t", modalities={"image": "f"}, cache_dir=str(cache), head_hparams=hp, epochs=2,
                      save=False, quiet=True)
    with pytest.raises(MMCacheError, match=r"'t' has 1 labelled train row\(s\); a head needs at least 2"):
        train(cfg)
