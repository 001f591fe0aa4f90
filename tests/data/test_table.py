"""The generic table adapter (CSV / TSV / JSON / JSONL) and the demo built on it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mmcache.data import load_dataset
from mmcache.data.demo import generate_demo
from mmcache.data.table import write_table
from mmcache.errors import MMCacheError

ROWS = [
    {"id": "a", "image": "img/a.jpg", "text": "good day", "label": "pos", "split": "train", "entity": "day",
     "ctx_text": "a sunny street", "label_topic": "weather"},
    {"id": "b", "image_path": "img/b.jpg", "text": "bad day", "label": "neg", "split": "dev", "entity": "",
     "ctx_text": "", "label_topic": "mood"},
    {"id": "c", "image": "img/c.jpg", "text": "a day", "label": "neu", "split": "validation", "entity": "",
     "ctx_text": "", "label_topic": ""},
    {"id": "d", "image": "img/d.jpg", "text": "meh", "label": "neg", "split": "test", "entity": "",
     "ctx_text": "", "label_topic": "mood", "video": "v/d.mp4", "audio": "a/d.wav"},
]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl"])
def test_every_format_gives_the_same_samples(tmp_path: Path, suffix: str) -> None:
    root = tmp_path / suffix[1:]
    write_table(root / f"data{suffix}", ROWS)
    ds = load_dataset("table", root)
    assert [s.id for s in ds.samples] == ["a", "b", "c", "d"]
    assert [s.split for s in ds.samples] == ["train", "val", "val", "test"]
    assert ds.labels.tasks == {"label": ["neg", "neu", "pos"], "topic": ["mood", "weather"]}
    a, b, c, d = ds.samples
    assert a.labels == {"label": 2, "topic": 1} and c.labels == {"label": 1}  # empty cell: no label for that task
    assert a.image == str(root / "img/a.jpg") and b.image == str(root / "img/b.jpg")  # image_path column too
    assert a.entity == "day" and a.context == "a sunny street" and b.entity is None
    assert d.video == str(root / "v/d.mp4") and d.audio == str(root / "a/d.wav")
    saved = json.loads((root / "labels.json").read_text())
    assert saved["tasks"] == ds.labels.tasks


def test_saved_label_order_keeps_indices_stable(tmp_path: Path) -> None:
    write_table(tmp_path / "t.csv", [{"text": "x", "label": "b", "split": "train"},
                                     {"text": "y", "label": "c", "split": "test"}])
    (tmp_path / "labels.json").write_text(json.dumps({"tasks": {"label": ["c", "b", "a"]}, "metric": "f1_macro"}))
    ds = load_dataset("table", tmp_path)
    assert [s.labels["label"] for s in ds.samples] == [1, 0]
    assert ds.labels.metric == "f1_macro"


def test_numeric_labels_sort_numerically(tmp_path: Path) -> None:
    write_table(tmp_path / "t.jsonl", [{"text": str(i), "label": lab, "split": "train"} for i, lab in
                                       enumerate([10, 2, 1, 2.0, 10])])
    ds = load_dataset("table", tmp_path)
    assert ds.labels.tasks["label"] == ["1", "2", "10"]
    assert [s.labels["label"] for s in ds.samples] == [2, 1, 0, 1, 2]


def test_label_outside_saved_space_names_file_and_line(tmp_path: Path) -> None:
    write_table(tmp_path / "t.csv", [{"text": "x", "label": "a"}, {"text": "y", "label": "zzz"}])
    (tmp_path / "labels.json").write_text(json.dumps({"tasks": {"label": ["a", "b"]}}))
    with pytest.raises(MMCacheError, match=r"t\.csv, line 3: label 'zzz' is not in the label space"):
        load_dataset("table", tmp_path)


def test_second_table_in_a_folder_is_told_where_its_classes_come_from(tmp_path: Path) -> None:
    """Two tables in one folder share its labels.json: the second table's error names that file and what to do."""
    write_table(tmp_path / "first.csv", [{"text": "x", "label": "cat", "split": "train"},
                                         {"text": "y", "label": "dog", "split": "train"}])
    load_dataset("table", tmp_path / "first.csv")  # saves labels.json: cat, dog
    write_table(tmp_path / "second.csv", [{"text": "x", "label": "neg"}, {"text": "y", "label": "pos"}])
    with pytest.raises(MMCacheError, match=r"second\.csv, line 2: label 'neg' is not in the label space .*the "
                                           r"classes come from .*labels\.json, which fixes them for every table in "
                                           r".*delete the file to rebuild it from this table"):
        load_dataset("table", tmp_path / "second.csv")


