"""Twitter-15/17 (TomBERT TSV), MMHS150K and Fakeddit in their distributed layouts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mmcache.data import load_dataset
from mmcache.data.mmhs150k import vote
from mmcache.errors import MMCacheError
from tests.data.layouts import write_fakeddit, write_mmhs, write_twitter

TW = {
    "train": [("0", "2", "1860693.jpg", 'RT @ x : $T$ is everything " # MCM', "Chuck Bass"),
              ("1", "1", "1860693.jpg", "RT @ x : Chuck Bass is everything # $T$", "MCM"),
              ("2", "0", "55.jpg", "$T$ lost again", "Arsenal")],
    "dev": [("0", "1", "77.jpg", "$T$ speaks today", "Obama")],
    "test": [("0", "0", "88.jpg", "sad news from $T$ and $T$", "Paris")],
}


def test_twitter_entity_filled_in_and_kept(tmp_path: Path) -> None:
    root = write_twitter(tmp_path / "tw15", TW)
    ds = load_dataset("twitter15", root)
    assert ds.name == "twitter15" and ds.labels.tasks == {"sentiment": ["negative", "neutral", "positive"]}
    assert Counter(s.split for s in ds.samples) == {"train": 3, "val": 1, "test": 1}
    s = ds.by_id()["train/0"]
    assert s.text == 'RT @ x : Chuck Bass is everything " # MCM' and s.entity == "Chuck Bass"
    assert s.labels == {"sentiment": 2} and s.image == str(root / "twitter2015_images" / "1860693.jpg")
    assert ds.by_id()["test/0"].text == "sad news from Paris and Paris"
    assert ds.by_id()["val/0"].labels == {"sentiment": 1}
    assert all(s.context is None for s in ds.samples)


def test_twitter17_in_a_subfolder_with_images_dir_and_captions(tmp_path: Path) -> None:
    inner = write_twitter(tmp_path / "tw17" / "twitter2017", TW, image_dir="images")
    (tmp_path / "tw17" / "captions.json").write_text(json.dumps({"55.jpg": "a football pitch"}))
    ds = load_dataset("twitter17", tmp_path / "tw17")
    s = ds.by_id()["train/2"]
    assert s.image == str(inner / "images" / "55.jpg") and s.context == "a football pitch"
    assert ds.by_id()["train/0"].context is None


def test_twitter_errors(tmp_path: Path) -> None:
    bad = {k: list(v) for k, v in TW.items()}
    bad["dev"].append(("1", "3", "77.jpg", "$T$ again", "Obama"))
    root = write_twitter(tmp_path / "a", bad)
    with pytest.raises(MMCacheError, match=r"dev\.tsv, line 3: label '3' is not 0 \(negative\)"):
        load_dataset("twitter15", root)
    bad = {k: list(v) for k, v in TW.items()}
    bad["train"].append(("1", "1", "77.jpg", "$T$ dup", "X"))
    root = write_twitter(tmp_path / "b", bad)
    with pytest.raises(MMCacheError, match=r"train\.tsv, line 5: duplicate id 'train/1' \(first seen at .*line 3\)"):
        load_dataset("twitter15", root)
    root = write_twitter(tmp_path / "c", TW)
    with (root / "test.tsv").open("a") as f:
        f.write("1\t2\t9.jpg\tonly four fields\n")
    with pytest.raises(MMCacheError, match=r"test\.tsv, line 3: 4 fields, expected 5"):
        load_dataset("twitter15", root)
    root = write_twitter(tmp_path / "d", TW)
    (root / "dev.tsv").unlink()
    with pytest.raises(MMCacheError, match=r"dev\.tsv not found"):
        load_dataset("twitter15", root)


@pytest.mark.parametrize("votes,binary,category", [
    ([0, 0, 0], 0, 0), ([0, 0, 1], 0, 0), ([1, 1, 0], 1, 1), ([0, 2, 3], 1, None), ([1, 2, 3], 1, None),
    ([4, 4, 4], 1, 4), ([5, 0, 5], 1, 5),
])
def test_mmhs_vote(votes: list[int], binary: int, category: int | None) -> None:
    assert vote(votes) == (binary, category)


MMHS_GT = {"101": [0, 0, 0], "102": [1, 1, 0], "103": [0, 2, 3], "104": [2, 2, 2], "105": [0, 0, 5],
           "106": [3, 3, 1], "107": [0, 1, 0]}
MMHS_SPLITS = {"train": ["101", "102", "103", "104"], "val": ["105"], "test": ["106"]}


def test_mmhs_binary_and_six_way_tasks_with_ocr_context(tmp_path: Path) -> None:
    root = write_mmhs(tmp_path / "mmhs", MMHS_GT, MMHS_SPLITS, ocr={"102": "SOME OCR", "104": ""})
    ds = load_dataset("mmhs150k", root)
    assert list(ds.labels.tasks) == ["hate", "category"] and len(ds.labels.tasks["category"]) == 6
    by_id = ds.by_id()
    assert by_id["102"].labels == {"hate": 1, "category": 1}
    assert by_id["103"].labels == {"hate": 1}  # no 6-way majority
    assert by_id["105"].labels == {"hate": 0, "category": 0}
    assert by_id["106"].labels == {"hate": 1, "category": 3}
    assert by_id["102"].context == "SOME OCR" and by_id["104"].context is None and by_id["101"].context is None
    assert by_id["101"].image == str(root / "img_resized" / "101.jpg") and by_id["101"].text.startswith("tweet 101")
    assert "107" not in by_id  # in no split file
    assert any("1 tweets without a 6-way majority" in n for n in ds.notes)
    assert any("1 tweets of MMHS150K_GT.json are in no split file" in n for n in ds.notes)
    assert ds.counts()["train"]["hate"] == {"NotHate": 1, "Hate": 3}
    assert load_dataset("mmhs", root, task="category").labels.primary == "category"
    assert all(s.context is None for s in load_dataset("mmhs150k", root, ocr="false").samples)


def test_mmhs_errors(tmp_path: Path) -> None:
    root = write_mmhs(tmp_path / "a", MMHS_GT, {**MMHS_SPLITS, "test": ["106", "999"]})
    with pytest.raises(MMCacheError, match=r"test_ids\.txt, line 2: tweet 999 is not in MMHS150K_GT\.json"):
        load_dataset("mmhs150k", root)
    root = write_mmhs(tmp_path / "b", {**MMHS_GT, "101": [0, 7, 0]}, MMHS_SPLITS)
    with pytest.raises(MMCacheError, match=r"MMHS150K_GT\.json, tweet 101: label 7 is outside 0-5"):
        load_dataset("mmhs150k", root)
    root = write_mmhs(tmp_path / "c", MMHS_GT, {**MMHS_SPLITS, "val": ["105", "101"]})
    with pytest.raises(MMCacheError, match=r"val_ids\.txt, line 2: duplicate id '101' \(first seen at .*train_ids"):
        load_dataset("mmhs150k", root)
    root = write_mmhs(tmp_path / "d", MMHS_GT, {"train": ["101"], "val": ["105"]})
    with pytest.raises(MMCacheError, match=r"test_ids\.txt not found"):
        load_dataset("mmhs150k", root)


FK = {
    "train": [("a1", 'a "quoted" title', 1, 0, 0), ("a2", "tab\tinside", 0, 2, 5), ("a3", "x", 0, 1, 1)],
    "validate": [("b1", "y", 1, 0, 0)],
    "test_public": [("c1", "z", 0, 2, 4)],
}


def test_fakeddit_three_tasks(tmp_path: Path) -> None:
    root = write_fakeddit(tmp_path / "fk", FK)
    ds = load_dataset("fakeddit", root)
    assert list(ds.labels.tasks) == ["2_way", "3_way", "6_way"] and ds.labels.metric == "accuracy"
    assert Counter(s.split for s in ds.samples) == {"train": 3, "val": 1, "test": 1}
    by_id = ds.by_id()
    assert by_id["a1"].text == 'a "quoted" title' and by_id["a2"].text == "tab\tinside"
    assert by_id["a2"].labels == {"2_way": 0, "3_way": 2, "6_way": 5}
    assert ds.labels.tasks["6_way"][5] == "misleading_content" and ds.labels.tasks["2_way"][1] == "true"
    assert by_id["c1"].image == str(root / "public_image_set" / "c1.jpg")
    assert load_dataset("fakeddit", root, task="6_way").labels.primary == "6_way"


def test_fakeddit_errors(tmp_path: Path) -> None:
    bad = {k: list(v) for k, v in FK.items()}
    bad["validate"].append(("b2", "w", 1, 3, 0))
    root = write_fakeddit(tmp_path / "a", bad)
    with pytest.raises(MMCacheError, match=r"multimodal_validate\.tsv, line 3: 3_way_label 3 is outside 0..2"):
        load_dataset("fakeddit", root)
    bad = {k: list(v) for k, v in FK.items()}
    bad["test_public"].append(("a1", "dup", 1, 0, 0))
    root = write_fakeddit(tmp_path / "b", bad)
    with pytest.raises(MMCacheError, match=r"test_public\.tsv, line 3: duplicate id 'a1' \(first seen at .*train"):
        load_dataset("fakeddit", root)
    root = write_fakeddit(tmp_path / "c", {"train": FK["train"], "validate": FK["validate"]})
    with pytest.raises(MMCacheError, match=r"multimodal_test_public\.tsv not found"):
        load_dataset("fakeddit", root)
