"""Run folders as a hostile user leaves them: every reader (heads predict, Predictor.load, --init-head, heads runs)
refuses each damaged folder in one line naming the file, exit 2, writing nothing; names are one folder name."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mmcache.errors import MMCacheError
from mmcache.heads.train import TrainConfig, train
from tests.heads.conftest import build_cache, run_heads


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One real `heads train` run on the toy cache, copied and damaged by each case."""
    tmp = tmp_path_factory.mktemp("runfolder")
    cache = tmp / "cache"
    build_cache(cache, n=120)
    runs = tmp / "runs"
    train(TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(cache),
                      runs_dir=str(runs), head="linear", head_hparams={"D": 8}, epochs=2, batch_size=32, quiet=True,
                      run_name="base"))
    return {"cache": cache, "runs": runs, "run": runs / "toy" / "base"}


def _json(name: str, value: Any) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        (d / name).write_text(value if isinstance(value, str) else json.dumps(value))
    return edit


def _edit_json(name: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        obj = json.loads((d / name).read_text())
        obj = change(obj) or obj
        (d / name).write_text(json.dumps(obj))
    return edit


def _head(key: str, value: Any) -> Callable[[Path], None]:
    def change(h: dict[str, Any]) -> None:
        if value is _DROP:
            h.pop(key)
        else:
            h[key] = value
    return _edit_json("head.json", change)


_DROP = object()


def _input(width: Any) -> Callable[[Path], None]:
    def change(h: dict[str, Any]) -> None:
        h["inputs"]["image"]["pooled"] = width
    return _edit_json("head.json", change)


def _labels(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    return _edit_json("config.json", lambda c: change(c["resolved"]["labels"]["tasks"]) and None)


def _offsets(value: Any) -> Callable[[Path], None]:
    def change(c: dict[str, Any]) -> None:
        c["resolved"]["logit_adjust"] = {"tau": 1.0, "offsets": {"label": value}}
    return _edit_json("config.json", change)


def _raw_header(header: bytes, claimed: int | None = None) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header) if claimed is None else claimed) + header
                                              + b"\0" * 64)
    return edit


def _tensors(change: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        save_file(change(load_file(str(d / "model.safetensors"))), str(d / "model.safetensors"))
    return edit


def _first(state: dict[str, Any], fn: Callable[[Any], Any]) -> dict[str, Any]:
    k = next(iter(state))
    return {**state, k: fn(state[k])}


def _truncate(d: Path) -> None:
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) - 40])


def _as_folder(name: str) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        (d / name).unlink()
        (d / name).mkdir()
    return edit