def test_duplicate_id_names_both_rows(tmp_path: Path) -> None:
    write_table(tmp_path / "t.csv", [{"id": "1", "text": "x", "label": "a"}, {"id": "2", "text": "y", "label": "a"},
                                     {"id": "1", "text": "z", "label": "a"}])
    with pytest.raises(MMCacheError, match=r"t\.csv, line 4: duplicate id '1' \(first seen at .*t\.csv, line 2\)"):
        load_dataset("table", tmp_path)


def test_unreadable_jsonl_line_and_empty_row(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text('{"text": "ok", "label": "a"}\n{"text": broken\n')
    with pytest.raises(MMCacheError, match=r"t\.jsonl, line 2: unreadable JSON"):
        load_dataset("table", tmp_path)
    (tmp_path / "t.jsonl").write_text('{"text": "ok", "label": "a"}\n{"label": "a"}\n')
    with pytest.raises(MMCacheError, match=r"t\.jsonl, line 2: no image, text, video or audio"):
        load_dataset("table", tmp_path)


def test_missing_table_and_two_tables(tmp_path: Path) -> None:
    with pytest.raises(MMCacheError, match="expected one table file"):
        load_dataset("table", tmp_path)
    write_table(tmp_path / "a.csv", [{"text": "x", "label": "a"}])
    write_table(tmp_path / "b.csv", [{"text": "x", "label": "a"}])
    with pytest.raises(MMCacheError, match="expected one table file"):
        load_dataset("table", tmp_path)


def test_one_table_per_split(tmp_path: Path) -> None:
    write_table(tmp_path / "train.csv", [{"text": f"t{i}", "label": "a" if i % 2 else "b"} for i in range(4)])
    write_table(tmp_path / "dev.jsonl", [{"text": "v", "label": "a"}])
    write_table(tmp_path / "test.tsv", [{"text": "s", "label": "b"}])
    ds = load_dataset("table", tmp_path)
    assert Counter(s.split for s in ds.samples) == {"train": 4, "val": 1, "test": 1}
    assert len(set(ds.ids())) == 6  # ids made unique per split file


def test_rows_without_split_get_seeded_stratified_or_fold_splits(tmp_path: Path) -> None:
    rows = [{"id": str(i), "text": f"t{i}", "label": "ab"[i % 2]} for i in range(40)]
    write_table(tmp_path / "t.csv", rows)
    ds = load_dataset("table", tmp_path, seed=3)
    assert Counter(s.split for s in ds.samples) == {"train": 32, "val": 4, "test": 4}
    assert [s.split for s in load_dataset("table", tmp_path, seed=3).samples] == [s.split for s in ds.samples]
    tests = [set(load_dataset("table", tmp_path, fold=k).ids("test")) for k in range(10)]
    assert set().union(*tests) == set(ds.ids()) and sum(map(len, tests)) == 40


def test_too_few_rows_to_split_is_a_clear_error(tmp_path: Path) -> None:
    write_table(tmp_path / "t.csv", [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}])
    with pytest.raises(MMCacheError, match="only 2 rows: .* give the rows a split column"):
        load_dataset("table", tmp_path)


def test_fold_on_a_table_with_splits_is_refused(tmp_path: Path) -> None:
    write_table(tmp_path / "t.csv", ROWS)
    with pytest.raises(MMCacheError, match="--fold applies only"):
        load_dataset("table", tmp_path, fold=1)


def test_image_root_option(tmp_path: Path) -> None:
    write_table(tmp_path / "t.csv", [{"image_path": "x.jpg", "label": "a", "split": "train"}])
    ds = load_dataset("table", tmp_path / "t.csv", image_root=str(tmp_path / "pics"))
    assert ds.samples[0].image == str(tmp_path / "pics" / "x.jpg")


