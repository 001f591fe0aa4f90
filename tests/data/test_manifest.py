"""Dataset names, the manifest written at extraction (no silent overwrite), and the fold it records."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmcache.cache.store import manifest_path
from mmcache.cli import app
from mmcache.data import load_dataset
from mmcache.data.table import write_table
from mmcache.errors import MMCacheError
from mmcache.extract.runner import Request, extract
from mmcache.heads.data import Manifest, load_cached

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

runner = CliRunner()


def table(path: Path, prefix: str, n: int = 20, split: bool = True) -> Path:
    rows = [{"id": f"{prefix}{i}", "text": f"{prefix} text number {i}", "label": "ab"[i % 2],
             **({"split": ("train", "train", "val", "test")[i % 4]} if split else {})} for i in range(n)]
    return write_table(path, rows)


def cli(*args: str) -> str:
    res = runner.invoke(app, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, res.output
    return res.output


def extract_args(data: Path, cache: Path, *extra: str) -> list[str]:
    return ["extract", "table", "--data-dir", str(data), "--cache-dir", str(cache), "--text", "clip-tiny",
            "--num-workers", "0", "--no-progress", *extra]


def test_two_tables_get_their_own_cache_and_heads_find_them(tmp_path: Path) -> None:
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    tweets = table(tmp_path / "tweets.csv", "t")
    memes = table(tmp_path / "memes" / "data.csv", "m", n=12)
    cli(*extract_args(tweets, cache))
    cli(*extract_args(memes.parent, cache))
    assert {r["id"] for r in json.loads(manifest_path(cache, "tweets").read_text())["samples"]} == {
        f"t{i}" for i in range(20)}
    assert len(json.loads(manifest_path(cache, "memes").read_text())["samples"]) == 12
    assert not (cache / "table").exists()
    out = cli("heads", "train", "--dataset", "memes", "--ttype", "clip-tiny", "--epochs", "1", "--cache-dir",
              str(cache), "--runs-dir", str(runs), "--quiet", "--device", "cpu")
    folder = [ln for ln in out.splitlines() if ln.startswith("run folder: ")]  # -q keeps the table and the folder
    assert len(folder) == 1 and Path(folder[0].removeprefix("run folder: ")).parent == runs / "memes"
    assert "accuracy" in out


def test_a_manifest_of_other_ids_is_not_overwritten_without_force(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cli(*extract_args(table(tmp_path / "a.csv", "a"), cache))
    before = manifest_path(cache, "a").read_text()
    other = table(tmp_path / "b.csv", "b")
    with pytest.raises(MMCacheError, match=r"manifest\.json lists 20 ids .*not in dataset 'a'.*--name.*--force"):
        cli(*extract_args(other, cache, "--name", "a"))
    assert manifest_path(cache, "a").read_text() == before
    with pytest.raises(MMCacheError, match="not in dataset"):  # the runner refuses too, before loading a model
        extract(load_dataset("table", other, as_name="a"), [Request("text", "clip-tiny", "clip-tiny")],
                cache_dir=cache, progress=False)
    cli(*extract_args(other, cache, "--name", "a", "--force"))
    assert {r["id"][0] for r in json.loads(manifest_path(cache, "a").read_text())["samples"]} == {"b"}
    # More rows than before (the same ids plus new ones) is not a conflict: the manifest grows.
    cli(*extract_args(table(tmp_path / "b.csv", "b", n=24), cache, "--name", "a"))
    assert len(json.loads(manifest_path(cache, "a").read_text())["samples"]) == 24


def test_fold_and_seed_are_recorded_and_checked_by_heads(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    data = table(tmp_path / "cv.csv", "c", split=False)
    cli(*extract_args(data, cache, "--fold", "3", "-o", "seed=2"))
    path = manifest_path(cache, "cv")
    obj = json.loads(path.read_text())
    assert (obj["fold"], obj["seed"]) == (3, 2)
    man = Manifest.read(path)
    assert (man.fold, man.split_seed) == (3, 2)
    test_ids = {s["id"] for s in obj["samples"] if s["split"] == "test"}
    assert test_ids == set(load_dataset("table", data, fold=3, seed=2).ids("test"))
    stores = {"text": "clip-tiny"}
    got = load_cached("cv", stores, cache, fold=3)
    assert (got.fold, got.split_seed) == (3, 2)
    assert load_cached("cv", stores, cache).fold == 3  # no fold asked: any is taken, and reported
    with pytest.raises(MMCacheError, match=r"holds fold 3, not fold 5; .*--fold 5"):
        load_cached("cv", stores, cache, fold=5)
    # Re-extracting another fold rewrites the splits (features are reused) and records the new fold.
    cli(*extract_args(data, cache, "--fold", "5", "-o", "seed=2"))
    assert json.loads(path.read_text())["fold"] == 5 and load_cached("cv", stores, cache, fold=5).fold == 5
    # A dataset with its own splits records no fold; asking for one is refused.
    cli(*extract_args(table(tmp_path / "own.csv", "o"), cache))
    assert Manifest.read(manifest_path(cache, "own")).fold is None
    with pytest.raises(MMCacheError, match=r"holds the official splits \(no fold\), not fold 1"):
        load_cached("own", stores, cache, fold=1)


def test_empty_label_space_in_a_manifest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"name": "x", "labels": {"tasks": {"label": []}}, "samples": []}))
    with pytest.raises(MMCacheError, match=r"manifest\.json: task 'label' has no classes"):
        Manifest.read(path)
