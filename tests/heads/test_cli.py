"""`heads train` / `heads predict` from the command line, including user-error paths (one line, exit 2)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mmcache.heads.cli import parse_kv
from tests.heads.conftest import run_heads as run


def test_train_then_predict(toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    rc = run(["train", "--dataset", "toy", "--vtype", "feat", "--ttype", "feat", "--cache-dir", str(toy_cache),
              "--runs-dir", str(runs), "--epochs", "20", "--batch-size", "64", "--D", "32", "--dropout", "0.1",
              "--l2norm", "--select", "macro_f1", "--run-name", "cli", "--hp", "key=pooled", "--threads", "1"], monkeypatch)
    out = capsys.readouterr().out
    assert rc == 0
    assert "split" in out and "test" in out and "macro_f1" in out and "best epoch" in out
    d = runs / "toy" / "cli"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["modalities"] == {"image": "feat", "text": "feat"}
    assert cfg["head_hparams"] == {"key": "pooled", "D": 32, "dropout": 0.1, "l2norm": True}
    assert cfg["select_metric"] == "macro_f1" and cfg["epochs"] == 20 and cfg["threads"] == 1
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["splits"]["test"]["label"]["macro_f1"] > 0.85

    pred = tmp_path / "pred.csv"
    rc = run(["predict", "--run", str(d), "--split", "val", "--out", str(pred)], monkeypatch)
    assert rc == 0 and f"wrote {pred}" in capsys.readouterr().out
    rows = list(csv.DictReader(pred.open()))
    acc = sum(r["label"] == r["predicted"] for r in rows) / len(rows)
    assert len(rows) == metrics["splits"]["val"]["label"]["n"]
    assert acc == pytest.approx(metrics["splits"]["val"]["label"]["accuracy"])


def test_ablation_and_lbfgs_flags(toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    base = ["train", "--dataset", "toy", "--vtype", "feat", "--ttype", "feat", "--cache-dir", str(toy_cache),
            "--runs-dir", str(runs), "--epochs", "2", "-q"]
    assert run([*base, "--ablation", "1", "--run-name", "t"], monkeypatch) == 0
    assert json.loads((runs / "toy" / "t" / "head.json").read_text())["hparams"]["ablation"] == 1
    assert run([*base, "--use", "image", "--run-name", "i"], monkeypatch) == 0
    assert json.loads((runs / "toy" / "i" / "head.json").read_text())["hparams"]["modalities"] == ["image"]
    assert run([*base, "--solver", "lbfgs", "--l2-grid", "1e-2,1e-3", "--run-name", "lb"], monkeypatch) == 0
    m = json.loads((runs / "toy" / "lb" / "metrics.json").read_text())
    assert m["select"]["l2"] in (1e-2, 1e-3) and m["splits"]["test"]["label"]["accuracy"] > 0.9
    assert [c["l2"] for c in json.loads((runs / "toy" / "lb" / "curves.json").read_text())] == [1e-2, 1e-3]
    # The batched grid solve reaches a penalty of the same grid and records itself in the config.
    assert run([*base, "--solver", "lbfgs", "--l2-grid", "1e-2,1e-3", "--l2-batched", "--run-name", "lbb"],
               monkeypatch) == 0
    mb = json.loads((runs / "toy" / "lbb" / "metrics.json").read_text())
    assert mb["select"]["l2"] in (1e-2, 1e-3) and mb["splits"]["test"]["label"]["accuracy"] > 0.9
    assert json.loads((runs / "toy" / "lbb" / "config.json").read_text())["lbfgs_batched"] is True
    # Default run names tell ablation variants apart.
    assert run([*base, "--ablation", "2"], monkeypatch) == 0
    assert len(list((runs / "toy").glob("linear_image-feat+text-feat_ablation2_*"))) == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--dataset", "toy", "--vtype", "nope"], "feature store"),
    (["train", "--dataset", "other", "--vtype", "feat"], "manifest"),
    (["train", "--dataset", "toy"], "no feature stores selected"),
    (["train", "--dataset", "toy", "--vtype", "feat", "--hp", "D"], "--hp: 'D' is not KEY=VALUE"),
    (["train", "--dataset", "toy", "--vtype", "feat", "--head", "nohead"], "unknown head"),
    (["train", "--dataset", "toy", "--vtype", "feat", "--loss", "noloss"], "unknown loss"),
    (["train", "--dataset", "toy", "--vtype", "feat", "--schedule", "step"], "unknown schedule"),
    (["train", "--dataset", "toy", "--vtype", "feat", "--solver", "lbfgs", "--l2-grid", "a,b"], "--l2-grid expects"),
    (["predict", "--run", "no/such/run"], "not found"),
])
def test_user_errors_are_one_line_exit_2(toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    rc = run([*argv, *(["--cache-dir", str(toy_cache)] if argv[0] == "train" else [])], monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert not any("Traceback" in line for line in err)


def test_predict_unknown_split(toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    assert run(["train", "--dataset", "toy", "--vtype", "feat", "--cache-dir", str(toy_cache), "--runs-dir", str(runs),
                "--epochs", "1", "--run-name", "x", "-q"], monkeypatch) == 0
    capsys.readouterr()
    assert run(["predict", "--run", str(runs / "toy" / "x"), "--split", "dev"], monkeypatch) == 2
    assert "split 'dev' not in" in capsys.readouterr().err


def test_parse_kv() -> None:
    assert parse_kv(["a=1", "b=0.5", "c=true", "d=[1,2]", "e=softmax"], "--hp") == {
        "a": 1, "b": 0.5, "c": True, "d": [1, 2], "e": "softmax"}
    assert parse_kv(None, "--hp") == {}