def _remove(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


# (case, damage, the file the one line must name)
CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("head.json not JSON", _json("head.json", "{not json"), "head.json"),
    ("head.json a list", _json("head.json", [1, 2]), "head.json"),
    ("head.json empty", _json("head.json", ""), "head.json"),
    ("head.json missing", _remove("head.json"), "head.json"),
    ("head.json a folder", _as_folder("head.json"), "head.json"),
    ("no name", _head("name", _DROP), "head.json"),
    ("name a number", _head("name", 3), "head.json"),
    ("unknown head", _head("name", "nosuch"), "head.json"),
    ("inputs a string", _head("inputs", "image"), "head.json"),
    ("inputs empty", _head("inputs", {}), "head.json"),
    ("width -3", _input([-3]), "head.json"),
    ("width 0", _input([0]), "head.json"),
    ("width a string", _input(["24"]), "head.json"),
    ("width a bool", _input([True]), "head.json"),
    ("width huge", _input([1 << 40]), "head.json"),
    ("width of another head", _input([25]), "model.safetensors"),
    ("tasks empty", _head("tasks", {}), "head.json"),
    ("tasks zero classes", _head("tasks", {"label": 0}), "head.json"),
    ("hparams a list", _head("hparams", [1]), "head.json"),
    ("hparams huge D", _head("hparams", {"D": 1 << 40}), "head.json"),
    ("hparams unknown", _head("hparams", {"nosuch": 1}), "head.json"),
    ("safetensors missing", _remove("model.safetensors"), "model.safetensors"),
    ("safetensors a folder", _as_folder("model.safetensors"), "model.safetensors"),
    ("safetensors empty", lambda d: (d / "model.safetensors").write_bytes(b""), "model.safetensors"),
    ("safetensors truncated", _truncate, "model.safetensors"),
    ("header of 2^40 bytes", _raw_header(b"{}", 1 << 40), "model.safetensors"),
    ("header not JSON", _raw_header(b"{nope"), "model.safetensors"),
    ("header a list", _raw_header(b"[1]"), "model.safetensors"),
    ("header offsets outside", _raw_header(json.dumps({"w": {"dtype": "F32", "shape": [4],
                                                             "data_offsets": [0, 1 << 30]}}).encode()),
     "model.safetensors"),
    ("header dtype unknown", _raw_header(json.dumps({"w": {"dtype": "X9", "shape": [1],
                                                           "data_offsets": [0, 4]}}).encode()), "model.safetensors"),
    ("header size vs shape", _raw_header(json.dumps({"w": {"dtype": "F32", "shape": [3],
                                                           "data_offsets": [0, 4]}}).encode()), "model.safetensors"),
    ("tensor renamed", _tensors(lambda s: {("x" + k if i == 0 else k): v for i, (k, v) in enumerate(s.items())}),
     "model.safetensors"),
    ("tensor missing", _tensors(lambda s: dict(list(s.items())[1:])), "model.safetensors"),
    ("tensor mis-shaped", _tensors(lambda s: _first(s, lambda v: v.reshape(-1)[:-1].clone())), "model.safetensors"),
    ("tensor float64", _tensors(lambda s: _first(s, lambda v: v.double())), "model.safetensors"),
    ("NaN weights", _tensors(lambda s: _first(s, lambda v: v * float("nan"))), "model.safetensors"),
    ("infinite weights", _tensors(lambda s: _first(s, lambda v: v + float("inf"))), "model.safetensors"),
    ("config.json not JSON", _json("config.json", "{"), "config.json"),
    ("config.json a list", _json("config.json", []), "config.json"),
    ("config.json missing", _remove("config.json"), "config.json"),
    ("resolved a list", _edit_json("config.json", lambda c: {**c, "resolved": []}), "config.json"),
    ("labels missing", _edit_json("config.json", lambda c: c["resolved"].pop("labels") and None), "config.json"),
    ("labels of another length", _labels(lambda t: t["label"].append("extra")), "config.json"),
    ("labels one short", _labels(lambda t: t["label"].pop()), "config.json"),
    ("labels not names", _labels(lambda t: t.update(label=[1, 2, 3])), "config.json"),
    ("task missing", _labels(lambda t: t.update(other=t.pop("label"))), "config.json"),
    ("offsets a string", _offsets("big"), "config.json"),
    ("offsets NaN", _offsets([float("nan")] * 3), "config.json"),
    ("offsets too few", _offsets([0.0]), "config.json"),
    ("modalities a string", _edit_json("config.json", lambda c: {**c, "modalities": "image"}), "config.json"),
]


