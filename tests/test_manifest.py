"""mmcache/manifest.py: the one reader and writer of cache/<dataset>/manifest.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mmcache.cache.store import FeatureStore, StoreReader, store_path, verify_store
from mmcache.data.base import Dataset, LabelSpace, Sample
from mmcache.errors import MMCacheError
from mmcache.manifest import IGNORE, Manifest, check_replace, manifest_ids, manifest_path, update


def dataset(prefix: str = "s", n: int = 6, fold: int | None = 2, seed: int | None = 7) -> Dataset:
    samples = [Sample(id=f"{prefix}{i}", split=("train", "val", "test")[i % 3],
                      labels={} if i == 4 else {"y": i % 2, **({"z": 0} if i % 2 else {})}) for i in range(n)]
    return Dataset(name="toy", samples=samples, labels=LabelSpace(tasks={"y": ["a", "b"], "z": ["c"]}),
                   root=Path("/nowhere"), fold=fold, seed=seed)


def test_round_trip_keeps_the_json_layout_and_targets(tmp_path: Path) -> None:
    path = manifest_path(tmp_path, "toy")
    dataset().write_manifest(path)
    obj = json.loads(path.read_text())
    assert list(obj) == ["name", "fold", "seed", "labels", "samples"]
    assert (obj["name"], obj["fold"], obj["seed"]) == ("toy", 2, 7)
    assert obj["labels"] == {"tasks": {"y": ["a", "b"], "z": ["c"]}, "metric": "accuracy"}
    assert obj["samples"][1] == {"id": "s1", "split": "val", "labels": {"y": 1, "z": 0}}
    man = Manifest.read(path)
    assert man.ids == [f"s{i}" for i in range(6)] and man.splits[:3] == ["train", "val", "test"]
    assert (man.name, man.fold, man.seed, man.split_seed, man.path) == ("toy", 2, 7, 7, path)
    np.testing.assert_array_equal(man.targets["y"], [0, 1, 0, 1, IGNORE, 1])
    np.testing.assert_array_equal(man.targets["z"], [IGNORE, 0, IGNORE, 0, IGNORE, 0])
    assert not man.targets["y"].flags.writeable  # shared by every reader of the cached manifest
    assert man.split_ids("val") == ["s1", "s4"] and manifest_ids(path, "test") == ["s2", "s5"]
    assert Manifest.from_json(obj) == man  # equal whatever the path
    dataset(fold=None, seed=None).write_manifest(path)
    assert (Manifest.read(path).fold, Manifest.read(path).seed) == (None, None)


def test_manifests_of_earlier_versions_still_read(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    # `split_seed` for the seed; numeric ids; no name; a row without its labels key.
    path.write_text(json.dumps({"fold": 1, "split_seed": 3, "labels": {"tasks": {"y": ["a", "b"]}},
                                "samples": [{"id": 5, "split": "train", "labels": {"y": 1}},
                                            {"id": "x", "split": "test"}]}))
    man = Manifest.read(path)
    assert (man.ids, man.name, man.fold, man.split_seed) == (["5", "x"], "", 1, 3)
    np.testing.assert_array_equal(man.targets["y"], [1, IGNORE])
    # Only ids and splits (verify, loading a split by name): no label space needed.
    path.write_text(json.dumps({"name": "d", "samples": [{"id": "a", "split": "train", "labels": {}}]}))
    assert Manifest.read(path, labels=False).ids == ["a"]
    with pytest.raises(MMCacheError, match=r"manifest\.json: task '\(none\)' has no classes"):
        Manifest.read(path)


@pytest.mark.parametrize(("content", "error"), [
    ("{not json", r"is not a valid manifest \(JSONDecodeError"),
    ('{"samples": {}}', r"is not a valid manifest \(TypeError: 'samples' is not a list\)"),
    ('{"labels": {"tasks": {"y": ["a"]}}, "samples": [{"split": "train"}]}', r"is not a valid manifest \(KeyError"),
    ('{"samples": [{"id": "", "split": "train"}]}', r"lists the sample id '', which is not a non-empty text"),
    ('{"samples": [{"id": null, "split": "train"}]}', r"lists the sample id None"),
    ('{"samples": [{"id": "a", "split": "train"}, {"id": "a", "split": "test"}]}', r"lists 1 ids twice \(e\.g\. \['a'\]\)"),
    ('{"labels": {"tasks": {"y": ["a", "b"]}}, "samples": [{"id": "a", "split": "train", "labels": {"y": 2}}]}',
     r"row 'a' has label 2 for task 'y', which has 2 classes"),
    ('{"labels": {"tasks": {"y": []}}, "samples": []}', r"task 'y' has no classes"),
])
def test_bad_manifests_are_one_line_errors_naming_the_file(tmp_path: Path, content: str, error: str) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(content)
    with pytest.raises(MMCacheError, match=error) as e:
        Manifest.read(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_manifest_and_split(tmp_path: Path) -> None:
    with pytest.raises(MMCacheError, match=r"manifest .*manifest\.json not found; run `mmcache extract`"):
        Manifest.read(tmp_path / "manifest.json")
    dataset().write_manifest(tmp_path / "manifest.json")
    with pytest.raises(MMCacheError, match=r"has no split 'dev'; its splits are \['test', 'train', 'val'\]"):
        manifest_ids(tmp_path / "manifest.json", "dev")


def test_write_is_atomic_and_a_rewrite_is_read_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "manifest.json"
    dataset("a").write_manifest(path)
    assert Manifest.read(path).ids[0] == "a0"
    dataset("b").write_manifest(path)  # same size, at once: the cached parse is not reused
    assert Manifest.read(path).ids[0] == "b0" and sorted(os.listdir(tmp_path)) == ["manifest.json"]
    before = path.read_bytes()

    def killed(*args: object) -> None:
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        dataset("c").write_manifest(path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["manifest.json"]


def test_replacing_and_growing_a_manifest(tmp_path: Path) -> None:
    path = manifest_path(tmp_path, "toy")
    update(path, dataset(), ["s0", "s1"])
    assert Manifest.read(path).ids == ["s0", "s1"]
    update(path, dataset(), ["s3"])  # an earlier run's rows stay, in dataset order
    assert Manifest.read(path).ids == ["s0", "s1", "s3"]
    check_replace(path, dataset(n=8), force=False)  # all its ids are in the dataset: no conflict
    with pytest.raises(MMCacheError, match=r"lists 3 ids not in dataset 'toy' at /nowhere \(e\.g\. \['s0', 's1', 's3'\]\)"
                                           r".*--name.*--force"):
        check_replace(path, dataset("o"))
    check_replace(path, dataset("o"), force=True)
    path.write_text("{broken")  # an unreadable manifest is rewritten, never a reason to stop
    check_replace(path, dataset("o"))
    update(path, dataset("o"), ["o2"])
    assert Manifest.read(path).ids == ["o2"]


def test_verify_and_load_read_the_manifest_through_its_module(tmp_path: Path) -> None:
    spath = store_path(tmp_path, "toy", "image", "f")
    with FeatureStore(spath, {"preset": "f"}, "toy", dtype="float32") as st:
        st.write(["s0", "s1"], {"pooled": np.ones((2, 3), np.float32)})
    mpath = manifest_path(tmp_path, "toy")
    mpath.write_text(json.dumps({"name": "toy", "samples": [{"id": "s0", "split": "train"},
                                                            {"id": "s0", "split": "test"}]}))
    rep = verify_store(spath)
    assert not rep.ok and any("lists 1 ids twice" in p for p in rep.problems)
    update(mpath, dataset(n=2), ["s0", "s1"])
    assert verify_store(spath).ok
    assert StoreReader(spath).load(split="val")["pooled"].shape == (1, 3)


def test_large_manifests_are_a_summary_and_columns_that_read_as_the_json_layout(tmp_path: Path) -> None:
    from dataclasses import replace

    from mmcache import manifest as mf

    ds = dataset(n=9)
    # A combined dataset names each row's source (here the first three rows have none).
    ds.samples[:] = [s if i < 3 else replace(s, source="mmhs150k" if i == 3 else "fakeddit")
                     for i, s in enumerate(ds.samples)]
    json_path = tmp_path / "a" / "manifest.json"
    col_path = tmp_path / "b" / "manifest.json"
    Manifest.from_dataset(ds).write(json_path)
    Manifest.from_dataset(ds).write(col_path, columns=True)
    summary = json.loads(col_path.read_text())
    assert summary["format"] == mf.FORMAT and summary["rows"] == 9 and "samples" not in summary
    assert summary["splits"] == {"train": 3, "val": 3, "test": 3}
    cols = col_path.parent / summary["columns"]["file"]
    assert cols.is_file() and sorted(p.name for p in col_path.parent.iterdir()) == sorted(["manifest.json", cols.name])
    a, b = Manifest.read(json_path), Manifest.read(col_path)
    assert a == b and b.row_sources == [None, None, None, "mmhs150k", *["fakeddit"] * 5]
    np.testing.assert_array_equal(b.targets["y"], a.targets["y"])
    assert b.row_labels == a.row_labels and b.to_json() == json.loads(json_path.read_text())
    with np.load(cols, allow_pickle=False) as z:  # plain arrays, no pickle
        assert bytes(z["ids"]).decode().split("\0") == [f"s{i}" for i in range(9)]
    # A rewrite replaces the columns file; the old one is removed once the summary names the new one.
    ds.samples[0] = replace(ds.samples[0], split="test")
    Manifest.from_dataset(ds).write(col_path, columns=True)
    new = json.loads(col_path.read_text())["columns"]["file"]
    assert new != cols.name and not cols.exists() and Manifest.read(col_path).splits[0] == "test"
    # The layout follows the size: from COLUMNS_FROM rows on, columns.
    old_from = mf.COLUMNS_FROM
    try:
        mf.COLUMNS_FROM = 9
        Manifest.from_dataset(ds).write(json_path)
        assert "format" in json.loads(json_path.read_text())
        mf.COLUMNS_FROM = 10
        Manifest.from_dataset(ds).write(json_path)
        assert "samples" in json.loads(json_path.read_text()) and not list(json_path.parent.glob("*.npz"))
    finally:
        mf.COLUMNS_FROM = old_from


@pytest.mark.parametrize("damage, message", [
    ("digest", "does not match the digest"),
    ("missing", "cannot be read"),
    ("path", "not a file beside it"),
    ("rows", "columns hold"),
    ("format", "does not read"),
])
def test_a_damaged_columnar_manifest_is_one_line(tmp_path: Path, damage: str, message: str) -> None:
    path = tmp_path / "manifest.json"
    Manifest.from_dataset(dataset()).write(path, columns=True)
    obj = json.loads(path.read_text())
    cols = tmp_path / obj["columns"]["file"]
    if damage == "digest":
        raw = bytearray(cols.read_bytes())
        raw[-40] ^= 1
        cols.write_bytes(bytes(raw))
    elif damage == "missing":
        cols.unlink()
    elif damage == "path":
        obj["columns"]["file"] = "../elsewhere.npz"
    elif damage == "rows":
        obj["rows"] = 7
    else:
        obj["format"] = "mmcache-manifest/9"
    path.write_text(json.dumps(obj))
    with pytest.raises(MMCacheError, match=message) as e:
        Manifest.read(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
