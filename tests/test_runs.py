"""`heads runs`: one table over real run folders (heads train, CV folds, finetune run); filters, sort, --best."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmcache.errors import MMCacheError
from mmcache.heads.train import TrainConfig, train
from tests.heads.conftest import build_cache
from tests.runfolders import write_complete_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three heads runs on `toy` (two heads, two seeds) and one finetune run on `demo`."""
    from mmcache.data.demo import generate_demo
    from mmcache.finetune.run import FinetuneConfig, finetune

    tmp = tmp_path_factory.mktemp("runs")
    cache = tmp / "cache"
    build_cache(cache, n=200)
    runs = tmp / "runs"
    for name, head, seed, lr in (("lin0", "linear", 0, 1e-2), ("lin1", "linear", 1, 1e-2), ("gat0", "gated", 0, 3e-3)):
        train(TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(cache),
                          runs_dir=str(runs), head=head, head_hparams={"D": 8}, epochs=4, batch_size=64, lr=lr,
                          seed=seed, quiet=True, run_name=name))
    demo = generate_demo(tmp / "demo", n=40, seed=1)
    finetune(FinetuneConfig(dataset="demo", data_dir=str(demo), encoders={"image": "clip-tiny", "text": "clip-tiny"},
                            runs_dir=str(runs), epochs=1, batch_size=16, num_workers=0, quiet=True,
                            head_hparams={"D": 16}, run_name="ft"))
    write_complete_run(runs / "toy" / "broken", {}, {})
    (runs / "toy" / "broken" / "config.json").write_text("{")
    return runs