def _damaged(base_run: dict[str, Path], tmp_path: Path, damage: Callable[[Path], None]) -> Path:
    d = tmp_path / "runs" / "toy" / "r"
    shutil.copytree(base_run["run"], d)
    damage(d)
    return d


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _one_line(e: pytest.ExceptionInfo[MMCacheError], file: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg and file in msg, msg


@pytest.mark.parametrize("case,damage,file", CASES, ids=[c[0] for c in CASES])
def test_a_damaged_run_folder_is_one_line_for_every_reader(case: str, damage: Callable[[Path], None], file: str,
                                                           base_run: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from mmcache.finetune.run import read_head_run
    from mmcache.predict import Predictor

    d = _damaged(base_run, tmp_path, damage)
    before = _listing(tmp_path)
    with pytest.raises(MMCacheError) as e:
        Predictor.load(d, device="cpu")
    _one_line(e, file)
    with pytest.raises(MMCacheError) as e:
        read_head_run(d)
    _one_line(e, file)
    assert e.value.args[0].startswith("--init-head ")
    capsys.readouterr()
    code = run_heads(["predict", "--run", str(d), "--cache-dir", str(base_run["cache"]),
                      "--out", str(tmp_path / "p.csv")], monkeypatch)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("error: ") and file in err, err
    assert _listing(tmp_path) == before  # nothing written
    # heads runs reads the JSON files and the safetensors header only (no torch): a folder damaged there is skipped
    # with one line; one whose damage only building the head shows is listed. Never a traceback.
    from mmcache.runs import collect

    rows = collect(tmp_path / "runs")
    if case in TABLE_SEES:
        assert rows == []
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err


# The cases `heads runs` refuses on its own (JSON schema, safetensors header, missing files).
TABLE_SEES = {c for c, _, f in CASES if f in ("head.json", "config.json") and c not in (
    "unknown head", "hparams huge D", "hparams unknown", "labels of another length", "labels one short",
    "labels not names", "task missing", "labels missing", "offsets too few")} | {
    c for c, _, _ in CASES if "safetensors" in c or "header" in c}


def test_the_undamaged_run_loads_everywhere(base_run: dict[str, Path], tmp_path: Path) -> None:
    from mmcache.finetune.run import read_head_run
    from mmcache.runs import collect

    head, cfg = __import__("mmcache.heads.train", fromlist=["load_run"]).load_run(base_run["run"])
    assert head.tasks == {"label": 3} and read_head_run(base_run["run"])["name"] == "linear"
    assert [r["run"] for r in collect(base_run["runs"])] == ["toy/base"]


def _spec_run(base_run: dict[str, Path], tmp_path: Path, spec: dict[str, Any]) -> Path:
    def edit(c: dict[str, Any]) -> None:
        c["resolved"]["store_specs"] = {"image/feat": {"spec": spec, "dtype": "float32"},
                                        "text/feat": {"spec": spec, "dtype": "float32"}}
    return _damaged(base_run, tmp_path, _edit_json("config.json", edit))


@pytest.mark.parametrize("kind", ["passwd", "missing", "pickle folder", "no hash", "bad family"])
def test_spec_paths_are_checked_before_anything_is_loaded(kind: str, base_run: dict[str, Path], tmp_path: Path) -> None:
    from mmcache.predict import Predictor

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    (hf / "config.json").write_text("{}")
    spec = {"passwd": {"family": "resnet", "preset": "resnet-tiny", "modality": "image", "weights": "/etc/passwd",
                       "weights_sha256": "0" * 64},
            "missing": {"family": "resnet", "preset": "resnet-tiny", "modality": "image",
                        "weights": str(tmp_path / "gone.pt"), "weights_sha256": "0" * 64},
            "pickle folder": {"family": "roberta", "preset": "roberta", "modality": "text", "model": str(hf),
                              "weights_sha256": "0" * 64},
            "no hash": {"family": "resnet", "preset": "resnet-tiny", "modality": "image", "weights": "/etc/passwd"},
            "bad family": {"family": "resnet", "preset": "resnet-tiny", "modality": "image", "layers": "many"}}[kind]
    d = _spec_run(base_run, tmp_path, spec)
    with pytest.raises(MMCacheError) as e:
        Predictor.load(d, device="cpu")
    assert "\n" not in str(e.value) and ("store_specs" in str(e.value) or "image/feat" in str(e.value)), str(e.value)


@pytest.mark.parametrize("argv,flag", [
    (["train", "--dataset", "../cache/toy"], "--dataset"),
    (["train", "--dataset", "toy", "--run-name", "a/b"], "--run-name"),
    (["train", "--dataset", "toy", "--run-name", ""], "--run-name"),
    (["train", "--dataset", "toy", "--run-name", ".."], "--run-name"),
    (["train", "--dataset", "toy", "--run-name", ".hidden"], "--run-name"),
    (["train", "--dataset", "toy", "--run-name", "x" * 200], "--run-name"),
    (["train", "--dataset", "/abs"], "--dataset"),
    (["sweep", "--dataset", "a/../b"], "--dataset"),
])
def test_names_are_one_folder_name(argv: list[str], flag: str, base_run: dict[str, Path], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_heads([*argv, "--vtype", "feat", "--cache-dir", str(base_run["cache"]), "--runs-dir",
                      str(tmp_path / "runs")], monkeypatch)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and flag in err and "one folder name" in err, err
    assert not (tmp_path / "runs").exists()


def test_finetune_names_are_one_folder_name(tmp_path: Path) -> None:
    for argv, flag in ((["--dataset", "demo", "--run-name", "a/b"], "--run-name"),
                       (["--dataset", "../demo"], "--dataset")):
        res = subprocess.run([sys.executable, "-m", "mmcache.finetune.cli", "run", *argv, "--image", "clip-tiny",
                              "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True, cwd=tmp_path)
        err = res.stderr.strip()
        assert res.returncode == 2 and err.count("\n") == 0 and flag in err, err
    assert not (tmp_path / "runs").exists()


def test_a_name_another_process_holds_is_refused(base_run: dict[str, Path], tmp_path: Path) -> None:
    """Two runs of the same --run-name: the one that comes second is refused in one line, never replaces the first."""
    from mmcache.runfolder import release, take

    held = tmp_path / "runs" / "toy" / "same"
    assert take(held)
    try:
        res = subprocess.run([sys.executable, "-m", "mmcache.heads.cli", "train", "--dataset", "toy", "--vtype",
                              "feat", "--cache-dir", str(base_run["cache"]), "--runs-dir", str(tmp_path / "runs"),
                              "--run-name", "same", "--epochs", "1", "-q"], capture_output=True, text=True)
    finally:
        release(held)
    err = res.stderr.strip()
    assert res.returncode == 2 and err.count("\n") == 0 and "being written by another process" in err, err
    assert not held.exists()


def test_two_runs_started_together_one_wins(base_run: dict[str, Path], tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "mmcache.heads.cli", "train", "--dataset", "toy", "--vtype", "feat", "--cache-dir",
           str(base_run["cache"]), "--runs-dir", str(tmp_path / "runs"), "--run-name", "same", "--epochs", "2", "-q"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [(p.wait(), p.communicate()[1]) for p in procs]
    codes = sorted(c for c, _ in outs)
    assert codes == [0, 2], outs
    err = next(e for c, e in outs if c == 2).strip()
    assert err.count("\n") == 0 and ("being written by another process" in err or "already exists" in err), err
    assert sorted(p.name for p in (tmp_path / "runs" / "toy").iterdir()) == ["same"]


def test_max_runs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from mmcache.heads.sweep import MAX_RUNS, check_run_count

    check_run_count(MAX_RUNS, None)
    check_run_count(20_000, 20_000)
    with pytest.raises(MMCacheError, match="--max-runs 10001"):
        check_run_count(MAX_RUNS + 1, None)
    grid = tmp_path / "g.toml"
    grid.write_text("[grid]\nlr = [" + ",".join(str(i / 1e6 + 1e-4) for i in range(1000)) + "]\n"
                    "D = [" + ",".join(str(i + 1) for i in range(1000)) + "]\n")
    code = run_heads(["sweep", "--dataset", "toy", "--vtype", "feat", "--grid-file", str(grid), "--cache-dir",
                      str(tmp_path / "none"), "--runs-dir", str(tmp_path / "runs")], monkeypatch)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "1,000,000 runs" in err and "--max-runs" in err, err