def test_demo_is_deterministic_by_seed_and_loads(tmp_path: Path) -> None:
    a = generate_demo(tmp_path / "a", n=40, seed=5)
    b = generate_demo(tmp_path / "b", n=40, seed=5)
    c = generate_demo(tmp_path / "c", n=40, seed=6)
    assert (a / "data.csv").read_bytes() == (b / "data.csv").read_bytes()
    assert (a / "data.csv").read_bytes() != (c / "data.csv").read_bytes()
    assert (a / "images" / "demo00007.jpg").read_bytes() == (b / "images" / "demo00007.jpg").read_bytes()
    ds = load_dataset("demo", a)
    assert len(ds.samples) == 40 and ds.labels.tasks == {"label": ["negative", "neutral", "positive"]}
    assert set(ds.splits) <= {"train", "val", "test"}
    assert all(Path(s.image).is_file() for s in ds.samples)


@pytest.mark.parametrize(("suffix", "text"), [
    # The quote opened on line 3 is never closed: the rows after it would become one text cell.
    (".csv", 'id,text,label,split\n1,fine,a,train\n2,"unclosed text,b,train\n3,x,a,test\n4,"y",b,test\n'),
    (".csv", 'id,text,label,split\n1,fine,a,train\n2,"unclosed text,b,train\n3,x,a,test\n4,y,b,test\n'),
    (".tsv", 'id\ttext\tlabel\tsplit\n1\tfine\ta\ttrain\n2\t"unclosed\tb\ttrain\n3\tx\ta\ttest\n'),
])
def test_unclosed_quote_names_the_file_and_line(tmp_path: Path, suffix: str, text: str) -> None:
    (tmp_path / f"t{suffix}").write_text(text)
    with pytest.raises(MMCacheError, match=rf"t\{suffix}, line 3: .*quote"):
        load_dataset("table", tmp_path)


