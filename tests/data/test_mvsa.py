"""MVSA-Single / -Multiple: the label rule, the splits, robust text, clear errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from mmcache.data import load_dataset
from mmcache.data.mvsa import combine, majority
from mmcache.errors import MMCacheError
from tests.data.layouts import write_mvsa

# (text, image) -> expected label; None = dropped.
RULE = {
    ("positive", "positive"): "positive", ("negative", "negative"): "negative", ("neutral", "neutral"): "neutral",
    ("positive", "neutral"): "positive", ("neutral", "positive"): "positive",
    ("negative", "neutral"): "negative", ("neutral", "negative"): "negative",
    ("positive", "negative"): None, ("negative", "positive"): None,
}
LABELS = ["negative", "neutral", "positive"]


@pytest.mark.parametrize("pair,expected", list(RULE.items()))
def test_single_label_rule(pair: tuple[str, str], expected: str | None) -> None:
    assert combine(*pair) == expected


def test_majority_needs_more_than_half() -> None:
    assert majority(["positive", "positive", "neutral"]) == "positive"
    assert majority(["positive", "negative", "neutral"]) is None
    assert majority([]) is None


def single_rows(n_copies: int = 4) -> list[tuple[str, list[str]]]:
    rows = []
    for c in range(n_copies):
        for j, (t, i) in enumerate(RULE):
            rows.append((str(c * 100 + j + 1), [f"{t},{i}"]))
    return rows


def test_single_applies_the_rule_to_every_row(tmp_path: Path) -> None:
    rows = single_rows()
    root = write_mvsa(tmp_path / "mvsa", rows)
    ds = load_dataset("mvsa-single", root)
    expected = {sid: RULE[tuple(cells[0].split(","))] for sid, cells in rows}
    kept = {k: v for k, v in expected.items() if v is not None}
    assert {s.id: LABELS[s.labels["sentiment"]] for s in ds.samples} == kept
    assert len(ds.samples) == 4 * 7  # two conflicts of nine dropped, in each copy
    assert ds.labels.tasks == {"sentiment": LABELS} and ds.labels.metric == "accuracy"
    s = ds.by_id()["1"]
    assert s.text == "tweet number 1 #fun" and s.image == str(root / "data" / "1.jpg")
    assert any("dropped 8: positive/negative conflict" in n for n in ds.notes)


def test_alias_mvsa_is_single(tmp_path: Path) -> None:
    root = write_mvsa(tmp_path / "mvsa", single_rows())
    alias, canonical = load_dataset("mvsa", root), load_dataset("mvsa-single", root)
    assert alias.samples == canonical.samples
    # Caches and runs are keyed by the name as typed.
    assert alias.name == "mvsa" and canonical.name == "mvsa-single"


def test_multiple_takes_per_modality_majority_first(tmp_path: Path) -> None:
    rows = [
        ("1", ["positive,neutral", "positive,positive", "neutral,neutral"]),  # text pos, image neu -> positive
        ("2", ["negative,negative", "negative,positive", "neutral,positive"]),  # text neg, image pos -> dropped
        ("3", ["positive,neutral", "negative,neutral", "neutral,neutral"]),  # text has no majority -> dropped
        ("4", ["neutral,negative", "neutral,negative", "positive,neutral"]),  # neu + neg -> negative
        ("5", ["neutral,neutral", "neutral,positive", "neutral,neutral"]),  # neutral
    ]
    rows = [(str(int(sid) + 10 * c), cells) for c in range(4) for sid, cells in rows]  # enough rows for a split
    root = write_mvsa(tmp_path / "mm", rows, multiple=True)
    ds = load_dataset("mvsa-multiple", root)
    got = {s.id: LABELS[s.labels["sentiment"]] for s in ds.samples}
    for c in range(4):
        assert got[str(1 + 10 * c)] == "positive"
        assert got[str(4 + 10 * c)] == "negative" and got[str(5 + 10 * c)] == "neutral"
        assert str(2 + 10 * c) not in got and str(3 + 10 * c) not in got
    assert len(ds.samples) == 12
    assert any("dropped 4: no annotator majority" in n for n in ds.notes)
    # Majority over whole pairs: rows 1-3 have no pair that two annotators share.
    rows += [(str(int(sid) + 100), cells) for sid, cells in rows]
    root = write_mvsa(tmp_path / "mm2", rows, multiple=True)
    by_pair = {s.id: LABELS[s.labels["sentiment"]] for s in load_dataset("mvsa-multiple", root, vote="pair").samples}
    assert by_pair["4"] == "negative" and by_pair["5"] == "neutral" and len(by_pair) == 16
    assert not {"1", "2", "3"} & set(by_pair)


def test_default_split_is_seeded_stratified_8_1_1(tmp_path: Path) -> None:
    rows = [(str(i), [["positive,positive", "negative,neutral", "neutral,neutral"][i % 3]]) for i in range(1, 101)]
    root = write_mvsa(tmp_path / "mvsa", rows)
    ds = load_dataset("mvsa-single", root)
    assert Counter(s.split for s in ds.samples) == {"train": 80, "val": 10, "test": 10}
    again = load_dataset("mvsa-single", root)
    assert [s.split for s in again.samples] == [s.split for s in ds.samples]
    other = load_dataset("mvsa-single", root, seed=1)
    assert [s.split for s in other.samples] != [s.split for s in ds.samples]


def test_ten_folds_have_disjoint_tests_covering_every_row(tmp_path: Path) -> None:
    rows = [(str(i), [["positive,positive", "negative,neutral", "neutral,neutral"][i % 3]]) for i in range(1, 56)]
    root = write_mvsa(tmp_path / "mvsa", rows)
    tests = [load_dataset("mvsa-single", root, fold=k).ids("test") for k in range(10)]
    assert sorted(i for t in tests for i in t) == sorted(str(i) for i in range(1, 56))
    ds3 = load_dataset("mvsa-single", root, fold=3)
    assert not set(ds3.ids("val")) & set(ds3.ids("test"))
    assert any("10-fold CV, fold 3" in n for n in ds3.notes)


def test_texts_in_odd_encodings_are_read(tmp_path: Path) -> None:
    rows = single_rows()
    texts = {"1": "Caf\xe9 \x93quoted\x94\n".encode("latin-1"), "2": b"\xef\xbb\xbfbom text\x00\r\n",
             "3": "emoji \U0001f600".encode()}
    root = write_mvsa(tmp_path / "mvsa", rows, texts=texts)
    by_id = load_dataset("mvsa-single", root).by_id()
    assert by_id["1"].text == "Café “quoted”"  # cp1252 smart quotes
    assert by_id["2"].text == "bom text"
    assert by_id["3"].text == "emoji \U0001f600"


def test_images_texts_folders_and_a_top_folder_are_found(tmp_path: Path) -> None:
    root = write_mvsa(tmp_path / "dl" / "MVSA_Single", single_rows(), media="split")
    ds = load_dataset("mvsa-single", tmp_path / "dl")
    s = ds.by_id()["1"]
    assert s.image == str(root / "images" / "1.jpg") and s.text.startswith("tweet number 1")


def test_errors_name_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(MMCacheError, match="no file 'labelResultAll.txt'"):
        load_dataset("mvsa-single", tmp_path)
    root = write_mvsa(tmp_path / "a", [("1", ["positive,happy"])])
    with pytest.raises(MMCacheError, match=r"labelResultAll\.txt, line 2: label 'happy' is not one of"):
        load_dataset("mvsa-single", root)
    root = write_mvsa(tmp_path / "b", [("1", ["positive,positive"]), ("1", ["neutral,neutral"])])
    with pytest.raises(MMCacheError, match=r"line 3: duplicate id '1' \(first seen at .*line 2\)"):
        load_dataset("mvsa-single", root)
    root = write_mvsa(tmp_path / "c", [("1", ["positive positive"])])
    with pytest.raises(MMCacheError, match=r"line 2: annotation 'positive positive' is not 'text,image'"):
        load_dataset("mvsa-single", root)
    root = write_mvsa(tmp_path / "d", single_rows(), multiple=False)
    with pytest.raises(MMCacheError, match="is this MVSA-Single"):
        load_dataset("mvsa-multiple", root)


def test_missing_text_file_is_an_error_or_skipped_on_request(tmp_path: Path) -> None:
    root = write_mvsa(tmp_path / "mvsa", single_rows())
    (root / "data" / "5.txt").unlink()
    with pytest.raises(MMCacheError, match=r"line 6: text file .*5\.txt is missing; .*skip_missing=true"):
        load_dataset("mvsa-single", root)
    with pytest.raises(MMCacheError, match="skip_missing='maybe' must be true or false"):
        load_dataset("mvsa-single", root, skip_missing="maybe")
    with pytest.raises(MMCacheError, match="text file"):
        load_dataset("mvsa-single", root, skip_missing="false")  # as the extract CLI passes -o values
    ds = load_dataset("mvsa-single", root, skip_missing="true")
    assert "5" not in ds.by_id() and len(ds.samples) == 27
    assert any("dropped 1: text file missing" in n for n in ds.notes)


def test_unknown_option_is_refused(tmp_path: Path) -> None:
    root = write_mvsa(tmp_path / "mvsa", single_rows())
    with pytest.raises(MMCacheError, match=r"does not take option\(s\) \['task'\]"):
        load_dataset("mvsa-single", root, task="x")
