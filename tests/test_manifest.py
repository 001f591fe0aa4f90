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