def heads(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from mmcache.heads.cli import main

    monkeypatch.setattr(sys, "argv", ["heads", "runs", *argv])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def as_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_csv_rows_hold_each_runs_values(runs: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = heads(["--runs-dir", str(runs), "--format", "csv"], monkeypatch, capsys)
    assert code == 0 and "skipped" in err and "broken" in err  # an unreadable folder is a warning, not a stop
    rows = {r["run"]: r for r in as_csv(out)}
    assert set(rows) == {"toy/lin0", "toy/lin1", "toy/gat0", "demo/ft"}
    for name in ("lin0", "lin1", "gat0"):
        m = json.loads((runs / "toy" / name / "metrics.json").read_text())
        r = rows[f"toy/{name}"]
        assert float(r["test_accuracy"]) == pytest.approx(m["splits"]["test"]["label"]["accuracy"])
        assert float(r["val"]) == pytest.approx(m["select"]["value"]) and r["select"] == "label:accuracy"
        assert float(r["seconds"]) == pytest.approx(m["seconds"])
        assert (r["kind"], r["dataset"], r["stores"], r["D"]) == ("heads", "toy", "image-feat+text-feat", "8")
    assert (rows["toy/lin1"]["seed"], rows["toy/lin1"]["head"], float(rows["toy/lin1"]["lr"])) == ("1", "linear", 0.01)
    ft = rows["demo/ft"]
    assert (ft["kind"], ft["stores"], ft["head"], ft["D"]) == ("finetune", "image-clip-tiny+text-clip-tiny", "linear", "16")
    assert ft["date"][:2] == "20" and len(ft["date"]) == len("2026-01-01 12:00")


def test_filters_sort_and_best(runs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--runs-dir", str(runs), "--format", "csv"]
    _, out, _ = heads([*base, "--dataset", "toy", "--where", "head=linear", "--where", "lr=0.01"], monkeypatch, capsys)
    assert sorted(r["run"] for r in as_csv(out)) == ["toy/lin0", "toy/lin1"]
    _, out, _ = heads([*base, "--where", "head_hparams.D=16"], monkeypatch, capsys)  # a config key
    assert [r["run"] for r in as_csv(out)] == ["demo/ft"]
    _, out, _ = heads([*base, "--dataset", "toy", "--sort", "test_accuracy"], monkeypatch, capsys)
    accs = [float(r["test_accuracy"]) for r in as_csv(out)]
    assert accs == sorted(accs, reverse=True) and len(accs) == 3
    _, out, _ = heads([*base, "--dataset", "toy", "--sort", "seconds"], monkeypatch, capsys)
    secs = [float(r["seconds"]) for r in as_csv(out)]
    assert secs == sorted(secs)
    _, out, _ = heads([*base, "--best"], monkeypatch, capsys)
    best = {(r["dataset"], r["head"]): r for r in as_csv(out)}
    assert set(best) == {("toy", "linear"), ("toy", "gated"), ("demo", "linear")}
    lin = [json.loads((runs / "toy" / n / "metrics.json").read_text())["select"]["value"] for n in ("lin0", "lin1")]
    assert float(best[("toy", "linear")]["val"]) == pytest.approx(max(lin))


def test_text_and_markdown_tables(runs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = heads(["--runs-dir", str(runs), "--dataset", "toy"], monkeypatch, capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:4] == ["run", "kind", "dataset", "stores"] and "test_accuracy" in lines[0]
    assert len(lines) == 2 + 3 and all("toy/" in ln for ln in lines[2:])
    _, out, _ = heads(["--runs-dir", str(runs), "--dataset", "toy", "--columns", "run,val,seed"], monkeypatch, capsys)
    assert out.splitlines()[0].split() == ["run", "val", "seed"]
    code, out, _ = heads(["--runs-dir", str(runs), "--format", "md", "--dataset", "demo"], monkeypatch, capsys)
    md = out.splitlines()
    assert md[0].startswith("| run") and set(md[1]) <= {"|", "-", ":"} and "demo/ft" in md[2]


@pytest.mark.parametrize(("argv", "message"), [
    (["--where", "head"], "--where expects KEY=VALUE"),
    (["--sort", "nope"], "--sort 'nope': unknown column"),
    (["--format", "html"], "--format 'html'"),
    (["--columns", "run,nope"], "--columns: unknown column(s) ['nope']"),
    (["--runs-dir", "/no/such/folder"], "does not exist"),
    (["--where", "haed=linear"], "--where 'haed': no run has this column or config key"),  # a typo, not 0 rows
])
def test_user_errors_are_one_line(runs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                  argv: list[str], message: str) -> None:
    code, _, err = heads(["--runs-dir", str(runs), *argv], monkeypatch, capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err


def test_runs_table_loads_no_torch(runs: Path) -> None:
    code = ("import sys; from mmcache.heads.cli import main; sys.argv = ['heads', 'runs', '--runs-dir', sys.argv[1]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code, str(runs)], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip().splitlines()[-1] == "False", res.stderr


def test_sweep_save_runs_gives_each_run_its_own_folder(tmp_path: Path) -> None:
    from mmcache.heads.sweep import run_sweep
    from mmcache.runs import collect

    cache = tmp_path / "cache"
    build_cache(cache, n=120)
    base = TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(cache),
                       runs_dir=str(tmp_path / "runs"), epochs=2, batch_size=64, head_hparams={"D": 4})
    rows = run_sweep(base, [("lr=0.01", {"lr": 0.01}), ("lr=0.003", {"lr": 0.003})], seeds=[0, 1], save_runs=True)
    dirs = {r["run_dir"] for r in rows}
    assert len(dirs) == 4  # configs sharing a name stem and a second never share (and overwrite) a folder
    for r in rows:
        conf = json.loads((Path(r["run_dir"]) / "config.json").read_text())
        assert (conf["lr"], conf["seed"]) == (r["lr"], r["seed"])
    assert sorted((x["lr"], x["seed"]) for x in collect(tmp_path / "runs")) == [
        (0.003, 0), (0.003, 1), (0.01, 0), (0.01, 1)]
    # Each folder says which config and seed it holds, beside the sweep's table of the same name.
    assert sorted(Path(r["run_dir"]).relative_to(tmp_path / "runs") for r in rows) == [
        Path("toy/sweeps/sweep", f"lr-{lr}_seed{s}") for lr in ("0.003", "0.01") for s in (0, 1)]
    with pytest.raises(MMCacheError, match="earlier sweep named 'sweep'; choose another --out"):
        run_sweep(base, [("lr=0.01", {"lr": 0.01})], seeds=[0], save_runs=True)
    assert len(collect(tmp_path / "runs")) == 4  # nothing of the first sweep was overwritten


def test_run_folder_names_of_configs() -> None:
    from mmcache.heads.sweep import run_folder_name

    assert run_folder_name("head=linear,D=128") == "head-linear_D-128"
    assert run_folder_name("base/bands=0") == "base__bands-0"
    assert run_folder_name("vtype=clip[pooling=cls]") == "vtype-clippooling-cls"
    assert run_folder_name("'';") == "config"


def test_a_run_over_several_datasets_is_named_as_its_folder(tmp_path: Path) -> None:
    """`--dataset mmhs150k,fakeddit` runs live in `runs/mmhs150k-fakeddit/`: the table names them so, and the filter
    takes either spelling."""
    from mmcache.runs import collect

    d = tmp_path / "runs" / "mmhs150k-fakeddit" / "r"
    write_complete_run(d, {"dataset": "mmhs150k,fakeddit", "modalities": {"image": "clip"}, "head": "linear",
                           "lr": 0.001, "seed": 0},
                       {"select": {"task": "label", "metric": "macro_f1", "value": 0.5},
                        "splits": {"test": {"label": {"accuracy": 0.6}}}, "seconds": 1.0})
    for name in (None, "mmhs150k,fakeddit", "mmhs150k-fakeddit", "mmhs150k, fakeddit"):
        rows = collect(tmp_path / "runs", dataset=name)
        assert [r["dataset"] for r in rows] == ["mmhs150k-fakeddit"], name
    assert collect(tmp_path / "runs", dataset="mmhs150k") == []
