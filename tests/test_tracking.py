"""--track tensorboard / mlflow: runs read back with each backend's own reader (event files, mlflow client)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from mmcache.errors import MMCacheError
from mmcache.heads.sweep import run_sweep
from mmcache.heads.train import TrainConfig, train
from mmcache.tracking import final_metrics, require
from tests.heads.conftest import build_cache


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    c = tmp_path / "cache"
    build_cache(c, n=200)
    return c


def _cfg(cache: Path, tmp_path: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(cache),
                                   runs_dir=str(tmp_path / "runs"), epochs=4, batch_size=64, lr=1e-2,
                                   head_hparams={"D": 8}, quiet=True)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_tensorboard_run_reads_back(cache: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    res = train(_cfg(cache, tmp_path, track="tensorboard", run_name="tb"))
    logdir = tmp_path / "runs" / "tensorboard" / "toy" / "tb"
    s = _scalars(logdir)
    # per-epoch curves, step = epoch
    assert [step for step, _ in s["epoch/train_loss"]] == [1, 2, 3, 4]
    for row, (_, v) in zip(res.curves, s["epoch/val_accuracy"], strict=True):
        assert v == pytest.approx(row["val_accuracy"], rel=1e-6)
    # final metrics at the chosen epoch, confusion counts and checks
    test = res.metrics["test"]["label"]
    assert s["test/label/accuracy"] == [(res.best_epoch, pytest.approx(test["accuracy"], rel=1e-6))]
    cells = {k: v[0][1] for k, v in s.items() if k.startswith("test/label/confusion/")}
    assert len(cells) == 9 and sum(cells.values()) == test["n"]
    assert cells["test/label/confusion/negative/negative"] == test["confusion_matrix"][0][0]
    assert s["test/label/check/no_nan"][0][1] == 1.0
    assert s["best/val_accuracy"][0][1] == pytest.approx(res.select["value"], rel=1e-6)
    # parameters: the HPARAMS plugin's session, with the parameter counts and the device
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    hp = {k: v.number_value if v.HasField("number_value") else v.string_value for k, v in info.hparams.items()}
    assert hp["params_total"] == sum(p.numel() for p in res.head.parameters())
    assert hp["params_trainable"] == hp["params_total"] and hp["device"] == "cpu" and hp["lr"] == 0.01
    from tensorboard.util import tensor_util

    def text(tag: str) -> str:
        raw = tensor_util.make_ndarray(acc.Tensors(f"{tag}/text_summary")[0].tensor_proto)
        return raw.item().decode() if raw.shape == () else raw.ravel()[0].decode()

    assert json.loads(text("checks").strip("`\n"))["test"]["label"]["no_nan"]["ok"] is True
    conf = json.loads(text("confusion").strip("`\n"))
    assert conf["test"]["label"]["matrix"] == test["confusion_matrix"]
    assert str(res.run_dir) in text("run")


def test_mlflow_train_and_nested_sweep_read_back(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # mlflow keeps artifacts beside the working folder
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    res = train(_cfg(cache, tmp_path, track="mlflow", run_name="ml"))
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("toy")
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "ml" and run.info.status == "FINISHED"
    p = run.data.params
    assert int(p["params_total"]) == sum(x.numel() for x in res.head.parameters()) == int(p["params_trainable"])
    assert p["device"] == "cpu" and float(p["lr"]) == 0.01 and p["head_hparams.D"] == "8" and p["seed"] == "0"
    hist = client.get_metric_history(run.info.run_id, "epoch/val_loss")
    assert [m.step for m in hist] == [1, 2, 3, 4]
    assert [m.value for m in hist] == pytest.approx([r["val_loss"] for r in res.curves], rel=1e-6)
    for k, v in final_metrics(res).items():
        assert run.data.metrics[k] == pytest.approx(v, rel=1e-6), k
    assert run.data.tags["kind"] == "heads" and run.data.tags["dataset"] == "toy"
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "run")}
    assert {"run/model.safetensors", "run/config.json", "run/curves.png", "run/confusion_label.png"} <= arts
    checks = json.loads(Path(client.download_artifacts(run.info.run_id, "checks.json", str(tmp_path))).read_text())
    assert checks["test"]["label"]["no_nan"]["ok"] is True
    confusion = json.loads(Path(client.download_artifacts(run.info.run_id, "confusion.json", str(tmp_path))).read_text())
    assert confusion["test"]["label"]["matrix"] == res.metrics["test"]["label"]["confusion_matrix"]

    # A sweep: one parent run, one child per config and seed, the tables and plot on the parent.
    rows = run_sweep(_cfg(cache, tmp_path, track="mlflow"), [("D=4", {"D": 4}), ("D=8", {"D": 8})], seeds=[0, 1],
                     out=tmp_path / "sweeps" / "s1")
    runs = client.search_runs([exp.experiment_id], "tags.kind != 'group'")
    parent = client.search_runs([exp.experiment_id], "tags.kind = 'group'")[0]
    assert parent.info.run_name == "s1"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["D=4 seed0", "D=4 seed1", "D=8 seed0", "D=8 seed1"]
    by_name = {r.info.run_name: r for r in children}
    for row in rows:
        child = by_name[f"{row['config']} seed{row['seed']}"]
        assert child.data.metrics["test/label/accuracy"] == pytest.approx(row["test_accuracy"], rel=1e-6)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "results")} == {
        f"results/s1.{x}" for x in ("csv", "md", "json", "png")}


def test_missing_backend_is_one_line(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(MMCacheError, match=r"--track mlflow needs mlflow: pip install 'mmcache\[track\]'"):
        require("mlflow")
    with pytest.raises(MMCacheError, match="unknown --track 'wandb'"):
        require("wandb")
    from mmcache.heads.cli import main

    for kind, msg in (("mlflow", "pip install 'mmcache[track]'"), ("wandb", "choose one of mlflow, tensorboard")):
        monkeypatch.setattr(sys, "argv", ["heads", "train", "--dataset", "toy", "--vtype", "feat", "--cache-dir",
                                          str(cache), "--runs-dir", str(tmp_path / "runs"), "--track", kind])
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "runs").exists()  # refused before anything trained


def test_finetune_run_is_tracked(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from mmcache.data.demo import generate_demo
    from mmcache.finetune.run import FinetuneConfig, finetune

    demo = generate_demo(tmp_path / "demo", n=60, seed=1)
    res = finetune(FinetuneConfig(dataset="demo", data_dir=str(demo), encoders={"image": "clip-tiny", "text": "clip-tiny"},
                                  runs_dir=str(tmp_path / "runs"), epochs=2, batch_size=16, num_workers=0, quiet=True,
                                  head_hparams={"D": 16}, run_name="ft", track="tensorboard"))
    assert res is not None
    s = _scalars(tmp_path / "runs" / "tensorboard" / "demo" / "ft")
    assert [step for step, _ in s["epoch/train_loss"]] == [1, 2]
    assert s["test/label/accuracy"][0][1] == pytest.approx(res.metrics["test"]["label"]["accuracy"], rel=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(tmp_path / "runs" / "tensorboard" / "demo" / "ft"))
    acc.Reload()
    info = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    stats = res.config["resolved"]["train"]
    assert info.hparams["params_total"].number_value == stats["total_params"]
    # the encoders train too: far more trainable parameters than the head has
    assert info.hparams["params_trainable"].number_value == stats["trainable_params"] > 10 * sum(
        p.numel() for p in res.head.parameters())


def test_mlflow_without_a_tracking_uri_writes_only_under_the_runs_folder(cache: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow's own default is a database and artifacts in the working folder; ours is the runs folder."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    train(_cfg(cache, tmp_path, track="mlflow", run_name="ml"))
    assert list(work.iterdir()) == []  # nothing in the working folder
    runs = tmp_path / "runs"
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("toy")
    assert exp is not None and exp.artifact_location == (runs / "mlruns").resolve().as_uri()
    (run,) = client.search_runs([exp.experiment_id])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "run")} >= {"run/model.safetensors"}
    assert list((runs / "mlruns").rglob("model.safetensors"))
    from mmcache.runs import find_runs

    assert find_runs(runs) == [runs / "toy" / "ml"]  # mlflow's copy of the run folder is not listed as a run
