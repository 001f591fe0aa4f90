"""Shared reading helpers and split assignment."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from mmcache.data.io import (
    IdCheck,
    assign_splits,
    decode_bytes,
    fix_mojibake,
    locate,
    normalise_split,
    read_delimited,
    text_lines,
)
from mmcache.errors import MMCacheError


@pytest.mark.parametrize("raw,expected", [("dev", "val"), ("Valid", "val"), ("validation", "val"),
                                          ("dev_seen", "val"), ("TRAIN", "train"), ("test_public", "test"),
                                          ("dev_unseen", "dev_unseen"), ("holdout", "holdout")])
def test_split_names_are_normalised(raw: str, expected: str) -> None:
    assert normalise_split(raw) == expected


def test_decode_bytes_handles_utf8_cp1252_and_latin1() -> None:
    assert decode_bytes("café ☕".encode()) == "café ☕"
    assert decode_bytes("\ufeffbom".encode()) == "bom"
    assert decode_bytes("don’t".encode("cp1252")) == "don’t"
    # 0x81 is undefined in cp1252: latin-1 is the fallback that never fails.
    assert decode_bytes(b"a\x81b") == "a\x81b"


def test_fix_mojibake_undoes_one_wrong_decode_only() -> None:
    assert fix_mojibake("donâ€™t") == "don’t"
    assert fix_mojibake("plain text") == "plain text"
    assert fix_mojibake("Ã") == "Ã"  # not valid mojibake: left alone


def test_text_lines_keeps_unicode_line_separators_inside_lines() -> None:
    assert text_lines("a\u2028b\r\nc") == ["a\u2028b", "c"]


def test_locate_searches_two_levels_and_uses_hint(tmp_path: Path) -> None:
    (tmp_path / "a" / "twitter2015").mkdir(parents=True)
    (tmp_path / "a" / "twitter2017").mkdir(parents=True)
    (tmp_path / "a" / "twitter2015" / "train.tsv").write_text("x")
    (tmp_path / "a" / "twitter2017" / "train.tsv").write_text("x")
    assert locate(tmp_path, "train.tsv", hint="2017") == tmp_path / "a" / "twitter2017" / "train.tsv"
    with pytest.raises(MMCacheError, match="several 'train.tsv'"):
        locate(tmp_path, "train.tsv")
    with pytest.raises(MMCacheError, match="no file 'nothing.txt'"):
        locate(tmp_path, "nothing.txt")
    assert locate(tmp_path, "nothing.txt", required=False) is None


def test_read_delimited_names_file_and_line_of_a_ragged_row(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text('a,b\n1,"two, with comma"\n3\n')
    with pytest.raises(MMCacheError, match=r"t\.csv, line 3: 1 fields where the header has 2"):
        read_delimited(p)
    p.write_text('a,b\n1,"multi\nline"\n')
    assert read_delimited(p) == [(3, {"a": "1", "b": "multi\nline"})]
    with pytest.raises(MMCacheError, match=r"missing column\(s\) \['c'\]"):
        read_delimited(p, required=["c"])


def test_id_check_names_both_places() -> None:
    ids = IdCheck()
    ids.add("x", "f.csv", 2)
    with pytest.raises(MMCacheError, match=r"g\.csv, line 9: duplicate id 'x' \(first seen at f\.csv, line 2\)"):
        ids.add("x", "g.csv", 9)


def test_stratified_split_is_8_1_1_stratified_and_seeded() -> None:
    y = [0] * 500 + [1] * 300 + [2] * 200
    s0 = assign_splits(y, seed=0)
    assert Counter(s0) == {"train": 800, "val": 100, "test": 100}
    # Stratified: each class keeps its share in every split.
    for split, n in (("val", 100), ("test", 100)):
        per_class = Counter(c for c, s in zip(y, s0, strict=True) if s == split)
        assert per_class == {0: n // 2, 1: n * 3 // 10, 2: n // 5}
    assert assign_splits(y, seed=0) == s0
    assert assign_splits(y, seed=1) != s0


def test_kfold_test_parts_are_disjoint_and_cover_every_row() -> None:
    y = [i % 3 for i in range(95)]
    folds = [assign_splits(y, seed=0, fold=k) for k in range(10)]
    test_sets = [{i for i, s in enumerate(f) if s == "test"} for f in folds]
    assert set().union(*test_sets) == set(range(95))
    assert sum(len(t) for t in test_sets) == 95  # disjoint
    for f in folds:
        c = Counter(f)
        assert c["test"] in (9, 10) and c["val"] in (9, 10) and c["train"] == 95 - c["test"] - c["val"]
    with pytest.raises(MMCacheError, match="--fold must be in 0..9"):
        assign_splits(y, fold=10)
    # Options arrive as text from `-o`: "3" is fold 3.
    assert assign_splits(y, seed="0", fold="3") == folds[3]
    with pytest.raises(MMCacheError, match="option seed='x' must be an integer"):
        assign_splits(y, seed="x")


def test_kfold_small_classes_fall_back_to_plain_folds() -> None:
    from mmcache.data.splits import kfold_split

    labels = [0] * 7 + [1] * 7 + [2] * 6  # no class has 10 members: stratified 10-fold is impossible
    tests = [i for f in range(10) for i, s in enumerate(kfold_split(labels, f, seed=3)) if s == "test"]
    assert sorted(tests) == list(range(20))  # 10 disjoint test folds covering every row
    assert kfold_split(labels, 4, seed=3) == kfold_split(labels, 4, seed=3)
