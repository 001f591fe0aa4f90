"""Several datasets as one: MMHS150K + Fakeddit in their real layouts through a label map."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mmcache.data import load_dataset
from mmcache.data.combined import combined_name, epoch_pool, parse_upsample, source_roots
from mmcache.errors import MMCacheError
from tests.data.layouts import write_fakeddit, write_mmhs

MMHS_MAP = {"NotHate": "not_hate", "Racist": "hate", "Sexist": "hate", "Homophobe": "hate", "Religion": "hate",
            "OtherHate": "hate"}
FAKEDDIT_MAP = {"true": "true", "satire_parody": "satire", "false_connection": "false_connection",
                "imposter_content": "imposter", "manipulated_content": "manipulated", "misleading_content": None}


def write_pair(root: Path, n: int = 4) -> Path:
    """data/mmhs150k and data/fakeddit with `n` rows per split (each split holds every mapped class)."""
    votes = [[0, 0, 0], [1, 1, 0], [2, 2, 2], [3, 0, 3], [5, 5, 1], [1, 2, 3]]  # the last: no 6-way majority
    gt, splits = {}, {}
    for split in ("train", "val", "test"):
        ids = [f"{split[:2]}{i}" for i in range(n)]
        for i, sid in enumerate(ids):
            gt[sid] = votes[i % len(votes)]
        splits[split] = ids
    write_mmhs(root / "mmhs150k", gt, splits)
    rows = {}
    for split, fname in (("train", "train"), ("val", "validate"), ("test", "test_public")):
        rows[fname] = [(f"f{split[:2]}{i}", f"title {split} {i}", 1 - (i % 6 == 0), 0, i % 6) for i in range(n)]
    write_fakeddit(root / "fakeddit", rows)
    return root


def write_map(path: Path, **extra: dict[str, object]) -> Path:
    path.write_text(json.dumps({"mmhs150k": MMHS_MAP, "fakeddit": FAKEDDIT_MAP, **extra}))
    return path


def test_two_datasets_in_one_label_space(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_pair(tmp_path / "data", n=6)
    ds = load_dataset("mmhs150k,fakeddit", root, label_map=write_map(tmp_path / "map.json"))
    assert ds.name == "mmhs150k-fakeddit" == combined_name("mmhs150k,fakeddit")
    assert ds.labels.tasks == {"label": ["not_hate", "hate", "true", "satire", "false_connection", "imposter",
                                         "manipulated"]}
    assert ds.labels.metric == "macro_f1"  # auroc (mmhs150k) and accuracy (fakeddit) differ
    by_id = ds.by_id()
    # Ids prefixed by the source, the source recorded, each source's splits kept.
    assert by_id["mmhs150k/tr1"].source == "mmhs150k" and by_id["mmhs150k/tr1"].split == "train"
    assert by_id["fakeddit/fva2"].source == "fakeddit" and by_id["fakeddit/fva2"].split == "val"
    assert by_id["mmhs150k/tr1"].text.startswith("tweet tr1")
    names = ds.labels.tasks["label"]
    assert names[by_id["mmhs150k/tr0"].labels["label"]] == "not_hate"
    assert [names[by_id[f"mmhs150k/tr{i}"].labels["label"]] for i in (1, 2, 3, 4)] == ["hate"] * 4
    assert names[by_id["fakeddit/fte3"].labels["label"]] == "imposter"
    assert by_id["fakeddit/fte0"].labels == {"label": names.index("true")}
    # misleading_content (6-way class 5) mapped to null: dropped and counted; mmhs tweets without a majority too.
    assert "fakeddit/ftr5" not in by_id and "mmhs150k/tr5" not in by_id
    c = Counter((s.source, s.split) for s in ds.samples)
    assert c == {(src, sp): 5 for src in ("mmhs150k", "fakeddit") for sp in ("train", "val", "test")}
    err = capsys.readouterr().err
    assert "fakeddit: 15 rows, task '6_way' mapped; 3 rows mapped to null dropped (misleading_content 3)" in err
    assert "mmhs150k: 15 rows, task 'category' mapped; 3 rows without a 'category' label left out" in err
    assert any("mapped to null dropped" in n for n in ds.notes)


def test_data_dir_per_source_and_source_options(tmp_path: Path) -> None:
    write_pair(tmp_path / "a")
    write_pair(tmp_path / "b")
    lm = write_map(tmp_path / "map.json")
    spec = f"mmhs150k={tmp_path / 'a' / 'mmhs150k'},fakeddit={tmp_path / 'b' / 'fakeddit'}"
    ds = load_dataset("mmhs150k,fakeddit", spec, label_map=lm, **{"fakeddit.text_column": "title"})
    by_id = ds.by_id()
    assert by_id["fakeddit/ftr1"].image == str(tmp_path / "b" / "fakeddit" / "public_image_set" / "ftr1.jpg")
    assert by_id["fakeddit/ftr1"].text == "TITLE TRAIN 1"  # the option reached fakeddit only
    assert by_id["mmhs150k/tr1"].image == str(tmp_path / "a" / "mmhs150k" / "img_resized" / "tr1.jpg")
    assert source_roots(["x", "y"], None) == {"x": Path("data/x"), "y": Path("data/y")}
    with pytest.raises(MMCacheError, match="'mvsa' is none of the datasets mmhs150k, fakeddit"):
        load_dataset("mmhs150k,fakeddit", f"mvsa={tmp_path}", label_map=lm)
    with pytest.raises(MMCacheError, match="does not take option"):
        load_dataset("mmhs150k,fakeddit", tmp_path / "a", label_map=lm, no_such=1)


def test_label_absent_from_the_map_is_refused_naming_source_label_and_row(tmp_path: Path) -> None:
    root = write_pair(tmp_path / "data")
    partial = {k: v for k, v in FAKEDDIT_MAP.items() if k != "imposter_content"}
    (tmp_path / "m.json").write_text(json.dumps({"mmhs150k": MMHS_MAP, "fakeddit": partial}))
    with pytest.raises(MMCacheError, match=r"m\.json: fakeddit label 'imposter_content' \(task 6_way, row 'ftr3' "
                                           r"of .*fakeddit, split train\) is not in the map of 'fakeddit'"):
        load_dataset("mmhs150k,fakeddit", root, label_map=tmp_path / "m.json")
    (tmp_path / "n.json").write_text(json.dumps({"mmhs150k": MMHS_MAP}))
    with pytest.raises(MMCacheError, match=r"n\.json has no entry for 'fakeddit'"):
        load_dataset("mmhs150k,fakeddit", root, label_map=tmp_path / "n.json")
    (tmp_path / "t.json").write_text(json.dumps({"mmhs150k": {**MMHS_MAP, "Racst": "hate"}, "fakeddit": FAKEDDIT_MAP}))
    with pytest.raises(MMCacheError, match=r"'mmhs150k' maps 'Racst', not classes of one task"):
        load_dataset("mmhs150k,fakeddit", root, label_map=tmp_path / "t.json")
    with pytest.raises(MMCacheError, match="need a label map"):
        load_dataset("mmhs150k,fakeddit", root)
    with pytest.raises(MMCacheError, match="names 'fakeddit' twice"):
        load_dataset("fakeddit,fakeddit", root, label_map=tmp_path / "m.json")
    with pytest.raises(MMCacheError, match="several datasets"):
        load_dataset("fakeddit", root / "fakeddit", label_map=tmp_path / "m.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MMCacheError, match=r"bad\.json: unreadable JSON at line 1"):
        load_dataset("mmhs150k,fakeddit", root, label_map=tmp_path / "bad.json")


def test_upsample_repeats_a_sources_training_rows(tmp_path: Path) -> None:
    ds = load_dataset("mmhs150k,fakeddit", write_pair(tmp_path / "data", n=6), label_map=write_map(tmp_path / "m.json"))
    train = ds.split("train")
    assert Counter(s.source for s in epoch_pool(train, {})) == {"mmhs150k": 5, "fakeddit": 5}
    pool = epoch_pool(train, parse_upsample(["mmhs150k=2"]))
    assert Counter(s.source for s in pool) == {"mmhs150k": 10, "fakeddit": 5}
    assert Counter(s.id for s in pool)["mmhs150k/tr1"] == 2 and Counter(s.id for s in pool)["fakeddit/ftr1"] == 1
    assert parse_upsample("mmhs150k=3,fakeddit=1") == {"mmhs150k": 3, "fakeddit": 1}
    for bad in ("mmhs150k=0.5", "mmhs150k=0", "mmhs150k=1001"):  # a K past 1000 would exhaust memory, not train
        with pytest.raises(MMCacheError, match="K a whole number from 1 to 1000"):
            parse_upsample([bad])
    with pytest.raises(MMCacheError, match="K must be a whole number from 1 to 1000"):
        epoch_pool(train, {"mmhs150k": 10**9})
    with pytest.raises(MMCacheError, match="not a source dataset of this run; its sources are mmhs150k, fakeddit"):
        epoch_pool(train, {"mvsa": 2})


def test_the_documented_label_map_combines_the_fixtures(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "howto" / "several-datasets.md").read_text()
    start = text.index("# Several datasets in one run")
    block = text[start:].split("```json\n", 1)[1].split("```", 1)[0]
    assert json.loads(block) == {"mmhs150k": MMHS_MAP, "fakeddit": FAKEDDIT_MAP}
    (tmp_path / "map.json").write_text(block)
    ds = load_dataset("mmhs150k,fakeddit", write_pair(tmp_path / "data"), label_map=tmp_path / "map.json",
                      progress=False)
    assert ds.labels.tasks["label"][:3] == ["not_hate", "hate", "true"]