def test_quoted_cells_with_newlines_and_quotes_still_load(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text('id,text,label,split\n1,"two\nlines, ok",a,train\n2,"say ""hi""",b,test\n'
                                    '3,plain,a,test\n')
    ds = load_dataset("table", tmp_path)
    assert [s.text for s in ds.samples] == ["two\nlines, ok", 'say "hi"', "plain"]
    assert [s.labels["label"] for s in ds.samples] == [0, 1, 0]


def test_table_without_label_column_is_one_clear_error(tmp_path: Path) -> None:
    write_table(tmp_path / "t.csv", [{"text": "x", "sentiment": "a", "split": "train"},
                                     {"text": "y", "sentiment": "b", "split": "test"}])
    with pytest.raises(MMCacheError, match=r"t\.csv: no 'label' column .*-o label_column=NAME"):
        load_dataset("table", tmp_path)
    assert not (tmp_path / "labels.json").exists()
    ds = load_dataset("table", tmp_path, label_column="sentiment")
    assert ds.labels.tasks == {"sentiment": ["a", "b"]} and [s.labels for s in ds.samples] == [
        {"sentiment": 0}, {"sentiment": 1}]
    with pytest.raises(MMCacheError, match=r"no 'polarity' column"):
        load_dataset("table", tmp_path, label_column="polarity")


def test_blank_label_column_is_an_error_and_never_saved(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": "", "split": "train"} for i in range(3)]
    write_table(tmp_path / "t.csv", rows)
    with pytest.raises(MMCacheError, match=r"t\.csv: column 'label' is blank in every row"):
        load_dataset("table", tmp_path)
    assert not (tmp_path / "labels.json").exists()
    # A label file left empty by an older version is rebuilt once the labels are filled in.
    (tmp_path / "labels.json").write_text(json.dumps({"tasks": {"label": []}}))
    write_table(tmp_path / "t.csv", [{**r, "label": "ab"[i % 2]} for i, r in enumerate(rows)])
    ds = load_dataset("table", tmp_path)
    assert ds.labels.tasks == {"label": ["a", "b"]} and [s.labels["label"] for s in ds.samples] == [0, 1, 0]
    assert json.loads((tmp_path / "labels.json").read_text())["tasks"] == {"label": ["a", "b"]}
    with pytest.raises(MMCacheError, match="label_names=\\[\\] must be a non-empty list"):
        load_dataset("table", tmp_path / "t.csv", label_names=[])


def test_table_name_defaults_to_the_file_or_folder(tmp_path: Path) -> None:
    write_table(tmp_path / "my tweets.csv", ROWS)
    assert load_dataset("table", tmp_path / "my tweets.csv").name == "my_tweets"
    assert load_dataset("table", tmp_path).name == tmp_path.name
    assert load_dataset("table", tmp_path, as_name="tw-1").name == "tw-1"
    with pytest.raises(MMCacheError, match=r"--name '\.\./x'"):
        load_dataset("table", tmp_path, as_name="../x")


def test_label_space_file_is_replaced_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank of a torchrun job loads the table and may write labels.json: it is written to a file of its
    own and renamed into place, so a process never reads half of another's file."""
    import mmcache.data.table as table

    written: list[str] = []
    real = table.atomic_write_text
    monkeypatch.setattr(table, "atomic_write_text", lambda p, text: (written.append(Path(p).name), real(p, text)))
    write_table(tmp_path / "t.csv", [{"text": "x", "label": "b", "split": "train"},
                                     {"text": "y", "label": "a", "split": "test"}])
    load_dataset("table", tmp_path)
    assert written == ["labels.json"]
    assert json.loads((tmp_path / "labels.json").read_text())["tasks"] == {"label": ["a", "b"]}
    assert not list(tmp_path.glob(".labels.json*"))  # no temporary file left behind


def test_other_column_names_through_options(tmp_path: Path) -> None:
    rows = [{"key": f"k{i}", "caption": f"text {i}", "picture": f"p/{i}.jpg", "part": ["train", "dev", "test"][i % 3],
             "label": "ab"[i % 2], "text": "not this", "score": i} for i in range(12)]
    table = write_table(tmp_path / "t.csv", rows)
    ds = load_dataset("table", table, text_column="caption", image_column="picture", id_column="key",
                      split_column="part")
    s = ds.by_id()["k4"]  # part "dev"
    assert (s.text, Path(s.image), s.split) == ("text 4", tmp_path / "p" / "4.jpg", "val")
    assert Counter(x.split for x in ds.samples) == {"train": 4, "val": 4, "test": 4}
    assert [n for n in ds.notes if n.startswith("columns not read: text, score (")] == [ds.notes[-1]]
    plain = load_dataset("table", table)  # defaults: `text`, no image, ids by row, a generated split
    assert plain.samples[0].text == "not this" and plain.samples[0].image is None
    assert "columns not read: key, caption, picture, part, score (" in " ".join(plain.notes)
    assert not any("columns not read" in n for n in load_dataset("table", write_table(
        tmp_path / "u.csv", [{"id": "1", "text": "x", "label": "a", "split": "train"}])).notes)


@pytest.mark.parametrize(("options", "message"), [
    ({"text_column": "capton"}, r"t\.csv: -o text_column='capton': the table has no such column \(columns: key, "
                                r"caption, label\); name one of them"),
    ({"text_column": "caption", "id_column": "caption"},
     r"-o text_column and -o id_column both name column 'caption'; give each field its own column"),
])
def test_a_column_option_naming_no_column_is_one_line(tmp_path: Path, options: dict[str, str], message: str) -> None:
    table = write_table(tmp_path / "t.csv", [{"key": "1", "caption": "x", "label": "a"}] * 1)
    with pytest.raises(MMCacheError, match=message):
        load_dataset("table", table, **options)


def test_data_show_names_a_column_it_does_not_read(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mmcache.data.cli import app

    table = write_table(tmp_path / "t.csv", [{"id": str(i), "text": "x", "caption": "c", "label": "ab"[i % 2],
                                              "split": ["train", "val", "test"][i % 3]} for i in range(6)])
    res = CliRunner().invoke(app, ["show", "table", "--data-dir", str(table), "--no-progress"])
    assert res.exit_code == 0 and "  - columns not read: caption (-o text_column=" in res.output
    res = CliRunner().invoke(app, ["show", "table", "--data-dir", str(table), "-o", "text_column=caption"])
    assert res.exit_code == 0 and "columns not read: text (" in res.output
